"""Typed option declarations: every command's options are one dataclass, written once.

A command's options class (`TrainSFT`, `DataPack`, ...) is composed from parts (the model and its
data, the method, LoRA, optimisation, the run, ...). Each field of a part is an option: its name
and annotation give the option's name and type, and its default is an `Opt` holding the rest —
the default value, help text, help panel, spellings, choices, range. `@declaration` turns such a
class into a keyword-only dataclass; `options_of(cls)` reads the `Opt`s back, complete, in
reading order (a part's options where the part is named, an override where its option first
appeared). A part's `check_own()` holds its cross-option checks; `Options.check()` runs every
value check (choices, finite numbers, ranges) and then every part's.

Everything else derives from these classes: the Typer signatures of tools/ (hence `--help`, the
completion scripts and what `--config` YAML files may set), the web board's forms, the reference
pages under docs/, and the Python API (each use case takes its command's options object).
tests/test_options.py walks every command to check that nothing drifts.

No Typer here (shared/ never imports it): tools/_cli.py turns an Opt into a Typer parameter.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar, dataclass_transform

from lmforge.shared.core.errors import BadInput

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

    name: str = ""
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


# ----------------------------------------------------------------------------- typed declarations

_OPT = "lmforge_opt"
_KINDS: dict[Any, str] = {str: "str", int: "int", float: "float", bool: "bool", Path: "path"}
C = TypeVar("C")


@dataclass_transform(kw_only_default=True, field_specifiers=(Opt,))
def declaration(cls: type[C]) -> type[C]:
    """Make `cls` (a part, or a command's options) a keyword-only dataclass whose fields are
    the `Opt`s written as its class attributes. Attributes that are not `Opt`s stay plain
    dataclass fields (with their own defaults) or class variables."""
    for name in cls.__dict__.get("__annotations__", {}):
        value = cls.__dict__.get(name, dataclasses.MISSING)
        if isinstance(value, Opt):
            setattr(cls, name, _field(value))
    return dataclass(kw_only=True)(cls)


def _field(opt: Opt) -> Any:
    meta = {_OPT: opt}
    if opt.default is REQUIRED:
        return dataclasses.field(metadata=meta)
    if isinstance(opt.default, (list, dict, set)):
        default = opt.default
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=opt.default, metadata=meta)


def options_of(cls: type) -> tuple[Opt, ...]:
    """A declaration's options, complete (name, type and `many` from the annotations), in
    reading order: a base's options where the base is named, then the class's own."""
    cached = cls.__dict__.get("_lmforge_options")
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if _OPT in f.metadata}
    found = []
    for name in _reading_order(cls):
        if name not in fields:
            continue
        spec: Opt = fields[name].metadata[_OPT]
        kind, many = _kind(hints[name], f"{cls.__name__}.{name}")
        found.append(replace(spec, name=name, type=kind, many=many))
    opts = tuple(found)
    type.__setattr__(cls, "_lmforge_options", opts)
    return opts


def _reading_order(cls: type) -> list[str]:
    names: list[str] = []
    for base in cls.__bases__:
        if dataclasses.is_dataclass(base):
            names += [n for n in _reading_order(base) if n not in names]
    names += [n for n in cls.__dict__.get("__annotations__", {}) if n not in names]
    return names


def _kind(hint: Any, where: str) -> tuple[str, bool]:
    """("int", False) for int | None, ("str", True) for list[str] | None, ..."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{where}: an option has one type (and None): {hint}")
        hint = rest[0]
    many = typing.get_origin(hint) is list
    if many:
        hint = typing.get_args(hint)[0]
    if hint not in _KINDS:
        raise TypeError(f"{where}: options are str, int, float, bool or Path (or lists of them), not {hint}")
    return _KINDS[hint], many


OptionsT = TypeVar("OptionsT", bound="Options")


class Options:
    """The base of every command's options: checks and the values as a plain dict."""

    command: ClassVar[str] = ""   # "train sft": set where the commands are registered (catalog.py)

    @classmethod
    def make(cls: type[OptionsT], **values: Any) -> OptionsT:
        """The options from keyword values (the Python API): unknown names refused with one line,
        the values checked; the names given are remembered as the user's choices."""
        from lmforge.shared.core import catalog  # noqa: F401 - names each class's command

        values = spelled(cls, values)
        known = {o.name for o in options_of(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            from lmforge.shared.core.errors import close_names

            raise BadInput(f"{cls.command or cls.__name__} has no option '{unknown[0]}'",
                           close_names(unknown[0], sorted(known)))
        missing = [o.name for o in options_of(cls) if o.required and o.name not in values]
        if missing:
            raise BadInput(f"{cls.command or cls.__name__}: '{missing[0]}' must be given")
        kinds = {o.name: o.type for o in options_of(cls)}
        values = {k: (Path(v) if kinds[k] == "path" and isinstance(v, str) else
                      float(v) if kinds[k] == "float" and isinstance(v, int) and not isinstance(v, bool) else v)
                  for k, v in values.items()}
        made = cls(**values)
        made.given = frozenset(values)   # type: ignore[attr-defined]
        made.check()
        return made

    @property
    def chosen(self) -> frozenset[str]:
        """The options the user set (command line, --config, environment, keyword arguments), as
        opposed to those left at their defaults: for refusing options that do nothing."""
        return getattr(self, "given", frozenset())

    def values(self) -> dict[str, Any]:
        """Every option's value by name (what provenance records)."""
        return {o.name: getattr(self, o.name) for o in options_of(type(self))}

    def check(self) -> None:
        """Each value against its declaration (one of the choices, a finite number in range),
        then every part's cross-option checks (`check_own`), bases first."""
        for opt in options_of(type(self)):
            value = getattr(self, opt.name)
            for item in (value if opt.many and isinstance(value, list) else [value]):
                _check_value(opt, item)
        done = set()
        for klass in reversed(type(self).__mro__):
            own = klass.__dict__.get("check_own")
            if own is not None and own not in done:
                done.add(own)
                own(self)


def spelled(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Values keyed by option name, where a key may also be any spelling of the option's flags
    (`lr` for --lr, `lora-rank` for --lora-rank), as --config files allow. A name given twice,
    under two spellings, is refused."""
    aliases = {}
    for opt in options_of(cls):
        for flag in (*opt.flags, opt.long):
            if flag.startswith("--"):
                aliases[flag[2:].replace("-", "_")] = opt.name
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = key if key in {o.name for o in options_of(cls)} else aliases.get(key.replace("-", "_"), key)
        if name in out:
            raise BadInput(f"option '{name}' is given twice (as '{key}' too)", "keep one of them")
        out[name] = value
    return out


def _check_value(opt: Opt, value: Any) -> None:
    if value is None or value is REQUIRED:
        return
    if opt.choices and value not in opt.choices:
        raise BadInput(f"{opt.long} {value!r}: not one of {', '.join(opt.choices)}")
    if opt.type == "float":
        try:
            opt.number(value)
        except ValueError as exc:
            raise BadInput(f"{opt.long} {exc}") from None
    elif opt.type == "int" and not isinstance(value, bool) and isinstance(value, int):
        if (opt.min is not None and value < opt.min) or (opt.max is not None and value > opt.max):
            raise BadInput(f"{opt.long} {value}: must be {opt.range_text().replace('above', 'at least')}")
