"""`--checkpointing selective`: gradient checkpointing that keeps the expensive outputs.

Full checkpointing (`--gradient-checkpointing`, transformers' own) keeps only each decoder layer's
input and runs the whole layer forward again in backward: every product and every attention kernel
twice. Selective checkpointing (PyTorch's selective activation checkpointing, SAC) runs the same
recompute, but with the outputs of the costly operations kept from the forward pass, so that only
the cheap ones run again (norms, RoPE, activations, casts, the rank-r adapter products):

- the output of each LoRA layer on lmforge's fused path (shared/train/lorafused.py): the base
  product with the adapter's added, one tensor per layer (its rank-r inner product is recomputed);
- the output of each attention kernel (sdpa's flash, efficient, cuDNN and CPU kernels, and the
  flash-attn package's), with its softmax statistics.

So a step costs nearly what it costs without checkpointing, and memory sits between the two: the
layer outputs named above instead of every intermediate (SmolLM2-135M: about 14 of 30 KB per token
and layer; tests/bench/RESULTS.md, bench:train).

Only outputs lmforge's own code produces (marked while `keep()` is on) or attention kernels return
are kept, never products in general: PyTorch's SAC checks that a kept output is not changed in
place before backward, but not when the product came out of a 3-D `F.linear` (its `_unsafe_view`
drops the check), and model code adding into a projection's output in place would then silently
corrupt the recomputed gradients. Where the fused LoRA path steps aside (fp32 adapters over an
fp32 base, full or freeze tuning, quantized bases) and for a mixture of experts' fused expert
weights (not LoRA layers), only attention outputs are kept and those products run again.
"""

from __future__ import annotations

import contextlib
import functools
import threading

_MARK = threading.local()   # set while lmforge's own kernels compute an output worth keeping


@contextlib.contextmanager
def keep():
    """Mark the products computed inside as outputs selective checkpointing keeps."""
    was = getattr(_MARK, "on", False)
    _MARK.on = True
    try:
        yield
    finally:
        _MARK.on = was


@functools.cache
def _attention_ops() -> frozenset:
    import torch

    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_flash_attention_forward", "_efficient_attention_forward")
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


def _policy(attention, ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    if op in attention or getattr(_MARK, "on", False) or op.namespace == "flash_attn":
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class _ContextFn(str):
    """The `context_fn` of `torch.utils.checkpoint.checkpoint` (non-reentrant) for selective checkpointing.

    A str that can be called: it travels inside TrainingArguments' `gradient_checkpointing_kwargs`,
    which must stay JSON (TensorBoard's callback logs the arguments as JSON; a function would stop it),
    and be copied and pickled with them (TRL re-enables checkpointing from those kwargs)."""

    def __call__(self):
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        return create_selective_checkpoint_contexts(functools.partial(_policy, _attention_ops()))


def checkpointing_kwargs(policy: str, every: int = 1) -> dict:
    """transformers' `gradient_checkpointing_kwargs` for --checkpointing full|selective and
    --checkpoint-every N (the Trainer takes `every_n_layers` out; the rest goes to `checkpoint`)."""
    kwargs: dict = {"use_reentrant": False}
    if every > 1:
        kwargs["every_n_layers"] = every
    if policy == "selective":
        kwargs["context_fn"] = _ContextFn("lmforge selective checkpointing")
    return kwargs
