"""One run's steps, run one after another as subprocesses (argument lists, no shell), by a process
detached from the board (its own session and process group), so a run outlives the browser and
the board. Its state is RUN/board.json (rewritten atomically after each change), its log
RUN/run.log (each command line, then that command's stderr).

    python -m lmforge.shared.board.runner RUN_DIR

Stopping is SIGTERM to the process group: the running command gets it too (lmforge train exits
143 keeping its last checkpoint), and the step and the run are marked stopped."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.shared.core.rundir import write_json

STATE = "board.json"
LOG = "run.log"
STOPPED = (130, 143, 129, -15, -2, -1)


def lmforge_command() -> list[str]:
    """How to start `lmforge` from this Python: its script beside the interpreter, else the module."""
    script = Path(sys.executable).parent / "lmforge"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lmforge.tools.main"]


def read_state(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / STATE).read_text())


def error_line(text: str) -> str | None:
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    return lines[-1][len("error: "):] if lines else None


def run(run_dir: Path) -> int:
    state = read_state(run_dir)
    state.update(pid=os.getpid(), status="running", started=state.get("started") or time.time())
    write_json(run_dir / STATE, state)
    stopping = {"now": False}

    def stop(signum, frame):   # the command in the same group got the signal too
        stopping["now"] = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    workspace = Path(state["workspace"])
    env = {**os.environ, "LMFORGE_LOG_INTERVAL": os.environ.get("LMFORGE_BOARD_LOG_INTERVAL", "1")}
    env.pop("LMFORGE_DEBUG", None)
    final = "done"
    for step in state["steps"]:
        if step.get("status") == "done":
            continue
        if stopping["now"]:
            final = "stopped"
            break
        argv = lmforge_command() + step["argv"][1:]
        with open(run_dir / LOG, "ab") as log:
            log.write(f"$ {shlex.join(step['argv'])}\n".encode())
            start = log.tell()
        step.update(status="running", started=time.time(), ended=None, rc=None, error=None)
        write_json(run_dir / STATE, state)
        stdout_path = run_dir / step["stdout"] if step.get("stdout") else None
        if stdout_path is not None:
            stdout_path.parent.mkdir(parents=True, exist_ok=True)
        with open(run_dir / LOG, "ab") as log, \
                open(stdout_path if stdout_path is not None else os.devnull, "wb") as out:
            proc = subprocess.Popen(argv, cwd=workspace, stdin=subprocess.DEVNULL, stdout=out, stderr=log, env=env)
            # the board adopts the step from its pid should this runner die before it (kill -9)
            step.update(pid=proc.pid, log_offset=start)
            write_json(run_dir / STATE, state)
            if stopping["now"]:   # stopped while it was starting: it missed the group's signal
                proc.send_signal(signal.SIGTERM)
            while True:
                try:
                    rc = proc.wait()
                    break
                except InterruptedError:
                    continue
        with open(run_dir / LOG, "rb") as written:
            written.seek(start)
            error = error_line(written.read().decode(errors="replace"))
        step.update(rc=rc, ended=time.time(), error=error,
                    status="done" if rc == 0 else "stopped" if rc in STOPPED or stopping["now"] else "failed")
        write_json(run_dir / STATE, state)
        if rc != 0:
            final = step["status"]
            break
    state.update(status=final, ended=time.time())
    write_json(run_dir / STATE, state)
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
