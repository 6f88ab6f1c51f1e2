"""How every API function turns its arguments into the command's checked options."""

from __future__ import annotations

from typing import Any, TypeVar

from lmforge.shared.core.errors import BadInput
from lmforge.shared.core.options import Options

O = TypeVar("O", bound=Options)


def options(cls: type[O], given: O | None, values: dict[str, Any], *, output_required: bool = False) -> O:
    """`given` (an options object) or the keyword `values`, checked; not both."""
    if given is not None:
        if values:
            raise BadInput(f"{cls.command}: give an options object or keyword options, not both")
        if not isinstance(given, cls):
            raise BadInput(f"{cls.command}: expected {cls.__name__} options, got {type(given).__name__}")
        given.check()
        made = given
    else:
        made = cls.make(**values)
    if output_required and getattr(made, "output", None) is None:
        raise BadInput(f"{cls.command}: give output= (a file to write; the command line's stdout has no place here)")
    return made
