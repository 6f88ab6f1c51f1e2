"""Runs on disk: WORKSPACE/runs/RUN/ holds board.json (the steps, their command lines and status,
the runner's pid), run.log, the data between steps, model/ (the trained checkpoint) and evals/.
The board keeps nothing in memory that it cannot read back, so it reattaches after a restart."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.shared.board.runner import LOG, STATE, error_line, read_state
from lmforge.shared.board.workspace import RUN_ID, Workspace
from lmforge.shared.core.errors import BadInput
from lmforge.shared.core.rundir import LOG as TRAINER_LOG
from lmforge.shared.core.rundir import RECORD, pid_alive, write_json

ACTIVE = ("starting", "running")
_PROGRESS = re.compile(r"train: ([\d,]+)/([\d,]+) steps")


class Runs:
    def __init__(self, ws: Workspace):
        self.ws = ws
        self.root = ws.root / "runs"
        self.children: dict[str, subprocess.Popen] = {}   # runners this board started (reaped here)

    # ------------------------------------------------------------------ making and starting
    def new_id(self, stage: str, method: str, name: str | None = None) -> str:
        base = name.strip() if name and name.strip() else time.strftime("%Y%m%d-%H%M%S") + f"-{stage}-{method}"
        if not RUN_ID.match(base):
            raise BadInput(f"run name {base!r}: letters, digits, '.', '_' and '-' only", "pick another name")
        run_id, n = base, 1
        while (self.root / run_id).exists():
            n += 1
            run_id = f"{base}-{n}"
        return run_id

    def create(self, run_id: str, steps: list[dict[str, Any]], config: dict[str, Any], kind: str = "train",
               directory: Path | None = None) -> Path:
        run_dir = directory or self.root / run_id
        run_dir.mkdir(parents=True, exist_ok=False)
        state = {"id": run_id, "kind": kind, "created": time.time(), "workspace": str(self.ws.root),
                 "config": config, "status": "starting", "pid": None,
                 "steps": [{**s, "status": "pending", "rc": None, "error": None} for s in steps]}
        write_json(run_dir / STATE, state)
        return run_dir

    def start(self, run_dir: Path) -> None:
        with open(run_dir / LOG, "ab") as log:
            child = subprocess.Popen([sys.executable, "-m", "lmforge.shared.board.runner", str(run_dir)],
                                     cwd=self.ws.root, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=log, start_new_session=True)
        self.children[str(run_dir)] = child
        for _ in range(100):    # until the runner has taken the run (its pid in board.json)
            if read_state(run_dir).get("pid") or child.poll() is not None:
                break
            time.sleep(0.05)

    # ------------------------------------------------------------------ stop, resume
    def stop(self, run_dir: Path) -> dict[str, Any]:
        state = self.state(run_dir)
        if state["status"] not in ACTIVE or not state.get("pid"):
            raise BadInput(f"run {run_dir.name} is {state['status']}, not running", "nothing to stop")
        state["stop_requested"] = True   # an adopted step that then ends unfinished was stopped, not lost
        write_json(run_dir / STATE, state)
        try:   # the runner leads its own process group; a step it left behind is still in that group
            os.killpg(int(state["pid"]), signal.SIGTERM)
        except ProcessLookupError:
            pass
        return state

    def resume(self, run_dir: Path) -> None:
        state = self.state(run_dir)
        if state["status"] in ACTIVE:
            raise BadInput(f"run {run_dir.name} is still running", "stop it first")
        if state["status"] == "done":
            raise BadInput(f"run {run_dir.name} has finished", "start a new run")
        for step in state["steps"]:
            if step["status"] != "done":
                if step["name"].startswith("train ") and "--resume" not in step["argv"]:
                    # from its last checkpoint, or afresh when it stopped before the first one
                    step["argv"] = [*step["argv"], "--resume", "--overwrite"]
                step.update(status="pending", rc=None, error=None)
        state.update(status="starting", pid=None, ended=None, stop_requested=False, adopted=False)
        write_json(run_dir / STATE, state)
        self.start(run_dir)

    # ------------------------------------------------------------------ reading back
    def state(self, run_dir: Path) -> dict[str, Any]:
        state = read_state(run_dir)
        child = self.children.get(str(run_dir))
        if child is not None and child.poll() is not None:
            self.children.pop(str(run_dir), None)
            state = read_state(run_dir)
        if state["status"] in ACTIVE and state.get("pid") and not self._alive(run_dir, int(state["pid"])):
            state = read_state(run_dir)   # it may have just finished
            if state["status"] in ACTIVE:
                state = self._adopt(run_dir, state)
        return state

    def _adopt(self, run_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
        """The runner died without finishing (kill -9, a crash). Its running step may live on: while
        it does, the run is running (adopted: Stop still reaches it through the process group, and
        Resume waits); once it ends, its output says how it went, and the rest of the pipeline
        carries on under a new runner. Without a step to follow, the run is lost."""
        step = next((s for s in state["steps"] if s["status"] == "running"), None)
        runner = int(state["pid"])
        if step is not None and step.get("pid") and _in_group(int(step["pid"]), runner):
            if not state.get("adopted"):
                state["adopted"] = True
                write_json(run_dir / STATE, state)
            return state
        now = time.time()
        if step is None:
            state.update(status="lost", ended=now)   # killed outright (kill -9, a reboot)
        elif self._finished(step):
            step.update(status="done", rc=0, ended=now, error=None)
            if any(s["status"] != "done" for s in state["steps"]):
                state.update(status="starting", pid=None, adopted=False)
                write_json(run_dir / STATE, state)
                self.start(run_dir)
                return read_state(run_dir)
            state.update(status="done", ended=now, adopted=False)
        else:
            stopped = bool(state.get("stop_requested"))
            error = _step_error(run_dir, step) or ("stopped" if stopped else "ended when its runner was killed")
            step.update(status="stopped" if stopped else "failed", rc=None, ended=now, error=error)
            state.update(status=step["status"], ended=now, adopted=False)
        write_json(run_dir / STATE, state)
        return state

    def _finished(self, step: dict[str, Any]) -> bool:
        """A step whose process is gone finished if it wrote its output (whole) after it started."""
        target = self.ws.root / step.get("target", "")
        try:
            if not target.is_file() or target.stat().st_mtime < float(step.get("started") or 0):
                return False
            if target.suffix == ".json":   # a record or a result: written last, and whole
                json.loads(target.read_text())
            return True
        except (OSError, ValueError):
            return False

    def _alive(self, run_dir: Path, pid: int) -> bool:
        child = self.children.get(str(run_dir))
        if child is not None and child.pid == pid:
            return child.poll() is None
        try:   # a runner that died unreaped (a zombie) is not running
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        except (OSError, IndexError):
            pass
        return pid_alive(pid)

    def listing(self) -> list[dict[str, Any]]:
        out = []
        for run_dir in sorted(self.root.glob("*/" + STATE), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                out.append(self.summary(run_dir.parent))
            except (OSError, ValueError, KeyError):
                continue
        return out

    def summary(self, run_dir: Path) -> dict[str, Any]:
        state = self.state(run_dir)
        record = _record(run_dir / "model")
        config = state.get("config") or {}
        return {"id": state["id"], "status": state["status"], "created": state.get("created"),
                "stage": record.get("stage") or config.get("stage"),
                "method": record.get("method") or ((config.get("options") or {}).get(f"train {config.get('stage')}")
                                                   or {}).get("method", "lora"),
                "model": self._shown(record.get("base_model")) or config.get("model"),
                "data": (record.get("data") or {}).get("path") or (config.get("data") or {}).get("files"),
                "metrics": record.get("metrics") or {}, "record": record}

    def _shown(self, path: str | None) -> str | None:
        """A model directory inside the workspace as the command lines name it (relative)."""
        if path and Path(path).is_absolute() and Path(path).is_relative_to(self.ws.root):
            return self.ws.relative(Path(path))
        return path

    def detail(self, run_dir: Path, since: int = 0) -> dict[str, Any]:
        info = self.summary(run_dir)
        state = self.state(run_dir)
        log_text = _tail(run_dir / LOG, 16000)
        curve = read_curve(run_dir / "model" / TRAINER_LOG)
        info.update(steps=state["steps"], log=log_text, curve=curve[since:], curve_length=len(curve),
                    progress=progress(log_text, curve, state), evals=self.evals(run_dir))
        return info

    def evals(self, run_dir: Path) -> list[dict[str, Any]]:
        out = []
        for path in sorted((run_dir / "evals").glob("*/" + STATE)):
            job = self.state(path.parent)
            result = None
            result_file = path.parent / "result.json"
            if job["status"] == "done" and result_file.exists():
                try:
                    result = json.loads(result_file.read_text())
                except ValueError:
                    result = None
            out.append({"id": job["id"], "status": job["status"], "command": job["steps"][0]["argv"],
                        "error": job["steps"][0].get("error"), "result": result})
        return out


def _in_group(pid: int, group: int) -> bool:
    """`pid` is alive (not a zombie) and still in process group `group` (not a reused pid)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        try:
            return os.getpgid(pid) == group
        except OSError:
            return False
    return fields[0] != "Z" and int(fields[2]) == group


