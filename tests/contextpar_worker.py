"""Context parallelism against one process, run under torchrun by tests/test_contextpar.py.

    python -m torch.distributed.run --nproc-per-node P tests/contextpar_worker.py --size N SCENARIO...

Every process builds the same tiny model (seeded, fp32) and the same global batch. The reference
is the plain model on the whole batch in one process (transformers' sdpa with its own mask from
the restarting position ids; lmforge's single-process forward for the preference loss). The
context-parallel run installs the attention on a copy, takes its data-parallel group's rows and
its shard of them, and its gradients are averaged over all processes as DDP does (or by DDP or
FSDP2 themselves). Process 0 prints one JSON line per scenario: the two losses and the largest
gradient difference. A failure in any process ends the whole job (a collective would hang).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

VOCAB = 97
_DEFAULTS: dict = {}   # the ring's tile budget and kernel as the package sets them
# (lengths of the examples in each row): examples straddle the shard boundaries of N = 2 and 4,
# the rows' lengths differ (the shorter is padded as the collator does) and 39 needs the
# context-parallel padding for both
ROWS = [[13, 9, 1, 16], [23, 11], [5, 30, 4], [39]]
PAIRS = [(7, 9, 5), (4, 13, 17), (10, 3, 8), (6, 11, 12)]   # (prompt, chosen, rejected) lengths

SCENARIOS: dict[str, dict] = {
    # name: arch, mode, method (full|lora), loss (sft|dpo|rm), checkpointing, wrapper (ddp|fsdp2), config keys
    "llama-ulysses-full": dict(arch="llama", mode="ulysses", method="full"),
    "llama-ring-full": dict(arch="llama", mode="ring", method="full"),
    "qwen3-ulysses-lora": dict(arch="qwen3", mode="ulysses", method="lora"),
    "qwen3-ring-lora": dict(arch="qwen3", mode="ring", method="lora"),
    "qwen3-ulysses-lora-installed-before-peft": dict(arch="qwen3", mode="ulysses", method="lora", before_peft=True),
    "mistral-window-ulysses-lora": dict(arch="mistral", mode="ulysses", method="lora"),
    "mistral-window-ring-full": dict(arch="mistral", mode="ring", method="full"),
    "qwen2-window-ring-full": dict(arch="qwen2", mode="ring", method="full"),
    "qwen3_moe-ulysses-full": dict(arch="qwen3_moe", mode="ulysses", method="full"),
    "mixtral-ring-lora": dict(arch="mixtral", mode="ring", method="lora"),
    "llama-mqa-ulysses-full": dict(arch="llama", mode="ulysses", method="full", keys={"num_key_value_heads": 1}),
    "llama-dpo-ulysses-lora": dict(arch="llama", mode="ulysses", method="lora", loss="dpo"),
    "qwen3-dpo-ring-full": dict(arch="qwen3", mode="ring", method="full", loss="dpo"),
    "mistral-dpo-ring-lora": dict(arch="mistral", mode="ring", method="lora", loss="dpo"),
    "llama-rm-ring-lora": dict(arch="llama", mode="ring", method="lora", loss="rm"),
    "llama-ulysses-lora-selective": dict(arch="llama", mode="ulysses", method="lora", checkpointing="selective"),
    "llama-ring-lora-selective": dict(arch="llama", mode="ring", method="lora", checkpointing="selective"),
    # tiles of 16 query rows (rows this short are otherwise one tile), on the CPU's fused kernel and
    # on the plain matrix products the ring uses elsewhere
    "qwen3-ring-full-tiled": dict(arch="qwen3", mode="ring", method="full", scores=16 * 4 * 20),
    "mistral-window-ring-lora-matmul": dict(arch="mistral", mode="ring", method="lora", kernel="matmul",
                                            scores=16 * 4 * 20),
    "llama-dpo-ring-full-matmul": dict(arch="llama", mode="ring", method="full", loss="dpo", kernel="matmul"),
    "qwen3-ring-full-checkpointing": dict(arch="qwen3", mode="ring", method="full", checkpointing="full"),
    "llama-ulysses-full-ddp": dict(arch="llama", mode="ulysses", method="full", wrapper="ddp"),
    "llama-ring-lora-ddp": dict(arch="llama", mode="ring", method="lora", wrapper="ddp"),
    "llama-ulysses-full-fsdp2": dict(arch="llama", mode="ulysses", method="full", wrapper="fsdp2"),
    # as a Trainer would run DPO: through the DDP wrapper, lmforge's output-layer stand-in returning
    # the hidden states (lossfn.install), the log-probs in chunks from them
    "llama-dpo-ring-lora-ddp": dict(arch="llama", mode="ring", method="lora", loss="dpo", wrapper="ddp"),
    # the control: sharded alike, but no context-parallel attention (each shard sees only itself)
    "control-no-exchange": dict(arch="llama", mode="none", method="full"),
}

ARCH_KEYS = {
    "llama": {},
    "qwen3": {},
    "mistral": {"sliding_window": 8},   # narrower than most examples
    # layer 0 full attention, layer 1 a sliding window
    "qwen2": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    # the router trains under full tuning: lmforge switches the load-balancing loss on (methods.apply)
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "output_router_logits": True, "router_aux_loss_coef": 0.5},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
}


def spec_of(name: str) -> dict:
    """A scenario; "matrix-ARCH-MODE": full tuning on tests/archmatrix.py's tiny ARCH (its own config keys)."""
    if name.startswith("matrix-"):
        arch, mode = name[len("matrix-"):].rsplit("-", 1)
        return dict(arch=arch, mode=mode, method="full", matrix=True)
    return SCENARIOS[name]


