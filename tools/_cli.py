"""Command-line plumbing every lmforge command shares (not a command itself).

- `Command`: the click/Typer command class of every command. It adds --config, --debug and
  --quiet to each command and remembers the invocation for provenance.
- `--config FILE.yaml` fills option defaults from the file (`ctx.default_map`), so flags given on
  the command line win. Unknown keys are refused.
- `main()` in main.py turns exceptions into one-line errors and exit codes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from lmforge.shared.core import log
from lmforge.shared.core.errors import BadInput
from lmforge.shared.core.options import Opt
from typer.core import TyperCommand, TyperGroup

_invocation: dict[str, Any] = {"command": "", "options": {}, "given": set()}

# --help into a pipe or a file (a CI log, `| less`): rich would lay it out for 80 columns and cut
# long flags and help lines; 120 holds every command's (TERMINAL_WIDTH, typer's own setting, still wins).
# A closed stdout (`>&-`) leaves sys.stdout None: the command itself says so in one line.
if not os.environ.get("TERMINAL_WIDTH") and sys.stdout is not None and not sys.stdout.isatty():
    import typer.rich_utils

    typer.rich_utils.MAX_WIDTH = 120


def _config_callback(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> None:
    if value is None:
        return
    from lmforge.shared.core.config import load_config, option_key

    known = {p.name for p in ctx.command.params if p.expose_value}
    # a key may also be a flag's spelling (`lr` for --lr): the option it names
    spelled = {option_key(flag): p.name for p in ctx.command.params if p.expose_value
               for flag in p.opts if flag.startswith("--")}
    values: dict[str, object] = {}
    for key, setting in load_config(value).items():
        name = key if key in known else spelled.get(key, key)
        if name in values:
            raise BadInput(f"config file {value}: '{name.replace('_', '-')}' is set twice", "keep one of the keys")
        values[name] = setting
    unknown = sorted(set(values) - known)
    if unknown:
        from lmforge.shared.core.errors import close_names

        names = sorted(n.replace("_", "-") for n in known)
        first = unknown[0].replace("_", "-")
        raise BadInput(f"config file {value}: '{ctx.command_path}' has no option '{first}'",
                       close_names(first, names))
    ctx.default_map = {**(ctx.default_map or {}), **values}


def _debug_callback(value: bool) -> None:
    if value:
        log.set_debug(True)


def _quiet_callback(value: bool) -> None:
    if value:
        log.set_quiet(True)


_COMMON: list = []


def _common() -> list:
    if not _COMMON:
        _COMMON.extend(_common_params())
    return _COMMON


def _common_params() -> list:
    """--config/--debug/--quiet (catalog.EVERY_COMMAND) as Typer builds them, from a throwaway command."""
    import inspect

    from lmforge.shared.core.catalog import EVERY_COMMAND

    behaviour: dict[str, dict[str, Any]] = {"config": dict(is_eager=True, callback=_config_callback),
                 "debug": dict(callback=_debug_callback), "quiet": dict(callback=_quiet_callback)}
    probe = typer.Typer(add_completion=False)

    def _probe(**_: Any) -> None:
        pass

    params = []
    for opt in EVERY_COMMAND:
        annotation, default = typer_parameter(opt, expose_value=False, **behaviour[opt.name])
        params.append(inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=default))
    _probe.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    probe.command()(_probe)
    return typer.main.get_command(probe).params




class Command(TyperCommand):
    def __init__(self, *args: Any, params: list | None = None, **kwargs: Any) -> None:
        super().__init__(*args, params=[*(params or []), *_common()], **kwargs)

    def invoke(self, ctx: Any) -> Any:  # a click Context (typer vendors click; its class is private)
        _invocation["command"] = " ".join(ctx.command_path.split()[1:])
        _invocation["options"] = dict(ctx.params)
        # what the user chose (command line, --config, environment), as opposed to defaults
        _invocation["given"] = {name for name in ctx.params
                                if ctx.get_parameter_source(name) is not None
                                and ctx.get_parameter_source(name).name not in ("DEFAULT",)}
        return super().invoke(ctx)


class Group(TyperGroup):
    """A command group whose --help flag defaults to False, not None: typer coerces a None through
    pydantic, whose import (~90 ms) would then slow every `lmforge GROUP COMMAND --help`."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None and option.default is None:
            option.default = False
        return option


