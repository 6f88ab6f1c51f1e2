"""The progress line a user reads: after --resume the rate and time left are this run's own; a
step's line shows that step's loss (not the previous log line's); preference and RL runs show
their rewards and accuracies."""

from __future__ import annotations

import json
import os
import subprocess
from types import SimpleNamespace

from conftest import LMFORGE, ok, shared_path


def test_a_resumed_count_is_not_in_the_rate(monkeypatch):
    from lmforge.shared.core import log

    monkeypatch.setenv("LMFORGE_LOG_INTERVAL", "1000")
    bar = log.Progress("train", total=25, unit="steps")
    bar.resume_at(11)
    bar._start -= 10.0   # ten seconds for two steps of this run
    bar.advance(2)
    assert bar.done == 13 and abs(bar.rate() - 0.2) < 0.01   # 2 steps / 10 s, not 13 / 10 s


def test_the_step_line_shows_that_steps_own_figures(tmp_path):
    from lmforge.shared.train.progress import make_callbacks

    shown: list[dict] = []

    class Bar:
        done = 0

        def advance(self, n, **fields):
            shown.append(fields)

    collator = SimpleNamespace(tokens=0)
    [reporter] = make_callbacks(collator, tmp_path, total_hint=2, resumed_step=0)
    reporter.bar = Bar()
    args = SimpleNamespace(logging_steps=1, logging_first_step=True)
    state = SimpleNamespace(global_step=1, is_world_process_zero=True, epoch=0.1)
    reporter.on_step_end(args, state, None)
    assert shown == []   # this step logs next: its line waits for the log
    reporter.on_log(args, state, None, logs={"loss": 0.5, "rewards/accuracies": 0.75, "rewards/margins": 1.5})
    assert shown[-1]["loss"] == 0.5 and shown[-1]["acc"] == 0.75 and shown[-1]["margin"] == 1.5
    state.global_step = 2
    reporter.on_step_end(SimpleNamespace(logging_steps=5, logging_first_step=True), state, None)
    assert len(shown) == 2 and shown[-1]["loss"] == 0.5   # a step that does not log shows at once


def test_a_real_runs_lines_carry_their_own_loss(tmp_path):
    import demo

    base = shared_path("models/stories260K")
    demo.write(tmp_path / "raw", rows=40)
    ok(["data", "align", tmp_path / "raw" / "tasks.jsonl", "-o", tmp_path / "a.arrow"])
    ok(["data", "pack", tmp_path / "a.arrow", "-m", base, "-t", "default", "--cutoff", "64", "-o", tmp_path / "p"])
    env = {**os.environ, "LMFORGE_LOG_INTERVAL": "0"}
    result = subprocess.run([*LMFORGE, "train", "sft", "-m", str(base), "-d", str(tmp_path / "p"), "-o",
                             str(tmp_path / "o"), "--max-steps", "4", "--batch-size", "1", "--grad-accum", "1",
                             "--logging-steps", "1", "--lr", "1e-2"], capture_output=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    logged = {e["step"]: round(e["loss"], 4) for e in map(json.loads, (tmp_path / "o" / "trainer_log.jsonl")
                                                          .read_text().splitlines()) if "loss" in e}
    lines = [line for line in result.stderr.decode().splitlines() if "/4 steps" in line and "loss" in line]
    assert lines, result.stderr.decode()
    for line in lines:
        step = int(line.split()[1].split("/")[0])
        assert abs(float(line.split("loss ")[1].split()[0]) - logged[step]) <= 1e-3 * logged[step], (line, logged)