def _step_error(run_dir: Path, step: dict[str, Any]) -> str | None:
    try:
        with open(run_dir / LOG, "rb") as f:
            f.seek(int(step.get("log_offset") or 0))
            return error_line(f.read().decode(errors="replace"))
    except OSError:
        return None


def _record(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _tail(path: Path, size: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def read_curve(path: Path) -> list[dict[str, Any]]:
    """trainer_log.jsonl as written so far (a line being written is skipped)."""
    out: list[dict[str, Any]] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "step" in entry and "train_runtime" not in entry:   # not the run's summary
            out.append({k: v for k, v in entry.items() if isinstance(v, (int, float))})
    return out


def progress(log_text: str, curve: list[dict[str, Any]], state: dict[str, Any]) -> dict[str, Any]:
    """Steps done of the total (from the command's own progress lines), and the time left."""
    found = _PROGRESS.findall(log_text)
    done = int(found[-1][0].replace(",", "")) if found else 0
    total = int(found[-1][1].replace(",", "")) if found else 0
    train = next((s for s in state["steps"] if s["name"].startswith("train ")), None)
    if train and train["status"] == "done" and curve:
        done = total = max(done, int(curve[-1]["step"]))
    elapsed = float(curve[-1].get("elapsed_s", 0)) if curve else 0.0
    steps = int(curve[-1]["step"]) if curve else 0
    left = elapsed / steps * (total - done) if steps and total > done else (0.0 if total and done >= total else None)
    return {"done": done, "total": total, "seconds_left": None if left is None else round(left, 1)}
