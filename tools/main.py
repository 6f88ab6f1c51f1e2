"""The `lmforge` command: the root app, its command groups, and the error-to-exit-code policy.

Exit codes: 0 ok; 2 bad input or usage (one line on stderr); 1 runtime failure; 130 interrupted
(Ctrl-C), 143 stopped by SIGTERM, 129 by SIGHUP (after the same clean-up as Ctrl-C); 141, quietly,
when the reader of stdout went away (a broken pipe), as for a tool killed by SIGPIPE.
A traceback is shown only with --debug or LMFORGE_DEBUG=1.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
import threading

import typer
from lmforge.shared import __version__
from lmforge.shared.core import log
from lmforge.shared.core.catalog import ROOT
from lmforge.shared.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    BadInput,
    LmforgeError,
    Terminated,
    no_space,
)

from . import adapter, board, completion, data, evaluation, model, run, serve, train
from ._cli import command, declared, group

app = group("Fine-tune large language models with small composable tools.\n\n"
            "Each command does one job, reads Arrow datasets or checkpoint directories, and writes one.")
app.add_typer(data.app, name="data")
app.add_typer(train.app, name="train")
app.add_typer(adapter.app, name="adapter")
app.add_typer(model.app, name="model")
app.add_typer(evaluation.app, name="eval")
command(app, "serve")(serve.serve)
command(app, "chat")(serve.chat)
command(app, "completion")(completion.completion)
command(app, "board")(board.board)
command(app, "run")(run.run)


def _version(value: bool) -> None:
    if value:
        print(f"lmforge {__version__}")
        raise typer.Exit()


@app.callback()
@declared("lmforge", ROOT, version=dict(callback=_version, is_eager=True))
def root(version, debug, quiet) -> None:
    # plain bools (catalog.ROOT): typer coerces any other annotation through pydantic, ~90 ms on every `--help`
    log.set_debug(debug)
    if quiet:
        log.set_quiet(True)


def usage_line(exc) -> str:
    """A usage error (click's, vendored by typer) as the one line `lmforge` prints (also the board's)."""
    ctx = getattr(exc, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    # typer validates through pydantic, whose messages carry a "Value error, " prefix
    return exc.format_message().replace("Value error, ", "") + where


def _error(text: str) -> None:
    print(f"error: {' '.join(text.split())}", file=sys.stderr, flush=True)


_PATH_ERRORS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                errno.ENAMETOOLONG}


def _unexpected(exc: BaseException) -> int:
    if log.debug():
        import traceback

        traceback.print_exc()
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    _error(f"{type(exc).__name__}: {first}" + ("" if log.debug() else " (run with --debug for the traceback)"))
    return EXIT_FAILURE


class _ClosedStdout(io.RawIOBase):
    """Stands in for a stdout the shell closed (`>&-`): writing to it is a one-line usage error."""

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise BadInput("stdout is closed (>&-)", "redirect it to a file or a pipe, or pass -o FILE")


def _reopen_closed_standard_streams() -> None:
    """A process started with stdin, stdout or stderr closed would hand the next file it opens the
    missing number (0, 1 or 2), and Python sets sys.stdin/stdout to None. Fill the gap with
    /dev/null: a closed stdin reads as empty input; a closed stdout refuses writes, clearly."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)   # the lowest free descriptor: this one
            if fd == 0:
                sys.stdin = open(0, closefd=False)
            elif fd == 1:
                sys.stdout = io.TextIOWrapper(_ClosedStdout(), write_through=True)
            else:
                sys.stderr = open(2, "w", closefd=False)
    if sys.stdin is None:
        sys.stdin = open(os.devnull)


