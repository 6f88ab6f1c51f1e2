"""Command-line plumbing every lmforge command shares (not a command itself).

- `Command`: the click/Typer command class of every command. It adds --config, --debug and
  --quiet to each command and remembers the invocation for provenance.
- `--config FILE.yaml` fills option defaults from the file (`ctx.default_map`), so flags given on
  the command line win. Unknown keys are refused.
- `main()` in main.py turns exceptions into one-line errors and exit codes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from lmforge.shared.core import log
from lmforge.shared.core.errors import BadInput
from typer.core import TyperCommand, TyperGroup

_invocation: dict[str, Any] = {"command": "", "options": {}}


def _config_callback(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> None:
    if value is None:
        return
    from lmforge.shared.core.config import load_config

    values = load_config(value)
    known = {p.name for p in ctx.command.params if p.expose_value}
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


def _common_params() -> list:
    """--config/--debug/--quiet as Typer builds them, taken from a throwaway command."""
    probe = typer.Typer(add_completion=False)

    @probe.command()
    def _probe(
        config: Annotated[Optional[Path], typer.Option(
            "--config", is_eager=True, expose_value=False, callback=_config_callback,
            help="YAML file of option values (keys are option names); flags override it.",
            rich_help_panel="Common")] = None,
        debug: Annotated[bool, typer.Option(
            "--debug", expose_value=False, callback=_debug_callback,
            help="Show tracebacks (also LMFORGE_DEBUG=1).", rich_help_panel="Common")] = False,
        quiet: Annotated[bool, typer.Option(
            "--quiet", "-q", expose_value=False, callback=_quiet_callback,
            help="No progress or info messages on stderr.", rich_help_panel="Common")] = False,
    ) -> None:
        pass

    return typer.main.get_command(probe).params


_COMMON = _common_params()


class Command(TyperCommand):
    def __init__(self, *args: Any, params: list | None = None, **kwargs: Any) -> None:
        super().__init__(*args, params=[*(params or []), *_COMMON], **kwargs)

    def invoke(self, ctx: typer.Context) -> Any:
        _invocation["command"] = " ".join(ctx.command_path.split()[1:])
        _invocation["options"] = dict(ctx.params)
        return super().invoke(ctx)


class Group(TyperGroup):
    """A command group whose --help flag defaults to False, not None: typer coerces a None through
    pydantic, whose import (~90 ms) would then slow every `lmforge GROUP COMMAND --help`."""

    def get_help_option(self, ctx: typer.Context):
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


def print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_path(path: str | Path) -> None:
    """A tool that makes a directory prints its path, and only that, on stdout."""
    sys.stdout.write(f"{path}\n")
    sys.stdout.flush()


REQUIRED = object()


def with_options(*groups: list[tuple[str, Any, Any]]):
    """Give a `def fn(**options)` command the options of `groups`, each a list of
    (name, Annotated[type, typer.Option(...)], default). Shared option sets are written once."""
    import inspect

    def decorate(fn):
        params = []
        for group in groups:
            for name, annotation, default in group:
                params.append(inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                    default=inspect.Parameter.empty if default is REQUIRED else default))
        fn.__signature__ = inspect.Signature(params)
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return fn

    return decorate
