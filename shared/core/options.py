"""Option declarations: what every command-line option is, written once.

An `Opt` holds an option's name, type, default, help text, help panel and spellings. The
catalog (`catalog.py`) lists, for every command, the options it takes. Everything else derives
from it: the Typer signatures of tools/ (hence `--help`, the completion scripts and what
`--config` YAML files may set), the defaults of the option dataclasses in shared/, the web
board's forms. tests/test_options.py walks every command to check that nothing drifts.

No Typer here (shared/ never imports it): tools/_cli.py turns an Opt into a Typer parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()   # the default of an option that must be given

TYPES = ("str", "int", "float", "bool", "path")


@dataclass(frozen=True)
class Opt:
    """One option (or positional argument) of a command.

    `type` is one of TYPES; `choices`, when given, are the strings a "str" option accepts. `many`: a list
    (a repeatable option, or a variadic argument). A default of None makes the option optional
    with no value. `flags` are the spellings when they differ from Typer's own (`--NAME`, and
    `--NAME/--no-NAME` for booleans); `long` names the first of them for docs."""

    name: str
    type: str = "str"
    default: Any = REQUIRED
    help: str = ""
    panel: str | None = None
    flags: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    many: bool = False
    argument: bool = False
    min: float | None = None
    max: float | None = None
    min_open: bool = False        # the bound itself is refused: "above MIN" rather than "at least MIN"
    max_open: bool = False
    envvar: str | None = None
    show_default: bool = True

    def __post_init__(self) -> None:
        if self.choices and self.type != "str":
            raise ValueError(f"option {self.name}: choices are strings")
        if self.type not in TYPES:
            raise ValueError(f"option {self.name}: unknown type {self.type!r}")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def long(self) -> str:
        """The spelling users read first: --learning-rate, --json, or the argument's NAME."""
        if self.argument:
            return self.name.upper()
        longs = [f for f in self.flags if f.startswith("--")]
        return longs[0] if longs else "--" + self.name.replace("_", "-")

    def number(self, value: Any) -> float:
        """A float option's value (from the command line or a --config file), checked: a finite number
        inside the declared range. ValueError says what is wrong, for the option's usage error."""
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{value!r} is not a number")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
        shown = value.strip() if isinstance(value, str) else f"{number:g}"
        if not math.isfinite(number):   # nan and inf pass every comparison a range makes
            raise ValueError(f"{shown}: must be a finite number")
        low = self.min is not None and (number <= self.min if self.min_open else number < self.min)
        high = self.max is not None and (number >= self.max if self.max_open else number > self.max)
        if low or high:
            raise ValueError(f"{shown}: must be {self.range_text()}")
        return number

    def range_text(self) -> str:
        """The declared range in words: "above 0", "at least 0", "in [0, 1)"."""
        if self.min is not None and self.max is not None:
            return f"in {'(' if self.min_open else '['}{self.min:g}, {self.max:g}{')' if self.max_open else ']'}"
        if self.min is not None:
            return f"{'above' if self.min_open else 'at least'} {self.min:g}"
        if self.max is not None:
            return f"{'below' if self.max_open else 'at most'} {self.max:g}"
        return "a finite number"

    def but(self, **changes: Any) -> Opt:
        """The same option as one command takes it (another default or help text)."""
        return replace(self, **changes)


def by_name(options: tuple[Opt, ...]) -> dict[str, Opt]:
    return {o.name: o for o in options}