def group(help: str, **kwargs: Any) -> typer.Typer:
    return typer.Typer(help=help, cls=Group, no_args_is_help=True, add_completion=False,
                       rich_markup_mode="rich", context_settings={"help_option_names": ["-h", "--help"]},
                       **kwargs)


def command(app: typer.Typer, name: str, **kwargs: Any):
    return app.command(name, cls=Command, **kwargs)


def invocation() -> tuple[str, dict]:
    """The running command ("data align") and its options, for provenance records."""
    return _invocation["command"], dict(_invocation["options"])


def given() -> set[str]:
    """The options of the running command that the user set (on the command line, in --config
    or the environment), as opposed to those left at their defaults: for refusing conflicts."""
    return set(_invocation["given"])


def serve_until_stopped(what: str, app: Any, host: str, port: int) -> None:
    """Run an HTTP app until Ctrl-C or SIGTERM: for a server, the normal way to stop (exit 0, a
    "stopped" line), not an error."""
    import uvicorn

    from lmforge.shared.core.errors import Terminated

    try:
        uvicorn.run(app, host=host, port=port, log_level="warning" if not log.debug() else "info",
                    access_log=log.debug())
    except (KeyboardInterrupt, Terminated):
        pass
    log.info(f"{what}: stopped")


def print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_path(path: str | Path) -> None:
    """A tool that makes a directory prints its path, and only that, on stdout."""
    sys.stdout.write(f"{path}\n")
    sys.stdout.flush()


def typer_parameter(opt: Opt, **behaviour: Any) -> tuple[Any, Any]:
    """An option's declaration as Typer reads it: (Annotated[type, typer.Option(...)], default).
    `behaviour`: what only the command line has (callbacks, eagerness)."""
    import inspect
    from typing import Literal

    kind: Any = Literal[opt.choices] if opt.choices else _TYPES[opt.type]
    if opt.many:
        if opt.choices:   # Typer cannot take a list of Literal values: each is checked by a callback
            kind = str
            behaviour = {"callback": _each_one_of(opt), **behaviour}
        kind = list[kind]
    if opt.default is None:
        kind = Optional[kind]
    low, high = opt.min, opt.max
    if opt.type == "float":
        # every float, from the command line or --config alike, is finite and in range (Opt.number);
        # Typer shows a closed range in --help, an open bound is named by the error only
        behaviour = {"parser": opt.number, **behaviour}
        low, high = (None if opt.min_open else low), (None if opt.max_open else high)
    if opt.argument:
        info = typer.Argument(help=opt.help, show_default=opt.show_default, rich_help_panel=opt.panel)
    else:
        info = typer.Option(*opt.flags, help=opt.help, rich_help_panel=opt.panel, min=low, max=high,
                            envvar=opt.envvar, show_default=opt.show_default, **behaviour)
    return Annotated[kind, info], inspect.Parameter.empty if opt.required else opt.default


def _each_one_of(opt: Opt):
    def check(values: list[str] | None) -> list[str] | None:
        for value in values or []:
            if value not in opt.choices:
                raise typer.BadParameter(f"'{value}' is not one of {', '.join(map(repr, opt.choices))}.")
        return values

    return check


_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool, "path": Path}


def declared(name: str, declarations: tuple[Opt, ...] | None = None, **behaviour: dict[str, Any]):
    """Give a command the options its class declares (lmforge.shared.core.catalog: "train sft" ->
    TrainSFT). The function takes one argument, that class's object, made from the values the
    command line (or --config, or the environment) gave and checked (its `check()`); it then
    calls the use case and prints. With `declarations` (the root's --version, --debug, --quiet) the
    function takes those as keyword arguments instead. `behaviour`: per option, what only the
    command line has (callbacks)."""
    import functools
    import inspect

    from lmforge.shared.core import catalog

    typed = declarations is None
    declared_options = catalog.options(name) if declarations is None else declarations

    def decorate(fn):
        params = []
        for opt in declared_options:
            annotation, default = typer_parameter(opt, **behaviour.get(opt.name, {}))
            params.append(inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                            default=default))
        if typed:
            cls = catalog.declaration_of(name)

            @functools.wraps(fn)
            def call(**values: Any) -> Any:
                options = cls(**values)
                options.given = frozenset(given())   # type: ignore[attr-defined]
                options.check()
                return fn(options)

            target = call
        else:
            target = fn
        target.__signature__ = inspect.Signature(params)   # type: ignore[attr-defined]
        target.__annotations__ = {p.name: p.annotation for p in params}
        target.lmforge_command = name   # type: ignore[attr-defined]
        return target

    return decorate
