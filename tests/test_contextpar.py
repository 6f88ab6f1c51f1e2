"""Context parallelism (shared/train/contextpar): one sequence split across N processes.

In this process: the shards (labels shifted before the cut, padding, positions), the ring's block
kernel against sdpa, the modes each head count allows and the setups that are refused.

Under torchrun (gloo on 127.0.0.1; tests/contextpar_worker.py): 2 processes with N = 2, and 4
processes with N = 2 (two data-parallel groups) and N = 4, against one process, on tiny Llama,
Qwen3, Mistral and Qwen2 with sliding windows, Qwen3-MoE (router loss on) and Mixtral; neat-packed
rows whose examples straddle the shard boundaries; SFT, DPO and reward losses; LoRA and full
tuning; Ulysses and ring; gradient checkpointing (full and lmforge's selective policy); DDP and
FSDP2 around the model; and every architecture context parallelism accepts (tests/archmatrix.py's
tiny models), both modes. The loss and every gradient must equal the single process's within fp32
rounding: |loss difference| <= 1e-5 x max(1, |loss|); the largest gradient difference over all
parameters <= 1e-5 x max(1, largest gradient); and for each parameter <= 2e-4 of its own largest
gradient. Measured over the 83 comparisons: at most 2.3e-6 of the loss, 2.2e-6 of
the largest gradient, 5.2e-5 of a parameter's own. A control run (sharded alike, no
context-parallel attention) misses by 0.29-0.39 of the largest gradient: the checks can fail.

And the Hugging Face Trainer as lmforge sets it up for sft (PackedCollator, the chunked loss,
gradient accumulation), made context-parallel (the collator wrapped in ShardingCollator, the
loaders regrouped by ContextParallelMixin, the attention installed): three SGD steps on 2 processes (N = 2) and 4 (N = 2, two
data-parallel groups) give the weights, logged losses and evaluation loss of one process with
the same rows per step (within 1e-5).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.shared.core.errors import BadInput
from lmforge.shared.train.contextpar import blocks, checks, ring
from lmforge.shared.train.contextpar.layout import Layout, check_world
from lmforge.shared.train.contextpar.shard import (
    ShardingCollator,
    padded_length,
    regroup_loader,
    shard_causal,
    shard_pairs,
    shard_rewards,
)

HERE = Path(__file__).parent
WORKER = HERE / "contextpar_worker.py"
sys.path.insert(0, str(HERE))
import archmatrix  # noqa: E402
import contextpar_worker as worker  # noqa: E402

TOLERANCE = 1e-5


def _layout(size: int, rank: int) -> Layout:
    return Layout(size=size, rank=rank, group=None, ranks=tuple(range(size)), dp_size=1, dp_rank=0, dp_group=None)


# ----------------------------------------------------------------------------- shards

def test_causal_shards_shift_labels_before_the_cut_and_pad_with_positions_going_on():
    batch = worker.sft_batch([[4, 3], [5]])      # rows of 7 tokens (the second padded from 5)
    shards = [shard_causal(batch, _layout(3, r)) for r in range(3)]
    assert padded_length(7, 3) == 9
    for key in ("input_ids", "position_ids", "labels", "shift_labels", "attention_mask"):
        assert all(s[key].shape == (2, 3) for s in shards), key
    joined = {k: torch.cat([s[k] for s in shards], dim=1) for k in ("input_ids", "position_ids", "shift_labels",
                                                                   "attention_mask")}
    # each position's target is the next token's label, across the shard boundaries
    assert torch.equal(joined["shift_labels"][:, :6], batch["labels"][:, 1:])
    assert (joined["shift_labels"][:, 6:] == -100).all()
    assert torch.equal(joined["input_ids"][:, :7], batch["input_ids"])
    assert joined["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7, 8]]
    assert joined["attention_mask"].tolist() == [[1] * 7 + [0] * 2] * 2   # the added padding only
    assert torch.equal(shards[1]["labels"], shards[1]["shift_labels"])
    assert shards[0]["use_cache"] is False
    # no padding needed: no attention mask
    assert "attention_mask" not in shard_causal(batch, _layout(7, 2))


def test_causal_shards_refuse_masks_with_padding_and_3d_positions():
    batch = worker.sft_batch([[4, 3]])
    with pytest.raises(ValueError, match="padding-free"):
        shard_causal({**batch, "attention_mask": torch.tensor([[1] * 6 + [0]])}, _layout(2, 0))
    with pytest.raises(ValueError, match="3-D"):
        shard_causal({**batch, "position_ids": batch["position_ids"][None].expand(3, -1, -1)}, _layout(2, 0))


def test_pair_shards_carry_next_token_targets_scored_positions_and_whole_row_counts():
    batch = worker.pair_batch([(3, 2, 4), (2, 5, 1)])
    shards = [shard_pairs(batch, _layout(2, r)) for r in range(2)]
    scored = torch.cat([s["scored"] for s in shards], dim=1)
    targets = torch.cat([s["targets"] for s in shards], dim=1)
    length = batch["input_ids"].shape[1]
    assert torch.equal(scored[:, :length - 1], batch["completion_mask"][:, 1:].bool())
    assert torch.equal(targets[:, :length - 1], batch["input_ids"][:, 1:])
    assert shards[0]["counts"].tolist() == shards[1]["counts"].tolist() == [2, 5, 4, 1]
    assert int(shards[1]["row_tokens"]) == 5 + 7 + 7 + 3 and "attention_mask" not in shards[1]
    with pytest.raises(ValueError, match="right-padded"):
        shard_pairs({**batch, "attention_mask": batch["attention_mask"].flip(1)}, _layout(2, 0))
    rewards = worker.reward_batch([(3, 2, 4), (2, 5, 1)])
    cut = shard_rewards(rewards, _layout(2, 1))
    assert torch.equal(cut["last_index"], rewards["last_index"]) and cut["input_ids"].shape[1] == 4


def test_sharding_collator_cuts_and_keeps_the_wrapped_collators_counts():
    from lmforge.shared.data.collate import PackedCollator

    inner = PackedCollator(neat=True)
    collate = ShardingCollator(inner, _layout(2, 1), "causal")
    rows = [{"input_ids": list(range(1, 8)), "labels": list(range(1, 8)), "lengths": [3, 4]}]
    batch = collate(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0]] and batch["position_ids"].tolist() == [[1, 2, 3, 4]]
    assert batch["shift_labels"].tolist() == [[6, 7, -100, -100]]
    assert collate.tokens == inner.tokens == 7 and collate.counts == [7]
    with pytest.raises(ValueError, match="unknown batch kind"):
        ShardingCollator(inner, _layout(2, 0), "images")


def test_regroup_refuses_a_loader_that_is_not_sharded_by_batches():
    from torch.utils.data import DataLoader

    with pytest.raises(RuntimeError, match="not sharded by batches"):
        regroup_loader(DataLoader(list(range(4))), _layout(2, 0))
    plain = DataLoader(list(range(4)))
    assert regroup_loader(plain, _layout(1, 0)) is plain


# ----------------------------------------------------------------------------- the ring's blocks

def test_first_keys_follow_examples_and_the_window():
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]])
    assert ring.segment_starts(positions).tolist() == [[0, 0, 0, 3, 3, 3, 3, 3, 8, 8]]
    assert ring.first_keys(positions, 2).tolist() == [[0, 0, 1, 3, 3, 4, 5, 6, 8, 8]]


@pytest.mark.parametrize("kernel", ["fused", "matmul"])
@pytest.mark.parametrize("window", [None, 5])
def test_ring_blocks_in_one_process_equal_masked_sdpa(monkeypatch, window, kernel):
    """The ring's tiles (forward, and the backward from the row's output and log-sum-exp) in tiles
    of 16 query rows, one shard: equal to sdpa with the same mask (causal, per example, window),
    grouped-query heads; on the CPU's fused kernel and on plain matrix products."""
    monkeypatch.setattr(blocks, "SCORES", 16)
    if kernel == "matmul":
        monkeypatch.setattr(blocks, "_cpu_flash", lambda: None)
    torch.manual_seed(0)
    q = torch.randn(2, 4, 37, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 37, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 37, 8 if kernel == "fused" else 6, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([list(range(9)) + list(range(3)) + list(range(25)), list(range(37))])
    first = ring.first_keys(positions, window)
    out = ring.ring_attention(q, k, v, first, first, ring.segment_starts(positions), _layout(1, 0), 0.3)
    index = torch.arange(37)
    mask = (index[None, :] <= index[:, None])[None] & (index[None, None, :] >= first[:, :, None])
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=0.3,
                                                            enable_gqa=True)
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    expected = torch.autograd.grad(want, (q, k, v), grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- modes and refusals

def test_ulysses_needs_heads_that_divide_among_the_processes():
    assert checks.ulysses_fits(heads=32, kv_heads=8, size=4)      # 2 key/value heads each
    assert checks.ulysses_fits(heads=32, kv_heads=2, size=8)      # each key/value head repeated 4 times
    assert checks.ulysses_fits(heads=14, kv_heads=2, size=2)
    assert not checks.ulysses_fits(heads=14, kv_heads=2, size=4)  # 14 query heads among 4
    assert not checks.ulysses_fits(heads=12, kv_heads=6, size=4)  # 6 key/value heads among 4


def test_auto_mode_picks_ulysses_where_it_fits_else_ring():
    from transformers import AutoConfig

    qwen = AutoConfig.for_model("qwen2", num_attention_heads=14, num_key_value_heads=2, hidden_size=896)
    assert checks.resolve_mode(qwen, 2, "auto") == "ulysses"
    assert checks.resolve_mode(qwen, 4, "auto") == "ring"
    assert checks.resolve_mode(qwen, 2, "ring") == "ring"
    with pytest.raises(BadInput, match="do not divide among 4 processes"):
        checks.resolve_mode(qwen, 4, "ulysses")
    with pytest.raises(BadInput, match="gpt2 models are not supported"):
        checks.resolve_mode(AutoConfig.for_model("gpt2"), 2, "auto")
    dropout = AutoConfig.for_model("llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=6,
                                   attention_dropout=0.1)
    with pytest.raises(BadInput, match="attention dropout"):
        checks.resolve_mode(dropout, 4, "auto")
    assert checks.resolve_mode(dropout, 2, "auto") == "ulysses"   # sdpa's own dropout inside


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=3, world_size=4), "needs a multiple of 3 processes"),
    (dict(size=0), "must be at least 1"),
    (dict(mode="zigzag"), "--context-parallel-mode zigzag"),
    (dict(stage="grpo"), "not train grpo"),
    (dict(attn="flash_attention_2"), "not --attn flash_attention_2"),
    (dict(shift_attn=True), "exclude each other"),
    (dict(deepspeed="z3"), "does not run under --deepspeed"),
    (dict(kernels="liger"), "--kernels liger"),
    (dict(vision=True), "vision-language"),
    (dict(stage="dpo", loss="kto"), "--loss kto"),
])
def test_setups_that_cannot_work_are_refused_in_one_line(kwargs, message):
    options = dict(size=2, mode="auto", stage="sft", world_size=4)
    options.update(kwargs)
    size, mode = options.pop("size"), options.pop("mode")
    with pytest.raises(BadInput, match=message) as caught:
        checks.check_options(size, mode, **options)
    assert "\n" not in caught.value.one_line()


