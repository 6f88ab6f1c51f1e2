"""Context parallelism in lmforge's training stages (pt, sft, rm, the dpo family): the process
groups set up before the model loads, the checks that need the data, and the trainer a stage
built, changed so its batches are cut into shards and its loaders feed a group the same rows.
The preference and reward losses read the group's sums through `policy_logps`, `reference_logps`
and `ValueModel.cp_layout` (losses.py)."""

from __future__ import annotations

import os

from lmforge.shared.train.contextpar import checks

KINDS = {"pt": "causal", "sft": "causal", "rm": "rewards", "dpo": "pairs"}


def size_of(o) -> int:
    return int(getattr(o, "context_parallel", 1) or 1)


def check(o, vision: bool = False) -> None:
    """Refuse what cannot run, before anything loads (and again with the data: `vision`)."""
    from lmforge.shared.core.errors import BadInput

    checks.check_options(size_of(o), getattr(o, "context_parallel_mode", "auto"), stage=o.stage,
                         world_size=int(os.environ.get("WORLD_SIZE", "1")), attn=o.attn,
                         shift_attn=getattr(o, "shift_attn", False), deepspeed=getattr(o, "deepspeed", None),
                         kernels=getattr(o, "kernels", "none"), vision=vision, loss=getattr(o, "loss", None))
    if size_of(o) > 1 and getattr(o, "precompute_ref", False):
        raise BadInput("--precompute-ref with --context-parallel: TRL precomputes over whole rows in one process",
                       "drop --precompute-ref (LoRA uses the policy without its adapter as the reference)")


def setup(o, device):
    """The process groups (None without context parallelism). torch.distributed is started here
    when the launcher has not, so that the groups exist before the model loads; accelerate then
    uses the same process group."""
    if size_of(o) <= 1:
        return None
    import torch
    import torch.distributed as dist

    from lmforge.shared.train.contextpar import layout as layouts

    if device.kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))   # before NCCL starts
    if not dist.is_initialized():
        dist.init_process_group("gloo" if device.kind == "cpu" else "nccl")
    return layouts.setup(size_of(o))


def shard_trainer(trainer, layout, stage: str, pad_id: int) -> None:
    """The trainer a stage built, made context-parallel: its collator cuts each batch into this
    process's shard, its loaders give the N processes of a group the same batches."""
    from lmforge.shared.train.contextpar.shard import ShardingCollator
    from lmforge.shared.train.contextpar.trainer import ContextParallelMixin

    trainer.data_collator = ShardingCollator(trainer.data_collator, layout, KINDS[stage], pad_id)
    cls = type(trainer)
    trainer.__class__ = type(f"ContextParallel{cls.__name__}", (ContextParallelMixin, cls), {})
    trainer.cp_layout = layout
    if stage == "rm":
        import functools

        from lmforge.shared.train.contextpar.losses import pick

        # the reward model's last-token state, from whichever process's shard holds it
        trainer.accelerator.unwrap_model(trainer.model).picker = functools.partial(pick, layout=layout)
    elif stage == "dpo":
        # the policy runs through the (DDP-)wrapped model with the chunked loss's stand-in output
        # layer, which hands back the hidden states: the log-probs come from them, across the group
        trainer.lmforge_chunked_loss = True


def _head_of(model):
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal, causal.get_output_embeddings()


def policy_logps(trainer, model, inputs):
    """(summed completion log-probs per row over the whole row, counts), through `model` as the
    trainer holds it (DDP-wrapped), with gradients."""
    from lmforge.shared.train.contextpar.losses import completion_logps

    _, head = _head_of(trainer.accelerator.unwrap_model(model))
    with trainer.accelerator.autocast():
        hidden = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False).logits
    return completion_logps(hidden, head.weight, head.bias, inputs, trainer.cp_layout)


def reference_logps(reference, trainer, inputs):
    """The reference model's summed completion log-probs per row (no gradient)."""
    import torch

    from lmforge.shared.train.contextpar.losses import completion_logps

    causal, head = _head_of(reference)
    with torch.no_grad(), trainer.accelerator.autocast():
        hidden = causal.base_model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                                   use_cache=False).last_hidden_state
        return completion_logps(hidden, head.weight, head.bias, inputs, trainer.cp_layout)[0]
