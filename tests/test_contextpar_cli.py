"""`train sft|dpo --context-parallel 2` through the command line, under torchrun on two CPU
processes (gloo): the same losses and the same trained adapter as one process, within fp32
rounding; and the refusals, each one line before anything loads."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import bad, ok, shared_path, torchrun

STORIES = "models/stories260K"


def _launch(nproc: int, args: list) -> subprocess.CompletedProcess:
    return torchrun(nproc, args)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Demo rows, neat-packed for sft (examples straddle the middle of a row) and paired for dpo."""
    import demo

    base = shared_path(STORIES)
    work = tmp_path_factory.mktemp("cp")
    demo.write(work / "raw", rows=120)
    ok(["data", "align", work / "raw" / "tasks.jsonl", "--max-samples", "48", "-o", work / "tasks.arrow"])
    ok(["data", "pack", work / "tasks.arrow", "-m", base, "-t", "default", "--cutoff", "96", "--neat-packing",
        "-o", work / "sft.packed"])
    ok(["data", "align", work / "raw" / "prefs.jsonl", "--max-samples", "24", "-o", work / "prefs.arrow"])
    ok(["data", "pack", work / "prefs.arrow", "-m", base, "-t", "default", "--stage", "dpo", "--cutoff", "96",
        "-o", work / "dpo.packed"])
    return {"base": base, "sft": work / "sft.packed", "dpo": work / "dpo.packed"}


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def _losses(out: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "loss" in e]


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
@pytest.mark.parametrize("stage, mode, more", [("sft", "ulysses", []), ("sft", "ring", []), ("dpo", "auto", []),
                                               ("sft", "ulysses", ["--deepspeed", "z2"]),
                                               ("sft", "ring", ["--deepspeed", "z1"])],
                         ids=["sft-ulysses", "sft-ring", "dpo", "sft-zero2", "sft-zero1"])
def test_two_processes_train_what_one_does(data, tmp_path, stage, mode, more):
    # SGD, not Adam: Adam's update divides by the gradient's own size, so a gradient of 1e-9 in one run
    # and -1e-9 in the other (rounding) moves a weight by +-lr; SGD's difference stays that of the gradients
    common = ["-m", data["base"], "-d", data[stage], "--max-steps", "3", "--batch-size", "2", "--grad-accum", "1",
              "--logging-steps", "1", "--lr", "0.1", "--optim", "sgd", "--lora-rank", "4"]
    one = tmp_path / "one"
    ok(["train", stage, *common, "-o", one])
    two = tmp_path / "two"
    result = _launch(2, ["train", stage, *common, "-o", two, "--context-parallel", "2",
                         "--context-parallel-mode", mode, *more])
    assert result.returncode == 0, result.stderr.decode()[-4000:]
    assert f"context parallel over 2 processes per row ({'ring' if mode == 'ring' else 'ulysses'})" in \
        result.stderr.decode()
    record = json.loads((two / "lmforge.json").read_text())
    assert record["hyperparameters"]["context_parallel"] == 2 and record["hyperparameters"]["world_size"] == 2
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    a, b = _adapter(one), _adapter(two)
    assert set(a) == set(b)
    for name in a:   # 3 SGD steps from the same start (updates linear in the gradients): fp32 rounding
        scale = float(a[name].abs().max()) or 1.0
        assert float((a[name] - b[name]).abs().max()) <= 1e-4 * scale + 1e-7, name


def test_refusals_come_before_anything_loads(data, tmp_path):
    common = ["-m", data["base"], "-d", data["sft"], "-o", tmp_path / "x"]
    assert "needs a multiple of 2 processes" in bad(["train", "sft", *common, "--context-parallel", "2"])
    assert "No such option: --context-parallel" in bad(["train", "grpo", "-m", data["base"], "-d", data["sft"],
                                                         "-o", tmp_path / "g", "-r", "exact",
                                                         "--context-parallel", "2"])
    assert "exclude each other" in bad(["train", "sft", *common, "--context-parallel", "2", "--shift-attn"],
                                       env={"WORLD_SIZE": "2"})
    assert "--attn" in bad(["train", "sft", *common, "--context-parallel", "2", "--attn", "eager"],
                           env={"WORLD_SIZE": "2"})
    assert "ZeRO-3" in bad(["train", "sft", *common, "--context-parallel", "2", "--deepspeed", "z3"],
                           env={"WORLD_SIZE": "2"})
    assert "--loss kto" in bad(["train", "dpo", *common, "--context-parallel", "2", "--loss", "kto"],
                               env={"WORLD_SIZE": "2"})
    assert not (tmp_path / "x").exists()
