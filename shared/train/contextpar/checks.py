"""What context parallelism refuses, as one-line BadInput errors: the options (before anything
loads, no torch imported) and the model (once its config is known)."""

from __future__ import annotations

from lmforge.shared.core.errors import BadInput

MODES = ("auto", "ulysses", "ring")
STAGES = ("pt", "sft", "rm", "dpo")
# preference losses computed from per-sequence log-prob sums (all-reduced over the group)
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "orpo", "simpo")
# plain causal softmax attention called through transformers' AttentionInterface with the position
# ids: the architectures lmforge's per-example attention serves (packedattn.ARCHS), which Ulysses
# runs inside and whose masking rules (causal, per example, sliding window) the ring reproduces
ARCHS = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "phi", "phi3", "gemma",
         "gemma3_text", "olmo2", "granite", "starcoder2", "stablelm", "cohere", "gpt_neox", "internlm3",
         "deepseek_v3", "smollm3")


def check_options(size: int, mode: str, *, stage: str, world_size: int, attn: str = "auto",
                  shift_attn: bool = False, deepspeed: str | None = None, kernels: str = "none",
                  vision: bool = False, loss: str | None = None) -> None:
    """Refuse a setup context parallelism cannot run, before the model loads. `size` is
    --context-parallel (1: off, nothing checked but the mode's spelling)."""
    if mode not in MODES:
        raise BadInput(f"--context-parallel-mode {mode}: use {', '.join(MODES)}")
    if size < 1:
        raise BadInput(f"--context-parallel {size}: must be at least 1", "1 turns context parallelism off")
    if size == 1:
        return
    if world_size % size:
        raise BadInput(f"--context-parallel {size} needs a multiple of {size} processes, not {world_size}",
                       f"launch with torchrun --nproc-per-node {size} (or a multiple of it)")
    if stage not in STAGES:
        raise BadInput(f"--context-parallel is for train {', '.join(STAGES)}, not train {stage}",
                       "generation (grpo, ppo) needs whole sequences on each process; drop --context-parallel")
    if attn not in ("auto", "sdpa"):
        raise BadInput(f"--context-parallel runs its own attention (sdpa inside), not --attn {attn}",
                       "use --attn auto or sdpa")
    if shift_attn:
        raise BadInput("--shift-attn and --context-parallel exclude each other", "drop one of them")
    if deepspeed:
        from lmforge.shared.core.commands.training import zero3

        if zero3(deepspeed):   # ZeRO-3 gathers each layer's weights in its forward, outside the group's collectives
            raise BadInput("--context-parallel does not run under --deepspeed z3 (ZeRO-3)",
                           "use --deepspeed z2 (or z1), plain data parallelism, or FSDP with it")
    if kernels not in ("none", "", None):
        raise BadInput(f"--kernels {kernels} with --context-parallel: the fused kernels compute the loss over "
                       "whole sequences", "drop --kernels (lmforge's chunked loss runs on the shards)")
    if vision:
        raise BadInput("--context-parallel does not split vision-language rows (an image's tokens would straddle shards)",
                       "train vision data without --context-parallel")
    if stage == "dpo" and loss not in DPO_LOSSES:
        raise BadInput(f"--context-parallel with --loss {loss}: not supported",
                       f"use --loss {', '.join(DPO_LOSSES)}")


def ulysses_fits(heads: int, kv_heads: int, size: int) -> bool:
    """Ulysses gives each process heads/N query heads and the key/value heads they use: the query
    heads must divide by N, and the key/value heads too, or N by them (each is then repeated
    N/Hkv times, so that every process holds one)."""
    return heads % size == 0 and (kv_heads % size == 0 or size % kv_heads == 0)


def resolve_mode(config, size: int, mode: str) -> str:
    """ulysses or ring for this model (auto: Ulysses where the heads allow it); BadInput for a
    model context parallelism does not support or a mode its heads do not allow."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHS:
        raise BadInput(f"--context-parallel: {kind or 'this'} models are not supported",
                       f"supported: {', '.join(ARCHS)}")
    if getattr(config, "attn_logit_softcapping", None):
        raise BadInput(f"--context-parallel: {kind} soft-caps its attention logits", "drop --context-parallel")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    fits = ulysses_fits(heads, kv_heads, size)
    if mode == "ulysses" and not fits:
        raise BadInput(f"--context-parallel-mode ulysses: {heads} query / {kv_heads} key-value heads do not divide "
                       f"among {size} processes", "use --context-parallel-mode ring (or auto)")
    if mode == "ring" or (mode == "auto" and not fits):
        if getattr(config, "attention_dropout", 0.0):
            raise BadInput(f"--context-parallel-mode ring: the model has attention dropout "
                           f"({config.attention_dropout:g})", "use ulysses mode, or a config without attention dropout")
        return "ring"
    return "ulysses"