def test_setups_that_work_pass_and_one_process_per_sequence_is_off():
    checks.check_options(2, "ring", stage="dpo", world_size=8, loss="simpo")
    checks.check_options(4, "auto", stage="pt", world_size=4, attn="sdpa")
    checks.check_options(1, "auto", stage="grpo", world_size=3, deepspeed="z3")   # off: nothing to refuse
    check_world(2, 6)
    with pytest.raises(BadInput, match="does not divide"):
        check_world(4, 6)


# ----------------------------------------------------------------------------- against one process

def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, sizes: list[int], scenarios: list[str], timeout: int = 300) -> dict:
    """Run the worker under torchrun; {(scenario, size, dp): its report}."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(_port()), str(WORKER), *[f"--size={s}" for s in sizes], *scenarios]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {(r["scenario"], r["size"], r["dp"]): r for r in reports}


FOUR = ["llama-ulysses-full", "llama-ring-full", "mistral-window-ring-full", "llama-mqa-ulysses-full",
        "qwen3_moe-ulysses-full", "llama-dpo-ulysses-lora", "qwen3-dpo-ring-full", "llama-rm-ring-lora",
        "llama-ulysses-full-ddp", "llama-dpo-ring-lora-ddp"]
TWO = [name for name in worker.SCENARIOS if not name.startswith("control")]
# every architecture context parallelism accepts, from the architecture matrix's tiny configs, both modes
MATRIX = [f"matrix-{name}-{mode}" for name, (model_type, _, _) in archmatrix.ARCHS.items()
          if model_type in checks.ARCHS for mode in ("ulysses", "ring")]


@pytest.fixture(scope="module")
def two_processes():
    return launch(2, [2], ["loader", *TWO, *MATRIX, "control-no-exchange"])


@pytest.fixture(scope="module")
def four_processes():
    return launch(4, [2, 4], ["loader", *FOUR, "control-no-exchange"])


def _equal(report: dict) -> None:
    assert report["grads"] > 0
    assert report["loss_diff"] <= TOLERANCE * max(1.0, abs(report["loss_ref"])), report
    assert report["grad_max_diff"] <= TOLERANCE * max(1.0, report["grad_max"]), report
    assert report["grad_param_rel"] <= 20 * TOLERANCE, report   # each parameter against its own largest


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
@pytest.mark.parametrize("scenario", TWO)
def test_two_processes_one_sequence_equal_one_process(two_processes, scenario):
    _equal(two_processes[(scenario, 2, 1)])


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
@pytest.mark.parametrize("scenario", MATRIX)
def test_every_supported_architecture_equals_one_process(two_processes, scenario):
    _equal(two_processes[(scenario, 2, 1)])


def test_the_matrix_covers_every_supported_architecture():
    assert {name.split("-")[1] for name in MATRIX} >= {"llama", "mistral", "qwen3_moe", "deepseek_v3", "gemma3_text"}
    assert len(MATRIX) == 2 * len(checks.ARCHS)


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
@pytest.mark.parametrize("scenario", FOUR)
@pytest.mark.parametrize("size, dp", [(2, 2), (4, 1)], ids=["N2xDP2", "N4"])
def test_four_processes_equal_one_process(four_processes, scenario, size, dp):
    _equal(four_processes[(scenario, size, dp)])


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
def test_without_context_parallel_attention_the_shards_miss(two_processes, four_processes):
    """The control: the same shards, each attending only to itself; the comparison would catch it."""
    for report in (two_processes[("control-no-exchange", 2, 1)], four_processes[("control-no-exchange", 4, 1)]):
        assert report["grad_max_diff"] > 100 * TOLERANCE * max(1.0, report["grad_max"]), report


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
def test_loader_gives_each_group_the_same_batches_and_the_groups_all_rows(two_processes, four_processes):
    for report in (two_processes[("loader", 2, 1)], four_processes[("loader", 2, 2)],
                   four_processes[("loader", 4, 1)]):
        assert report["same_in_group"] and report["every_row_once"], report
    assert four_processes[("loader", 2, 2)]["batches"] == 4 and four_processes[("loader", 4, 1)]["batches"] == 8


# ----------------------------------------------------------------------------- the Trainer, end to end

def _trainer(tmp: Path, nproc: int, batch: int, size: int, mode: str) -> dict:
    out = tmp / f"trainer-{nproc}-{size}-{mode}.pt"
    args = ["--trainer", str(out), str(batch), str(size), mode]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(_port()), str(WORKER)] if nproc > 1 else [sys.executable, str(WORKER)])
    result = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def one_process_trainer(tmp_path_factory):
    return _trainer(tmp_path_factory.mktemp("trainer"), 1, 4, 1, "none")


def _same_training(got: dict, want: dict) -> None:
    assert len(got["losses"]) == len(want["losses"]) == 3
    for a, b in zip(got["losses"], want["losses"]):
        assert abs(a - b) <= TOLERANCE * max(1.0, abs(b)), (got["losses"], want["losses"])
    assert abs(got["eval_loss"] - want["eval_loss"]) <= TOLERANCE * max(1.0, want["eval_loss"])
    assert got["state"].keys() == want["state"].keys()
    for key, value in want["state"].items():
        assert float((got["state"][key] - value).abs().max()) <= TOLERANCE, key


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
def test_trainer_on_two_processes_sharing_each_row_trains_like_one(one_process_trainer, tmp_path):
    _same_training(_trainer(tmp_path, 2, 4, 2, "ring"), one_process_trainer)


@pytest.mark.slow
def test_trainer_on_two_groups_of_two_trains_like_one(one_process_trainer, tmp_path):
    _same_training(_trainer(tmp_path, 4, 2, 2, "ulysses"), one_process_trainer)


# ----------------------------------------------------------------------------- CUDA (marker gpu)

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
GPU_SCENARIOS = ["llama-ulysses-full", "llama-ring-full", "qwen3-ulysses-lora", "mistral-window-ring-full",
                 "qwen3_moe-ulysses-full", "llama-dpo-ulysses-lora", "qwen3-dpo-ring-full", "llama-rm-ring-lora",
                 "llama-ulysses-lora-selective", "llama-ring-lora-ddp", "llama-ulysses-full-fsdp2"]


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU (none here): run `make gpu-check` on one")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ring_tiles_on_cuda_equal_masked_sdpa(monkeypatch, dtype):
    """The ring's kernel on a GPU (plain matrix products in tiles, fp32 statistics), one shard:
    equal to sdpa with the same mask, forward and backward (bf16: within bf16 rounding)."""
    monkeypatch.setattr(blocks, "SCORES", 64 * 4 * 16)
    torch.manual_seed(0)
    make = dict(device="cuda", dtype=dtype, requires_grad=True)
    q, k, v = torch.randn(2, 4, 300, 64, **make), torch.randn(2, 2, 300, 64, **make), torch.randn(2, 2, 300, 64, **make)
    positions = torch.tensor([list(range(120)) + list(range(30)) + list(range(150)), list(range(300))], device="cuda")
    first = ring.first_keys(positions, 64)
    out = ring.ring_attention(q, k, v, first, first.cpu(), ring.segment_starts(positions).cpu(), _layout(1, 0), 0.125)
    index = torch.arange(300, device="cuda")
    mask = (index[None, :] <= index[:, None])[None] & (index[None, None, :] >= first[:, :, None])
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=0.125,
                                                            enable_gqa=True)
    grad = torch.randn_like(out)
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, want, **tolerance)
    for got, expected in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(got, expected, **tolerance)


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs ({GPUS} here): run `make gpu-check` on a machine with two")
def test_two_gpus_over_nccl_equal_one():
    """The scenarios of the CPU runs on 2 GPUs (NCCL, TF32 off): the same tolerance."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_port()), str(WORKER), "--size=2", "--device=cuda", *GPU_SCENARIOS]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = {r["scenario"]: r for r in map(json.loads, (line for line in result.stdout.splitlines()
                                                           if line.startswith("{")))}
    assert sorted(reports) == sorted(GPU_SCENARIOS)
    for report in reports.values():
        _equal(report)
