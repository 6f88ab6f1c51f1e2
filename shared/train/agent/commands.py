"""Running one external command for a tool call: bytes in on stdin, capped bytes out, a deadline.

The command is an argv list fixed by the user (never a shell line built from the model's text:
what the model wrote reaches the command only as JSON on its stdin). Each run gets its own
process group, killed whole when it overruns its time or its output cap, and reaped in every
case, so a tool that forks a daemon or hangs never outlives its call.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass


@dataclass
class Ran:
    """What a run produced: stdout up to the cap, the tail of stderr, and how it ended."""
    stdout: bytes
    stderr: bytes
    code: int | None          # exit status; None when it was stopped (timeout or output cap)
    timed_out: bool = False
    cut: bool = False          # stdout passed the cap; the command was stopped there


STDERR_KEEP = 4096   # bytes of stderr kept (its tail names the failure)


def run(argv: list[str], data: bytes, *, cwd: str | None, timeout: float, cap: int,
        env: dict[str, str] | None = None) -> Ran:
    """Run argv with `data` on stdin. Raises OSError only when the program cannot start."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=cwd, env=env, start_new_session=True)
    try:
        return _talk(proc, data, timeout, cap)
    finally:
        stop(proc)


def _talk(proc: subprocess.Popen, data: bytes, timeout: float, cap: int) -> Ran:
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + timeout
    out, err = bytearray(), bytearray()
    pending = memoryview(data)
    sel = selectors.DefaultSelector()
    try:
        for pipe in (proc.stdout, proc.stderr):
            os.set_blocking(pipe.fileno(), False)
            sel.register(pipe, selectors.EVENT_READ)
        if pending:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        open_reads = 2
        while open_reads:
            left = deadline - time.monotonic()
            if left <= 0:
                return Ran(bytes(out[:cap]), bytes(err[-STDERR_KEEP:]), None, timed_out=True)
            ready = sel.select(min(left, 0.2))
            if not ready and proc.poll() is not None:
                # it exited, yet something it started still holds the pipes: what it wrote is read
                break
            for key, _ in ready:
                source = key.fileobj
                if source is proc.stdin:
                    try:
                        sent = os.write(proc.stdin.fileno(), pending[:65536])
                    except (BrokenPipeError, OSError):   # it stopped reading: the rest is not needed
                        sent = len(pending)
                    pending = pending[sent:]
                    if not pending:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(source)
                    open_reads -= 1
                elif source is proc.stdout:
                    out += chunk
                    if len(out) > cap:
                        return Ran(bytes(out[:cap]), bytes(err[-STDERR_KEEP:]), None, cut=True)
                else:
                    err += chunk
                    del err[:-STDERR_KEEP]
        # both pipes closed: the command is ending (or left a child holding nothing); wait for it
        left = max(0.0, deadline - time.monotonic())
        try:
            code = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            return Ran(bytes(out), bytes(err[-STDERR_KEEP:]), None, timed_out=True)
        return Ran(bytes(out), bytes(err[-STDERR_KEEP:]), code)
    finally:
        sel.close()


def stop(proc: subprocess.Popen) -> None:
    """Kill the command's whole process group and reap it; close its pipes."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        try:
            if pipe is not None:
                pipe.close()
        except OSError:
            pass
