"""`lmforge board`: a local web interface that composes, shows and runs the commands."""

from __future__ import annotations

import sys

from ._cli import declared, serve_until_stopped


def usage_error(argv: list[str]) -> str | None:
    """A command line through the command's own option parsing (Typer/click, as `lmforge` parses
    it, nothing run): None when it parses, else the one line `lmforge` would print for it."""
    import typer

    from .main import app, usage_line

    command = typer.main.get_command(app)
    try:
        ctx = command.make_context("lmforge", list(argv), resilient_parsing=False)
        while hasattr(command, "resolve_command"):   # a group: descend into the named command
            rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
            name, sub, rest = command.resolve_command(ctx, rest)
            if sub is None:
                return f"no command {name!r}"
            ctx = sub.make_context(name or "", rest, parent=ctx)
            command = sub
    except typer.TyperException as exc:   # click's usage errors, vendored by typer
        return " ".join(usage_line(exc).split())   # as main() prints it
    except Exception as exc:  # noqa: BLE001 - an option callback refusing a value
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


@declared("board")
def board(o) -> None:
    """Fine-tune from a web page: configure, preview data, run, monitor, evaluate and chat."""
    host, port, workspace, token = o.host, o.port, o.workspace, o.token
    from lmforge.shared.board.guard import check_token, new_token
    from lmforge.shared.core.errors import BadInput
    from lmforge.shared.infer.app import check_port

    if token is not None:
        check_token(token)
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise BadInput(f"--host {host} listens beyond this machine", "give --token TOKEN (or LMFORGE_BOARD_TOKEN)")
    if not workspace.is_dir():
        raise BadInput(f"--workspace {workspace}: not a directory", "create it, or name another")
    check_port(host, port)
    from lmforge.shared.board.server import Board, create_app

    state = Board(workspace, token=token or new_token(), check=usage_error, host=host, port=port)
    shown = f"[{host}]" if ":" in host else host
    # the address with its token is how the browser gets in: printed whole, as Jupyter prints its own
    # (even with --quiet: without it nobody gets in)
    print(f"board: open http://{shown}:{port}/?token={state.token} (workspace {state.ws.root})", file=sys.stderr,
          flush=True)
    serve_until_stopped("board", create_app(state), host, port)
