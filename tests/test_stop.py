"""Stopping a training run by hand: Ctrl-C (or SIGTERM) once a step has finished lets the step
finish, saves a checkpoint and says how to go on; the run then resumes to the end. A stop before
any step leaves nothing behind. Servers stopped by a signal end normally."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import LMFORGE, ok, shared_path

STORIES = "models/stories260K"


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path]:
    import demo

    base = shared_path(STORIES)
    work = tmp_path_factory.mktemp("stop")
    demo.write(work / "raw", rows=80)
    ok(["data", "align", work / "raw" / "tasks.jsonl", "-o", work / "a.arrow"])
    ok(["data", "pack", work / "a.arrow", "-m", base, "-t", "default", "--cutoff", "64", "-o", work / "p.arrow"])
    return base, work / "p.arrow"


def _start(args: list) -> subprocess.Popen:
    env = {**os.environ, "LMFORGE_LOG_INTERVAL": "0"}   # a progress line per step: we wait for one
    return subprocess.Popen([*LMFORGE, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _wait_for_steps(proc: subprocess.Popen, lines: list[str], steps: int = 2, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline().decode()
        lines.append(line)
        if line.startswith("train: ") and "/60 steps" in line and int(line.split()[1].split("/")[0]) >= steps:
            return
        assert line or proc.poll() is None, "".join(lines)
    raise AssertionError("no progress line: " + "".join(lines))


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_a_stopped_run_keeps_a_checkpoint_and_says_how_to_resume(packed, tmp_path, sig, code, said):
    base, data = packed
    out = tmp_path / "run"
    args = ["train", "sft", "-m", base, "-d", data, "-o", out, "--max-steps", "60", "--batch-size", "1",
            "--grad-accum", "1", "--save-steps", "1000", "--logging-steps", "1"]
    proc = _start(args)
    lines: list[str] = []
    _wait_for_steps(proc, lines)
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    err = "".join(lines) + rest.decode()
    assert proc.returncode == code, err
    assert f"error: {said}" in err and "stopping after this step" in err
    hint = next(line for line in err.splitlines() if "to go on:" in line)
    assert hint.rstrip().endswith("--resume") and "train sft" in hint
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and not (out / "lmforge.json").exists(), err
    step = int(checkpoints[-1].name.split("-")[-1])
    assert 2 <= step < 60
    if sig == signal.SIGINT:   # and the run goes on from there to the end
        ok([*args, "--resume"])
        record = json.loads((out / "lmforge.json").read_text())
        assert record["metrics"]["steps"] == 60


def test_a_stop_before_the_first_step_leaves_nothing(packed, tmp_path):
    base, data = packed
    out = tmp_path / "early"
    proc = _start(["train", "sft", "-m", base, "-d", data, "-o", out, "--max-steps", "60"])
    time.sleep(0.5)   # still loading: no step has finished
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130 and not out.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_server_stopped_by_a_signal_ends_normally(packed, sig):
    import socket
    import urllib.request

    base, _ = packed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _start(["serve", "-m", base, "--template", "default", "--port", port])
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert "serve: stopped" in err.decode() and "error:" not in err.decode()
