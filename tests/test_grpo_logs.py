"""`train grpo`'s log: each reward's readable, unique name, and the sample completions written to
OUT/completions.jsonl at each logging step (no model needed here; test_grpo.py runs the trainer)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest


def test_reward_names_are_readable(tmp_path, monkeypatch):
    from lmforge.shared.train import rewards

    monkeypatch.chdir(tmp_path)
    (tmp_path / "score.sh").write_text("#!/bin/sh\necho 1\n")
    (tmp_path / "judge.py").write_text("import sys\n")
    (tmp_path / "short.awk").write_text("{ print 1 }\n")
    for spec, name in (("cmd:./score.sh", "cmd:score.sh"), (f"cmd:{tmp_path}/score.sh --strict", "cmd:score.sh"),
                       ("cmd:python3 judge.py --threshold 3", "cmd:judge.py"), ("cmd:awk -f short.awk", "cmd:short.awk"),
                       ("cmd:LC_ALL=C jq -r .score", "cmd:jq"), ("cmd:echo 1", "cmd:echo"),
                       (r"regex:^\d+$", "regex"), ("length:32", "length"), ("exact", "exact")):
        assert rewards.parse(spec).__name__ == name, spec
    (tmp_path / "mine.py").write_text("def words(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
                                      "shout = lambda prompts, completions, **kw: [0.0] * len(completions)\n")
    assert rewards.parse("mine.py:words").__name__ == "words"
    assert rewards.parse("mine.py:shout").__name__ == "shout"   # a lambda: the name the spec gives it


def test_reward_names_stay_unique():
    from lmforge.shared.train import rewards

    terms = [rewards.parse(s) for s in ("exact", "cmd:echo 1", "cmd:echo 2", "exact", "cmd:echo 3")]
    rewards.unique_names(terms)
    assert [t.__name__ for t in terms] == ["exact", "cmd:echo", "cmd:echo_2", "exact_2", "cmd:echo_3"]
    clash = [rewards.parse(s) for s in ("cmd:echo 1", "cmd:echo 2")] + [SimpleNamespace(__name__="cmd:echo_2")]
    rewards.unique_names(clash)
    names = [t.__name__ for t in clash]
    assert len(set(names)) == 3 and names[2] == "cmd:echo_2"


def test_samples_keep_the_latest_batch_with_every_reward():
    from lmforge.shared.train import rewards

    samples = rewards.Samples()
    exact, numeric = rewards.parse("exact"), rewards.parse("numeric")
    exact.samples = numeric.samples = samples
    prompts, completions, refs = ["p1", "p1", "p2", "p2"], ["4", "five", "4", "4.0"], ["4", "4", "4", "4"]
    exact(prompts=prompts, completions=completions, reference=refs)
    numeric(prompts=prompts, completions=completions, reference=refs)
    assert samples.serial == 1
    assert samples.batch["rewards"] == {"exact": [1.0, 0.0, 1.0, 0.0], "numeric": [1.0, 0.0, 1.0, 1.0]}
    exact(prompts=prompts, completions=["x"] * 4, reference=refs)   # the next batch
    assert samples.serial == 2 and set(samples.batch["rewards"]) == {"exact"}


def test_completions_file_one_line_per_logging_step(tmp_path):
    from lmforge.shared.train import grpo, rewards

    samples = rewards.Samples()
    names, weights = ["exact", "cmd:score.sh"], [2.0, 0.5]
    callback = grpo.completion_log(samples, tmp_path, 2, names, weights)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    callback.on_train_begin(None, state, None)
    batch = (["q1", "q1", "q1", "q2"], ["a", "b", "c", "d"], ["a", "a", "a", "z"])
    samples.add("exact", *batch, [1.0, 0.0, 0.0, 0.0])
    samples.add("cmd:score.sh", *batch, [0.2, 0.4, 0.6, 0.8])
    state.global_step = 1
    callback.on_log(None, state, None, logs={"loss": 0.1})
    state.global_step = 2
    callback.on_log(None, state, None, logs={"loss": 0.1})   # no new batch since: nothing written
    samples.add("exact", ["q3"] * 2, ["x", "y"], [None, None], [0.0, 1.0])
    state.global_step = 3
    callback.on_log(None, state, None, logs={"loss": 0.1})
    lines = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == [1, 3]
    assert lines[0] == {"step": 1, "prompt": "q1", "reference": "a", "completions": [
        {"completion": "a", "rewards": {"exact": 1.0, "cmd:score.sh": 0.2}, "reward": pytest.approx(2.1)},
        {"completion": "b", "rewards": {"exact": 0.0, "cmd:score.sh": 0.4}, "reward": pytest.approx(0.2)}]}
    assert lines[1]["completions"][1] == {"completion": "y", "rewards": {"exact": 1.0}, "reward": 2.0}
    # resumed from step 1: what was logged after it goes
    resumed = grpo.completion_log(rewards.Samples(), tmp_path, 2, names, weights)
    resumed.on_train_begin(None, SimpleNamespace(is_world_process_zero=True, global_step=1), None)
    assert [json.loads(x)["step"] for x in (tmp_path / "completions.jsonl").read_text().splitlines()] == [1]