def tiny_model(arch: str, method: str, keys: dict, device, matrix: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
                 pad_token_id=0)
    if matrix:   # the matrix's own sizes and keys (hidden 32, heads of 8)
        from archmatrix import ARCHS, BASE

        model_type, arch_keys, _ = ARCHS[arch]
        sizes = {**BASE, "vocab_size": VOCAB, "pad_token_id": 0}
        keys = {**{k: v for k, v in arch_keys.items() if v is not None}, **keys}
        arch = model_type
    config = AutoConfig.for_model(arch, **{**sizes, **({} if matrix else ARCH_KEYS[arch]), **keys})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():   # large enough weights that every layer matters (as tests/archmatrix.py)
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "norm" not in name:
                p.normal_(0, 0.2)
    if method == "lora":
        model = with_lora(model)
    return model.to(device).train()


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def sft_batch(rows: list[list[int]]) -> dict:
    """As PackedCollator makes them (neat packing): positions restart per example, the first label
    of every example is -100, rows right-padded with positions going on; some prompt labels -100."""
    generator = torch.Generator().manual_seed(2)
    longest = max(sum(r) for r in rows)
    ids, labels, positions = [], [], []
    for lengths in rows:
        n = sum(lengths)
        row_ids = torch.randint(1, VOCAB, (longest,), generator=generator)
        row_labels = row_ids.clone()
        row_positions: list[int] = []
        start = 0
        for length in lengths:
            row_labels[start:start + max(1, length // 3)] = -100   # the first label, and a prompt
            row_positions += range(length)
            start += length
        row_positions += range(row_positions[-1] + 1, row_positions[-1] + 1 + longest - n)
        row_labels[n:] = -100
        ids.append(row_ids)
        labels.append(row_labels)
        positions.append(torch.tensor(row_positions))
    return {"input_ids": torch.stack(ids), "labels": torch.stack(labels), "position_ids": torch.stack(positions),
            "use_cache": False}


def pair_batch(pairs) -> dict:
    """As TRL's DataCollatorForPreference: rows [chosen...; rejected...], right-padded."""
    generator = torch.Generator().manual_seed(3)
    seqs, completions = [], []
    prompts = [torch.randint(1, VOCAB, (p,), generator=generator) for p, _, _ in pairs]
    for side in (1, 2):
        for prompt, lengths in zip(prompts, pairs):
            answer = torch.randint(1, VOCAB, (lengths[side],), generator=generator)
            seqs.append(torch.cat([prompt, answer]))
            completions.append(torch.cat([torch.zeros(len(prompt)), torch.ones(len(answer))]))
    longest = max(len(s) for s in seqs)
    pad = [longest - len(s) for s in seqs]
    return {"input_ids": torch.stack([torch.nn.functional.pad(s, (0, p)) for s, p in zip(seqs, pad)]),
            "attention_mask": torch.stack([torch.nn.functional.pad(torch.ones(len(s)), (0, p)) for s, p in zip(seqs, pad)]).long(),
            "completion_mask": torch.stack([torch.nn.functional.pad(c, (0, p)) for c, p in zip(completions, pad)]).long()}


def reward_batch(pairs) -> dict:
    batch = pair_batch(pairs)
    return {"input_ids": batch["input_ids"], "last_index": batch["attention_mask"].sum(1) - 1}


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _causal(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _reference_off(model):
    """The DPO reference: the adapter switched off (LoRA), else the policy itself (no gradient)."""
    import contextlib

    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def dpo_of(chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected):
    from lmforge.shared.train.preference import dpo_loss

    return dpo_loss("sigmoid", 0.5, chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected).mean()


def _pair_rows(batch: dict, keep: slice) -> dict:
    """The pairs `keep` of a [chosen; rejected] batch, as a batch of their own."""
    half = batch["input_ids"].shape[0] // 2
    index = torch.cat([torch.arange(half)[keep], torch.arange(half, 2 * half)[keep]])
    return {k: v[index] for k, v in batch.items()}


def _group_rows(count: int, groups: int, group: int) -> slice:
    per_group = count // groups
    return slice(group * per_group, (group + 1) * per_group)


def _sft_rows(keep: slice) -> dict:
    """The rows `keep` of the SFT batch, padded to their own longest (as that group's collator would)."""
    batch = {k: v[keep] if torch.is_tensor(v) else v for k, v in sft_batch(ROWS).items()}
    length = max(sum(r) for r in ROWS[keep])
    return {k: v[:, :length] if torch.is_tensor(v) else v for k, v in batch.items()}


def _target_tokens() -> torch.Tensor:
    """The Trainer's num_items_in_batch for the whole global batch."""
    return (sft_batch(ROWS)["labels"][:, 1:] != -100).sum().to(torch.float32)


def reference(spec: dict, model, device, groups: int) -> tuple[torch.Tensor, dict]:
    """One process. With one data-parallel group: the whole batch, the plain model. With W groups:
    each group's rows on their own, their losses combined as DDP and the Trainer combine them (the
    same maths: the token loss over the whole batch's tokens, the mean of the pairs' losses; only a
    router's load-balancing loss differs, counted per group as DDP counts it)."""
    loss_kind = spec.get("loss", "sft")
    if loss_kind == "rm":
        from lmforge.shared.model.value import ValueModel

        torch.manual_seed(4)
        model = ValueModel(model).to(device)
    total = torch.zeros((), device=device)
    for group in range(groups):
        if loss_kind == "sft":
            keep = _group_rows(len(ROWS), groups, group)
            total = total + model(**_to(_sft_rows(keep), device), num_items_in_batch=_target_tokens().to(device)).loss
            continue
        keep = _group_rows(len(PAIRS), groups, group)
        if loss_kind == "dpo":
            from lmforge.shared.train.preference import completion_logps

            batch = _to(_pair_rows(pair_batch(PAIRS), keep), device)
            logps, counts = completion_logps(model, batch)
            with torch.no_grad(), _reference_off(model):
                ref, _ = completion_logps(model, batch)
            loss = dpo_of(*logps.chunk(2), *ref.chunk(2), *counts.chunk(2))
        else:
            batch = _to(_pair_rows(reward_batch(PAIRS), keep), device)
            chosen, rejected = model(**batch).chunk(2)
            loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        total = total + loss / groups
    total.backward()
    return total.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def context_parallel(spec: dict, model, layout, device) -> tuple[torch.Tensor, dict]:
    """This process's loss (the convention of contextpar.losses), the gradients averaged over all
    processes, and the loss of the whole global batch for the report."""
    from lmforge.shared.train.contextpar import attention, losses
    from lmforge.shared.train.contextpar.shard import shard_causal, shard_pairs, shard_rewards

    world = dist.get_world_size()
    loss_kind = spec.get("loss", "sft")
    if spec.get("checkpointing"):
        from lmforge.shared.train.checkpointing import checkpointing_kwargs

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs(spec["checkpointing"]))
    head = None
    if loss_kind == "rm":
        from lmforge.shared.model.value import ValueModel

        torch.manual_seed(4)
        model = ValueModel(model).to(device)
    if spec["mode"] != "none" and not spec.get("before_peft"):   # "none": the control, each shard to itself
        chosen_mode = attention.install(model, layout, spec["mode"])
        assert chosen_mode == spec["mode"], chosen_mode
    if loss_kind == "dpo" and spec.get("wrapper") == "ddp":
        from lmforge.shared.train.patches import lossfn

        lossfn.install(model)   # the model's output layer now hands back the hidden states
    wrapped = model
    if spec.get("wrapper") == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, find_unused_parameters=False)
    elif spec.get("wrapper") == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in _causal(model).model.layers:
            fully_shard(layer)
        fully_shard(model)
    keep = _group_rows(len(ROWS if loss_kind == "sft" else PAIRS), layout.dp_size, layout.dp_rank)
    if loss_kind == "sft":
        shard = _to(shard_causal(_sft_rows(keep), layout), device)
        # the Trainer's num_items_in_batch: target tokens over all processes (every shard's shift_labels)
        count = (shard["shift_labels"] != -100).sum().to(torch.float32)
        dist.all_reduce(count)
        out = wrapped(**shard, num_items_in_batch=count)
        loss = out.loss * world   # the Trainer's scaling (average_tokens_across_devices); DDP then averages
        shown = out.loss.detach().clone()
        dist.all_reduce(shown)
    elif loss_kind == "dpo":
        shard = _to(shard_pairs(_pair_rows(pair_batch(PAIRS), keep), layout), device)
        causal = _causal(model)
        head = causal.get_output_embeddings()

        def logps(through_wrapper: bool):
            if through_wrapper:   # the policy under DDP: its forward, whose output layer hands back hidden states
                hidden = wrapped(input_ids=shard["input_ids"], position_ids=shard["position_ids"], use_cache=False).logits
            else:   # the body itself (no wrapper: the reference, without gradient, needs none)
                hidden = causal.base_model(input_ids=shard["input_ids"], position_ids=shard["position_ids"],
                                           use_cache=False).last_hidden_state
            return losses.completion_logps(hidden, head.weight, head.bias, shard, layout)

        sums, counts = logps(spec.get("wrapper") == "ddp")
        with torch.no_grad(), _reference_off(model):
            ref, _ = logps(False)
        loss = dpo_of(*sums.chunk(2), *ref.chunk(2), *counts.chunk(2))
        shown = loss.detach().clone()
        dist.all_reduce(shown)
        shown /= world   # the mean of the data-parallel groups' losses
    else:
        shard = _to(shard_rewards(_pair_rows(reward_batch(PAIRS), keep), layout), device)
        hidden = model.decoder()(input_ids=shard["input_ids"], position_ids=shard["position_ids"],
                                 use_cache=False).last_hidden_state
        scores = model.head(losses.pick(hidden, shard["last_index"], layout)).squeeze(-1)
        chosen, rejected = scores.chunk(2)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        shown = loss.detach().clone()
        dist.all_reduce(shown)
        shown /= world
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grad = p.grad.detach()
        if spec.get("wrapper") == "fsdp2":
            grad = grad.full_tensor()   # FSDP2 reduce-scatters (averaged) already
        elif spec.get("wrapper") != "ddp":
            grad = grad.clone()
            dist.all_reduce(grad)
            grad /= world
        grads[name.replace("_checkpoint_wrapped_module.", "")] = grad.clone()
    attention.uninstall(model)
    return shown, grads


def run(name: str, layout, device) -> dict:
    from lmforge.shared.train.contextpar import blocks

    spec = spec_of(name)
    started = time.monotonic()
    blocks.SCORES = spec.get("scores", _DEFAULTS.setdefault("scores", blocks.SCORES))
    fused = _DEFAULTS.setdefault("fused", blocks._cpu_flash)
    blocks._cpu_flash = fused if spec.get("kernel") != "matmul" else (lambda: None)
    if spec.get("before_peft"):   # the attention installed on the plain model, PEFT wrapping it afterwards
        from lmforge.shared.train.contextpar import attention

        base = tiny_model(spec["arch"], "full", spec.get("keys", {}), device)
        cp_model = copy.deepcopy(base)
        attention.install(cp_model, layout, spec["mode"])
        base, cp_model = with_lora(base).train(), with_lora(cp_model).train()
    else:
        base = tiny_model(spec["arch"], spec["method"], spec.get("keys", {}), device, spec.get("matrix", False))
        cp_model = copy.deepcopy(base)
    want_loss, want = reference(spec, base, device, layout.dp_size)
    got_loss, got = context_parallel(spec, cp_model, layout, device)
    if set(got) != set(want):
        raise AssertionError(f"{name}: gradients of {sorted(set(got) ^ set(want))[:4]} on one side only")
    worst, where, largest, relative = 0.0, "", 0.0, 0.0
    for key, value in want.items():
        diff = float((got[key].to(value.device) - value).abs().max())
        scale = float(value.abs().max())
        largest = max(largest, scale)
        relative = max(relative, diff / max(scale, 1e-3))   # each parameter against its own largest gradient
        if diff >= worst:
            worst, where = diff, key
    return {"scenario": name, "size": layout.size, "dp": layout.dp_size, "loss_ref": float(want_loss),
            "loss_cp": float(got_loss), "loss_diff": abs(float(want_loss) - float(got_loss)),
            "grad_max_diff": worst, "grad_worst": where, "grad_max": largest, "grad_param_rel": relative,
            "grads": len(want),
            "seconds": round(time.monotonic() - started, 2)}


def check_loader(layout) -> dict:
    """regroup_loader: the processes of a group read the same batches, the groups different ones,
    together every row once."""
    from accelerate import PartialState
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from lmforge.shared.train.contextpar.shard import regroup_loader

    PartialState()
    loader = DataLoader(list(range(16)), batch_size=2, shuffle=True)
    prepared = prepare_data_loader(loader, num_processes=dist.get_world_size(), process_index=dist.get_rank(),
                                   put_on_device=False, use_seedable_sampler=True, data_seed=5)
    regroup_loader(prepared, layout)
    mine = torch.cat([b for b in prepared])
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    groups = [everyone[g * layout.size:(g + 1) * layout.size] for g in range(layout.dp_size)]
    same = all(torch.equal(g[0], other) for g in groups for other in g)
    rows = sorted(int(x) for g in groups for x in g[0])
    return {"scenario": "loader", "size": layout.size, "dp": layout.dp_size, "same_in_group": same,
            "every_row_once": rows == list(range(16)), "batches": len(prepared)}


def train_with_trainer(out: str, batch_size: int, size: int, mode: str) -> None:
    """The Hugging Face Trainer as lmforge sets it up for sft (PackedCollator on neat-packed rows,
    lmforge's chunked loss), a few SGD steps with gradient accumulation; with `size` > 1 under
    torchrun, context-parallel: the attention installed, the collator wrapped, the loader
    regrouped. Process 0 saves the trained weights and the losses to `out`."""
    import tempfile

    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from lmforge.shared.data.collate import PackedCollator
    from lmforge.shared.train.patches import lossfn

    generator = torch.Generator().manual_seed(6)
    rows = []
    for i in range(8):
        lengths = [[13, 9, 1, 16], [23, 11], [5, 30, 4], [39], [20, 17], [3, 3, 30], [12, 12, 12], [37]][i]
        ids = torch.randint(1, VOCAB, (sum(lengths),), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids, "lengths": lengths})
    model = tiny_model("llama", "full", {}, torch.device("cpu"))
    collator = PackedCollator(neat=True)
    layout = None
    if size > 1:
        from lmforge.shared.train.contextpar import attention
        from lmforge.shared.train.contextpar.layout import setup
        from lmforge.shared.train.contextpar.shard import ShardingCollator

        dist.init_process_group("gloo")
        layout = setup(size)
        attention.install(model, layout, mode)
        collator = ShardingCollator(collator, layout, "causal")
    lossfn.install(model)

    from lmforge.shared.train.contextpar.trainer import ContextParallelMixin

    class CPTrainer(ContextParallelMixin, Trainer):
        pass

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch_size, gradient_accumulation_steps=2,
                                 per_device_eval_batch_size=batch_size, max_steps=3, learning_rate=0.05, optim="sgd",
                                 lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                                 logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                                 data_seed=0, remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0,
                                 ddp_backend="gloo" if size > 1 else None, ddp_find_unused_parameters=False)
        trainer = CPTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                            eval_dataset=Dataset.from_list(rows[:4]), data_collator=collator)
        trainer.cp_layout = layout
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        evaluated = trainer.evaluate()["eval_loss"]
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "losses": losses,
                    "eval_loss": evaluated}, out)


def main() -> None:
    if sys.argv[1:2] == ["--trainer"]:   # --trainer OUT BATCH SIZE MODE
        out, batch, size, mode = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        train_with_trainer(out, batch, size, mode)
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, action="append", required=True, help="processes per sequence (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("scenarios", nargs="*")
    args = parser.parse_args()
    from datetime import timedelta

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=120))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from lmforge.shared.train.contextpar.layout import setup

    try:
        for size in args.size:
            layout = setup(size)
            for name in args.scenarios:
                result = check_loader(layout) if name == "loader" else run(name, layout, device)
                if dist.get_rank() == 0:
                    print(json.dumps(result), flush=True)
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)   # the other processes would wait in a collective for ever
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