def _signals_raise() -> dict:
    """SIGTERM and SIGHUP behave like Ctrl-C: raised as an exception where the program is, so
    atomic writes and unfinished runs are cleaned up; the exit code is then 128 + the signal."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def raise_terminated(signum, frame):
        raise Terminated(signum)

    return {sig: signal.signal(sig, raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}


def main(argv: list[str] | None = None) -> None:
    _reopen_closed_standard_streams()
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else argv
    previous_handlers = _signals_raise()
    try:
        result = command.main(args=args, prog_name="lmforge", standalone_mode=False)
        code = result if isinstance(result, int) else 0
        if code == EXIT_INTERRUPTED:   # Typer turned Ctrl-C (KeyboardInterrupt) into a bare exit 130
            _error("interrupted")
    except typer.TyperException as exc:  # click's usage errors, vendored by typer
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(exc.format_message(), file=sys.stderr)
            code = EXIT_BAD_INPUT
        else:
            _error(usage_line(exc))
            code = getattr(exc, "exit_code", EXIT_BAD_INPUT)
    except typer.Abort:
        _error("aborted")
        code = EXIT_FAILURE
    except LmforgeError as exc:
        if log.debug():
            import traceback

            traceback.print_exc()
        _error(exc.one_line())
        code = exc.exit_code
    except Terminated as exc:
        _error(f"stopped by {signal.Signals(exc.signum).name}")
        code = 128 + exc.signum
    except KeyboardInterrupt:
        _error("interrupted")
        code = EXIT_INTERRUPTED
    except RecursionError:
        _error("the input is nested too deeply to read; flatten it (JSON nested hundreds of levels deep)")
        code = EXIT_BAD_INPUT
    except BrokenPipeError:
        code = _reader_gone()
    except SystemExit as exc:
        # click turns a broken pipe (EPIPE) into a bare sys.exit(1), the error silently lost
        cause = exc.__context__
        if not (isinstance(cause, OSError) and cause.errno == errno.EPIPE):
            raise
        code = _reader_gone()
    except OSError as exc:  # the file system said no: name the path and the reason, no traceback
        if exc.errno == errno.ENOSPC and not log.debug():
            from lmforge.shared.core.rundir import written_as

            where = f"{written_as(str(exc.filename))}: " if exc.filename else ""
            _error(f"{where}no space left on device; free some space and run again")
            code = EXIT_FAILURE
        elif log.debug() or not (exc.filename and exc.strerror):
            code = _unexpected(exc)
        else:
            from lmforge.shared.core.rundir import written_as

            path = written_as(str(exc.filename))  # not the temporary sibling an atomic write used
            _error(f"{path}: {exc.strerror.lower()}; check the path, its permissions and free space")
            # a path the user gave that cannot be used is bad input; a full disk or I/O error is not
            code = EXIT_BAD_INPUT if exc.errno in _PATH_ERRORS else EXIT_FAILURE
    except MemoryError:
        _error("out of memory; use smaller batches or a smaller cutoff")
        code = EXIT_FAILURE
    except Exception as exc:  # a bug or a library failure: short line unless --debug
        code = _known_failure(exc) or _unexpected(exc)
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - a closed or broken stdout was reported above
        pass
    sys.exit(code)


def _reader_gone() -> int:
    """The reader of stdout went away (`| head`): stop quietly, as a Unix tool killed by SIGPIPE
    would, with the shell's code for that (128 + SIGPIPE = 141) and no error line."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())   # nothing more reaches the closed pipe (the final flush included)
    except (OSError, ValueError):
        pass
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _known_failure(exc: Exception) -> int | None:
    """Library errors whose cause is known: one line that says what to do, not the library's words."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if log.debug():
        return None
    if no_space(exc):   # a full disk, whatever the library made of it (not a corrupt file)
        _error(f"no space left on device ({type(exc).__name__}: {text[:200]}); free some space and run again")
        return EXIT_FAILURE
    if type(exc).__name__ == "SafetensorError" and "while serializing" in text.lower():   # writing, not reading
        _error(f"writing a safetensors weights file failed ({text[:200]}); check the free space and run again")
        return EXIT_FAILURE
    if type(exc).__name__ == "SafetensorError":   # safetensors: a truncated or garbage weights file
        _error(f"a safetensors weights file cannot be read ({text}); it is truncated or corrupt: "
               "save or download the model again")
        return EXIT_BAD_INPUT
    if "inline_container" in text or "PytorchStreamWriter failed" in text or "file write failed" in text:
        _error("writing a checkpoint failed (is the disk full?); free some space and run again with --resume")
        return EXIT_FAILURE
    return None


if __name__ == "__main__":
    main()
