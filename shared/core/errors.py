"""The two kinds of failure a tool reports, and their exit codes.

BadInput (exit 2) is the user's to fix: a malformed file, a wrong option, data of the wrong kind.
Its message names what is wrong and where (file, row or line); its hint says what to do. Any
other exception is a runtime failure (exit 1). The command line prints either as one line on
stderr; a traceback appears only with --debug or LMFORGE_DEBUG=1.
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130   # Ctrl-C (SIGINT); SIGTERM gives 143 and SIGHUP 129 (128 + the signal)


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the program is, like Ctrl-C's KeyboardInterrupt, so the
    same clean-up runs (atomic outputs removed, unfinished runs undone) before the exit. Not an
    Exception (library code that catches those lets it through), nor a KeyboardInterrupt (which
    Typer turns into a bare exit 130)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class LmforgeError(Exception):
    """A failure with a message meant for the user (no traceback needed)."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint)  # both in args, so the error survives pickling (worker pools)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.one_line()

    def one_line(self) -> str:
        text = self.message if not self.hint else f"{self.message}; {self.hint}"
        return " ".join(text.split("\n"))


class BadInput(LmforgeError):
    """Bad input or usage: the user can fix it. Exit code 2."""

    exit_code = EXIT_BAD_INPUT


class RunFailure(LmforgeError):
    """A runtime failure worth a clean message (out of memory, a library refusing). Exit code 1."""

    exit_code = EXIT_FAILURE


def close_names(name: str, known: list[str] | tuple[str, ...], n: int = 3) -> str:
    """'did you mean ...' text for an unknown name, or the full list when nothing is close."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=n, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "known: " + ", ".join(sorted(known))


def no_space(exc: BaseException | None) -> bool:
    """Whether a failure is a full disk, however the library reports it: OSError ENOSPC, or the
    words of a library that wraps it (safetensors' Rust "StorageFull", torch's "file write failed"
    with errno 28), here or in the exception it was raised from."""
    import errno

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        text = str(exc)
        if any(words in text for words in ("No space left on device", "StorageFull", "os error 28")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
