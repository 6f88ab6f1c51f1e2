"""Messages and progress on stderr; stdout is kept for data, paths and --json results.

`--quiet` silences info and progress (warnings and errors still show). When stderr is a
terminal, progress is a rich bar; otherwise (CI logs, files, pipes) it is a plain line every
LMFORGE_LOG_INTERVAL seconds (default 10) and a final summary, with no animation.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

_quiet = False
_debug = False


def set_quiet(value: bool) -> None:
    global _quiet
    _quiet = bool(value)


def set_debug(value: bool) -> None:
    global _debug
    _debug = bool(value)


def quiet() -> bool:
    return _quiet


def debug() -> bool:
    return _debug or os.environ.get("LMFORGE_DEBUG", "") not in ("", "0", "false", "no")


def info(message: str) -> None:
    if not _quiet:
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _interactive() -> bool:
    return not _quiet and sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def _fmt_num(value: float) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}"


def _fmt_rate(rate: float) -> str:
    """Rates of very different sizes read well: 12,345 / 12.3 / 0.33."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 1 else f"{rate:.2g}"


def _fmt_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Counts work done. `advance(n, **fields)` adds n units and updates the shown fields.

    Used as a context manager; the summary line on exit says how much was done and how fast.
    """

    def __init__(self, description: str, total: int | None = None, unit: str = "rows"):
        self.description = description
        self.total = total
        self.unit = unit
        self.done = 0
        self.base = 0   # units done before this process started (a resumed run): not in the rate
        self.fields: dict[str, object] = {}
        self._start = time.monotonic()
        self._last_line = self._start
        self._interval = float(os.environ.get("LMFORGE_LOG_INTERVAL", "10"))
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> "Progress":
        if _interactive():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[extra]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, extra="")
        return self

    def _extra(self) -> str:
        return "  ".join(f"{k} {_fmt_num(v) if isinstance(v, (int, float)) else v}"
                         for k, v in self.fields.items())

    def resume_at(self, done: int) -> None:
        """Start counting at `done` units already done (a resumed run): the rate and the time
        left are this run's own, not the whole count over this run's seconds."""
        self.done = self.base = done
        if self._bar is not None and self._task is not None:
            self._bar.reset(self._task, total=self.total, completed=done)

    def rate(self) -> float:
        return (self.done - self.base) / max(time.monotonic() - self._start, 1e-9)

    def advance(self, n: int = 1, **fields: object) -> None:
        self.done += n
        self.fields.update(fields)
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=n, extra=self._extra())
            return
        now = time.monotonic()
        if not _quiet and now - self._last_line >= self._interval:
            self._last_line = now
            of = f"/{self.total:,}" if self.total else ""
            rate = self.rate()
            eta = f", {_fmt_seconds((self.total - self.done) / rate)} left" if self.total and rate > 0 else ""
            extra = self._extra()
            info(f"{self.description}: {self.done:,}{of} {self.unit} ({_fmt_rate(rate)} {self.unit}/s{eta})"
                 + (f"  {extra}" if extra else ""))

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            self._bar.stop()
        if exc_type is None:
            elapsed = time.monotonic() - self._start
            info(f"{self.description}: {self.done:,} {self.unit} in {elapsed:.1f}s"
                 f" ({_fmt_rate(self.rate())} {self.unit}/s)")


class captured:
    """Send everything written to stdout/stderr (file descriptors 1 and 2, so C extensions and
    child threads too) to a temporary file while a chatty library works. On an error the last
    lines are replayed to stderr; with --debug nothing is captured."""

    def __init__(self, label: str):
        self.label = label

    def __enter__(self) -> "captured":
        if debug():
            self.file = None
            return self
        import tempfile

        sys.stdout.flush()
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = (os.dup(1), os.dup(2))
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)
        # and Python-level writers, in case sys.stdout/stderr are not fds 1 and 2 (test runners)
        self.streams = (sys.stdout, sys.stderr)
        sys.stdout = sys.stderr = open(os.dup(self.file.fileno()), "w", encoding="utf-8", errors="replace")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.file is None:
            return
        sys.stdout.flush()  # left open: a library may have kept a reference to it
        sys.stdout, sys.stderr = self.streams
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        if exc_type is not None:
            self.file.seek(0)
            tail = self.file.read().decode("utf-8", "replace").splitlines()[-20:]
            if tail:
                print(f"{self.label}: last output before the failure:", file=sys.stderr)
                print("\n".join("  " + line[-300:] for line in tail), file=sys.stderr)
        self.file.close()


def quiet_libraries() -> None:
    """Keep third-party chatter (progress bars, CPU-fallback notices) off stderr unless --debug."""
    if debug():
        return
    import logging
    import warnings

    for name in ("bitsandbytes", "bitsandbytes.backends.cpu.ops", "DeepSpeed", "deepspeed", "accelerate",
                 "torch.distributed", "peft", "torchao", "torch.utils._pytree", "gptqmodel"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda_visible() else "cuda")

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # peft imports GPTQModel (when installed) as it wraps layers, and GPTQModel prints a banner
    # on import: import it now, with its output captured.
    import importlib.util
    import sys

    if "gptqmodel" not in sys.modules and importlib.util.find_spec("gptqmodel") is not None:
        with captured("gptqmodel"):
            try:
                import gptqmodel  # noqa: F401
            except Exception:  # noqa: BLE001 - a broken optional extra must not stop other work
                pass


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def stdout_guard():
    """Everything printed while training goes to stderr, so stdout carries only the output path."""
    import contextlib
    import os
    import sys

    @contextlib.contextmanager
    def guard():
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
        real = sys.stdout
        sys.stdout = sys.stderr
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stdout = real
            os.dup2(saved, 1)
            os.close(saved)

    return guard()
