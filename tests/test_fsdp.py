"""`train sft --fsdp` (PyTorch FSDP2) on CPU processes (gloo) under torchrun: the same weights as
one process without it, for full tuning and LoRA; the adapter merge after it; sharded checkpoints
that resume on another number of processes; two local "nodes"; a job that loses a process and
restarts itself (torchrun --max-restarts); and the refusals, each in one line.

The reference is one process without --fsdp at the same global batch: 2 processes x batch 2 there,
batch 2 x 2 accumulation steps here (the loss is averaged over the tokens of the whole global
batch either way). Tolerances: full tuning (AdamW, 4 steps) within 1e-5 of the weights' own
scale; LoRA uses SGD, whose update stays as small as the rounding of its gradients (Adam's divides
a gradient by its own size, so a 1e-9 rounding difference can move a weight by +-lr)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LMFORGE, bad, free_port, ok, shared_path, torchrun

STORIES = "models/stories260K"
WORKER = Path(__file__).with_name("fsdp_worker.py")
STEPS = ["--max-steps", "4", "--batch-size", "2", "--logging-steps", "1", "--save-steps", "2"]
FULL = ["--method", "full", "--lr", "3e-3"]
LORA = ["--method", "lora", "--lora-rank", "4", "--lr", "0.1", "--optim", "sgd"]


def _torchrun(*launch: str) -> list[str]:
    return [str(Path(sys.executable).parent / "torchrun"), *launch]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_LOG_INTERVAL": "1000"}


def _launch(nproc: int, args: list, fault: str | None = None, *launch: str) -> subprocess.CompletedProcess:
    """`lmforge ARGS` on NPROC local processes (through the fault-injecting worker when asked)."""
    program = ["--no-python", sys.executable, str(WORKER), fault] if fault else None
    return torchrun(nproc, args, *launch, program=program, timeout=600, env={"LMFORGE_LOG_INTERVAL": "1000"})


def _ok(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.decode()
    assert result.returncode == 0, err[-4000:]
    return err


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    name = "model.safetensors" if (out / "model.safetensors").exists() else "adapter_model.safetensors"
    return load_file(str(out / name))


def _close(a: Path, b: Path, rel: float = 1e-5) -> None:
    x, y = _weights(a), _weights(b)
    assert set(x) == set(y)
    for name in x:
        scale = float(x[name].abs().max()) or 1.0
        assert float((x[name] - y[name]).abs().max()) <= rel * scale + 1e-7, name


def _record(out: Path) -> dict:
    return json.loads((out / "lmforge.json").read_text())


def _history(out: Path) -> list[tuple[int, float]]:
    rows = map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
    return [(e["step"], e["loss"]) for e in rows if "loss" in e]


def _same_run(run: Path, reference: Path) -> None:
    """The run record and the log cover the whole run as the reference's do."""
    assert [s for s, _ in _history(run)] == [s for s, _ in _history(reference)] == [1, 2, 3, 4]
    assert [v for _, v in _history(run)] == pytest.approx([v for _, v in _history(reference)], rel=1e-4)
    mine, theirs = _record(run)["metrics"], _record(reference)["metrics"]
    assert mine["steps"] == theirs["steps"] == 4 and mine["tokens"] == theirs["tokens"]
    assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The data, the one-process references, and 2-process --fsdp runs that keep their checkpoints."""
    import demo

    base = shared_path(STORIES)
    work = tmp_path_factory.mktemp("fsdp")
    demo.write(work / "raw", rows=120)
    ok(["data", "align", work / "raw" / "tasks.jsonl", "--max-samples", "48", "-o", work / "tasks.arrow"])
    ok(["data", "pack", work / "tasks.arrow", "-m", base, "-t", "default", "--cutoff", "96", "--neat-packing",
        "-o", work / "sft.packed"])
    common = ["-m", base, "-d", work / "sft.packed", *STEPS]
    found = {"base": base, "work": work, "common": common}
    for method, options in (("full", FULL), ("lora", LORA)):
        ok(["train", "sft", *common, *options, "--grad-accum", "2", "-o", work / f"ref-{method}"])
        err = _ok(_launch(2, ["train", "sft", *common, *options, "--grad-accum", "1", "--fsdp", "full",
                              "--keep-checkpoints", "-o", work / f"fsdp-{method}"]))
        found[f"err-{method}"] = err
    return found


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_sharded_processes_train_what_one_does(runs, method):
    work = runs["work"]
    run, reference = work / f"fsdp-{method}", work / f"ref-{method}"
    _close(run, reference)
    _same_run(run, reference)
    hyper = _record(run)["hyperparameters"]
    assert hyper["fsdp"] == "full" and hyper["world_size"] == 2
    # only rank 0 reports: one summary line for the job
    assert runs[f"err-{method}"].count("train: done") == 1
    marker = json.loads((run / "checkpoints" / "checkpoint-2" / "lmforge_sharded.json").read_text())
    assert marker["world_size"] == 2 and marker["step"] == 2
    # the result is one ordinary directory (the model's own class named in its config), not shards
    assert not list(run.glob("*.distcp"))
    if method == "full":
        from transformers import AutoModelForCausalLM

        assert json.loads((run / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        model = AutoModelForCausalLM.from_pretrained(str(run))
        assert sum(p.numel() for p in model.parameters()) == 260_032


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
def test_sharding_composes_with_context_parallel_and_selective_checkpointing(runs, tmp_path):
    """Both processes split each row (one data-parallel group) while FSDP shards the model over them,
    with selective activation checkpointing inside the sharded layers: what one process trains."""
    common = ["-m", runs["base"], "-d", runs["work"] / "sft.packed", "--max-steps", "3", "--batch-size", "2",
              "--grad-accum", "1", "--logging-steps", "1", *LORA]
    one, two = tmp_path / "one", tmp_path / "two"
    ok(["train", "sft", *common, "-o", one])
    err = _ok(_launch(2, ["train", "sft", *common, "-o", two, "--fsdp", "full", "--context-parallel", "2",
                          "--gradient-checkpointing", "--checkpointing", "selective"]))
    assert "context parallel over 2 processes per row" in err
    _close(one, two, rel=1e-4)
    hyper = _record(two)["hyperparameters"]
    assert hyper["fsdp"] == "full" and hyper["context_parallel"] == 2 and hyper["checkpointing"] == "selective"
    assert _record(two)["metrics"]["tokens"] == _record(one)["metrics"]["tokens"]   # each row counted once


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
def test_adapter_merge_after_fsdp_is_exact(runs, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = runs["work"] / "fsdp-lora"
    merged = tmp_path / "merged"
    ok(["adapter", "merge", runs["base"], adapter, "-o", merged])
    base = AutoModelForCausalLM.from_pretrained(str(runs["base"]), dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    got = {k: v for f in merged.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert set(got) <= set(expected) and "model.layers.0.self_attn.q_proj.weight" in got
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name].to(tensor.dtype)), name
    trained = AutoModelForCausalLM.from_pretrained(str(runs["base"]), dtype=torch.float32).state_dict()
    changed = [n for n in got if not torch.equal(got[n], trained[n])]
    assert changed and all("proj" in n for n in changed)   # base + the adapter's delta, nothing else
    AutoModelForCausalLM.from_pretrained(str(merged))


def _cut(run: Path, to: Path) -> Path:
    """What a run killed after its checkpoint of step 2 leaves: that checkpoint, and the shards of
    step 4 half-written (a directory the next run removes, never takes)."""
    to.mkdir()
    (to / "checkpoints").mkdir()
    shutil.copytree(run / "checkpoints" / "checkpoint-2", to / "checkpoints" / "checkpoint-2")
    shutil.copytree(run / "checkpoints" / "checkpoint-4", to / "checkpoints" / ".checkpoint-4.partial")
    (to / ".lmforge-run").write_text("1\n")
    (to / "trainer_log.jsonl").write_text("".join(line + "\n" for line in
                                                  (run / "trainer_log.jsonl").read_text().splitlines()[:2]))
    return to


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
def test_partial_checkpoints_are_never_taken(runs, tmp_path):
    from lmforge.shared.core import rundir

    cut = _cut(runs["work"] / "fsdp-full", tmp_path / "cut")
    assert rundir.last_checkpoint(cut).name == "checkpoint-2"
    # a directory named like a checkpoint whose shards are there but not the marker: not whole
    unmarked = cut / "checkpoints" / "checkpoint-4"
    shutil.copytree(runs["work"] / "fsdp-full" / "checkpoints" / "checkpoint-4", unmarked)
    (unmarked / "lmforge_sharded.json").unlink()
    assert rundir.last_checkpoint(cut).name == "checkpoint-2"


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
def test_sharded_checkpoints_resume_on_another_number_of_processes(runs, tmp_path):
    work, common = runs["work"], runs["common"]
    reference = work / "ref-full"
    # 2 -> 1: the checkpoint two processes wrote, resumed by one (the same global batch)
    down = _cut(work / "fsdp-full", tmp_path / "down")
    ok(["train", "sft", *common, *FULL, "--grad-accum", "2", "--fsdp", "full", "--resume", "--keep-checkpoints",
        "-o", down])
    _close(down, reference)
    _same_run(down, reference)
    # the half-written shards were removed, not taken; step 4 was written again, by one process
    assert not list((down / "checkpoints").glob(".*.partial"))
    assert json.loads((down / "checkpoints" / "checkpoint-4" / "lmforge_sharded.json").read_text())["world_size"] == 1
    # 1 -> 2: one process (a group of one) writes the shards, two resume them
    single = tmp_path / "single"
    ok(["train", "sft", *common, *FULL, "--grad-accum", "2", "--fsdp", "full", "--keep-checkpoints", "-o", single])
    assert json.loads((single / "checkpoints" / "checkpoint-2" / "lmforge_sharded.json").read_text())["world_size"] == 1
    _close(single, reference)
    up = _cut(single, tmp_path / "up")
    _ok(_launch(2, ["train", "sft", *common, *FULL, "--grad-accum", "1", "--fsdp", "full", "--resume", "-o", up]))
    _close(up, reference)
    _same_run(up, reference)
    assert _record(up)["hyperparameters"]["world_size"] == 2
    # 2 -> 4: four processes of one row each resume what two wrote (the same global batch of 4)
    four = _cut(work / "fsdp-full", tmp_path / "four")
    _ok(_launch(4, ["train", "sft", *common, *FULL, "--batch-size", "1", "--grad-accum", "1", "--fsdp", "full",
                    "--resume", "-o", four]))
    _close(four, reference)
    _same_run(four, reference)
    assert _record(four)["hyperparameters"]["world_size"] == 4


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
def test_two_local_nodes_reach_the_weights_of_one(runs, tmp_path):
    """Two torchrun agents (one process each) meet through a c10d rendezvous, as two machines would."""
    work, common = runs["work"], runs["common"]
    out = tmp_path / "nodes"
    port = free_port()
    args = ["train", "sft", *common, *FULL, "--grad-accum", "1", "--fsdp", "hybrid", "-o", out]
    nodes = [subprocess.Popen([*_torchrun("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                                          "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                                          "--rdzv-id", "lmforge-test"), LMFORGE[-1], *map(str, args)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err.decode()[-4000:]
    _close(out, work / "fsdp-full")
    _same_run(out, work / "ref-full")
    assert _record(out)["hyperparameters"]["world_size"] == 2


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
def test_a_lost_process_restarts_the_job_from_its_last_checkpoint(runs, tmp_path):
    work, common = runs["work"], runs["common"]
    out = tmp_path / "elastic"
    result = _launch(2, ["train", "sft", *common, *FULL, "--grad-accum", "1", "--fsdp", "full", "-o", out],
                     "kill-rank1-after-2", "--max-restarts", "1")
    err = _ok(result)
    assert "restarted by torchrun" in err and "resuming from the last checkpoint" in err
    _close(out, work / "ref-full")
    _same_run(out, work / "ref-full")   # the record and the log cover both attempts
    assert not (out / "checkpoints").exists()


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
def test_processes_that_disagree_are_refused_in_one_line(runs, tmp_path):
    out = tmp_path / "split"
    result = _launch(2, ["train", "sft", *runs["common"], *FULL, "--fsdp", "full", "-o", out], "rank1-lr=0.5")
    err = result.stderr.decode()
    # torchrun reports a failed worker with a traceback of its own; lmforge's processes print none
    assert result.returncode != 0 and err.count("Traceback") == err.count('torchrun", line'), err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 (") and "--learning-rate 0.5, rank 0 with 0.003" in lines[0], err[-3000:]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
def test_an_output_directory_a_process_does_not_see_is_refused(runs, tmp_path):
    """Rank 1 runs elsewhere, so the relative -o is another directory for it, as a directory local to
    each node would be."""
    (tmp_path / "node0").mkdir()
    (tmp_path / "node1").mkdir()
    cmd = _torchrun("--nproc-per-node", "2", "--master-port", str(free_port()), "--no-python", sys.executable,
                    str(WORKER), f"rank1-cwd={tmp_path / 'node1'}", "train", "sft",
                    *map(str, runs["common"]), *FULL, "--fsdp", "full", "-o", "run")
    result = subprocess.run(cmd, capture_output=True, timeout=600, env=_env(), cwd=tmp_path / "node0")
    err = result.stderr.decode()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(lines) == 1, err[-3000:]
    assert "run: not shared by every process: rank 1 (" in lines[0] and "every node mounts" in lines[0]
    assert not (tmp_path / "node0" / "run").exists()


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
def test_refusals_before_anything_loads(runs, tmp_path):
    common = ["-m", runs["base"], "-d", runs["work"] / "sft.packed", "-o", tmp_path / "x"]
    assert "exclude each other" in bad(["train", "sft", *common, "--fsdp", "full", "--deepspeed", "z2"])
    assert "quantized" in bad(["train", "sft", *common, "--fsdp", "full", "--quant", "4"])
    assert "--method galore" in bad(["train", "sft", *common, "--fsdp", "full", "--method", "galore"])
    assert "--optim adamw_8bit" in bad(["train", "sft", *common, "--fsdp", "full", "--optim", "adamw_8bit"])
    assert "offload" in bad(["train", "sft", *common, "--fsdp", "offload"])
    assert "--fsdp" in bad(["train", "sft", *common, "--fsdp", "sharded"])
    assert "No such option: --fsdp" in bad(["train", "dpo", *common, "--fsdp", "full"])
    assert not (tmp_path / "x").exists()


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
def test_resuming_a_checkpoint_this_run_cannot_continue_is_refused(runs, tmp_path):
    from lmforge.shared.core.errors import BadInput
    from lmforge.shared.train import sharded

    class O:
        fsdp = None
        deepspeed = "z2"

    checkpoint = runs["work"] / "fsdp-full" / "checkpoints" / "checkpoint-2"
    with pytest.raises(BadInput, match="resume with --fsdp"):
        sharded.check_resume(O(), checkpoint, 1)
    zero = tmp_path / "checkpoint-8"
    (zero / "global_step8").mkdir(parents=True)
    for rank in (0, 1):
        (zero / "global_step8" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    sharded.check_resume(O(), zero, 2)
    with pytest.raises(BadInput, match="from 2 processes and resumes it on 2 only, not 4") as refused:
        sharded.check_resume(O(), zero, 4)
    assert "--fsdp" in refused.value.hint
    O.fsdp, O.deepspeed = "full", None
    with pytest.raises(BadInput, match="without --fsdp"):
        sharded.check_resume(O(), zero, 2)


def test_differences_between_processes_are_named():
    from lmforge.shared.train.distributed import _difference

    def process(host, version="1.0", lr=1e-3):
        return {"version": version, "options": {"lr": lr, "fsdp": "full"}, "host": host, "resume": None}

    out = Path("/runs/x")
    assert _difference([process("a"), process("b")], [True, True], out) is None
    what, hint = _difference([process("a"), process("b", version="0.9")], [True, True], out)
    assert what == "rank 1 (b) runs lmforge 0.9, rank 0 (a) runs 1.0" and "same lmforge version" in hint
    what, _ = _difference([process("a"), process("b", lr=0.5)], [True, True], out)
    assert what == "rank 1 (b) runs with --lr 0.5, rank 0 with 0.001"
    flagged = [dict(p, options={"--learning-rate": p["options"]["lr"]}) for p in (process("a"), process("b", lr=0.5))]
    assert _difference(flagged, [True, True], out)[0] == "rank 1 (b) runs with --learning-rate 0.5, rank 0 with 0.001"
    what, hint = _difference([process("a"), process("b")], [True, False], out)
    assert "not shared by every process: rank 1 (b)" in what and "every node mounts" in hint


def test_a_failure_in_another_process_names_it(monkeypatch):
    from lmforge.shared.core.errors import BadInput, RunFailure
    from lmforge.shared.train import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RunFailure, match=r"^rank 1 \(.+\): ValueError: broken"):
        with distributed.as_process():
            raise ValueError("broken\nmore lines")
    with pytest.raises(RunFailure, match="lost contact with another process"):
        with distributed.as_process():
            raise RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234")
    with pytest.raises(BadInput, match=r"^rank 1 \(.+\): bad"):
        with distributed.as_process():
            raise BadInput("bad")
    from lmforge.shared.core import log

    log.set_quiet(False)


def test_a_restarted_worker_resumes(monkeypatch, tmp_path):
    from lmforge.shared.train.distributed import resume_flags

    class O:
        output = tmp_path / "run"
        resume = False
        overwrite = True

    assert resume_flags(O()) == (False, True)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert resume_flags(O()) == (False, False)   # nothing yet to resume: afresh, never --overwrite
    (tmp_path / "run" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert resume_flags(O()) == (True, False)
