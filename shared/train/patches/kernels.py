"""`--kernels liger|unsloth`: fused GPU kernels for training (CUDA only).

liger    Liger-Kernel (LinkedIn), applied through its own patching API
         (`liger_kernel.transformers._apply_liger_kernel_to_instance`, which calls the
         `apply_liger_kernel_to_<arch>` of the model's type): fused RMSNorm, RoPE, SwiGLU and the
         fused linear cross-entropy (the output layer and the loss in one Triton kernel, no logits
         in memory). It replaces lmforge's own chunked loss (lossfn.py), which does the same job
         on any device.
unsloth  Unsloth's LoRA path (`unsloth.FastLanguageModel`): its loader patches the model's
         attention, MLP and LoRA layers with its Triton kernels and its LoRA wrapper replaces
         PEFT's `get_peft_model`. LoRA only (rank, alpha, dropout, targets, rsLoRA as given),
         4-bit base with --quant 4; other methods are refused.

Both packages need Triton and a CUDA GPU: on a CPU (or Apple's MPS) the option is refused with one
line before anything is loaded, and a missing package names the pip command (extra `gpu`).
"""

from __future__ import annotations

from lmforge.shared.core.errors import BadInput

UNSLOTH_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "cohere", "granite")


def check(kernels: str, device_kind: str, method: str, quant: int | None) -> None:
    """Refuse what cannot run here, before loading anything (BadInput, one line)."""
    if kernels in ("none", "", None):
        return
    if device_kind != "cuda":
        raise BadInput(f"--kernels {kernels} needs a CUDA GPU (its Triton kernels have no {device_kind} version)",
                       "drop --kernels on this machine; the chunked loss already keeps logits small on a CPU")
    if kernels == "liger":
        _liger()
    elif kernels == "unsloth":
        if method != "lora":
            raise BadInput(f"--kernels unsloth is Unsloth's LoRA path: --method lora, not {method}",
                           "use --method lora, or --kernels liger")
        if quant == 8:
            raise BadInput("--kernels unsloth loads 4-bit or 16-bit bases, not --quant 8", "use --quant 4 or none")
        _unsloth()
    else:
        raise BadInput(f"--kernels {kernels}: use liger or unsloth")


def _liger():
    try:
        from liger_kernel import transformers as liger
    except ImportError:
        raise BadInput("--kernels liger needs liger-kernel", "pip install liger-kernel  (or 'lmforge[gpu]')") from None
    return liger


def _unsloth():
    try:
        import unsloth
    except ImportError:
        raise BadInput("--kernels unsloth needs unsloth", "pip install unsloth") from None
    except (NotImplementedError, RuntimeError) as exc:   # it refuses machines without a supported GPU
        raise BadInput(f"--kernels unsloth: unsloth does not run here ({str(exc).splitlines()[0][:160]})") from None
    return unsloth


def apply_liger(model) -> None:
    """Patch `model` (a causal LM, before PEFT wraps it) with Liger's kernels for its type."""
    liger = _liger()
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    kind = getattr(model.config, "model_type", None)
    if kind not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise BadInput(f"--kernels liger: Liger-Kernel has no kernels for {kind} models",
                       "drop --kernels (supported: " + ", ".join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)[:12]) + ", ...)")
    liger._apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                          fused_linear_cross_entropy=True)


def load_unsloth(name: str, device, *, cutoff: int | None, quant: int | None):
    """The base model through Unsloth's loader (its patched modules), with its tokenizer discarded
    (ours, matching the packed data, is kept)."""
    _unsloth()
    from transformers import AutoConfig
    from unsloth import FastLanguageModel

    kind = getattr(AutoConfig.from_pretrained(str(name)), "model_type", None)
    if kind not in UNSLOTH_ARCHS:
        raise BadInput(f"--kernels unsloth: Unsloth does not support {kind} models",
                       f"use --kernels liger or none (Unsloth: {', '.join(UNSLOTH_ARCHS)})")
    model, _tokenizer = FastLanguageModel.from_pretrained(model_name=str(name), max_seq_length=cutoff or 2048,
                                                          dtype=device.dtype, load_in_4bit=quant == 4)
    return model


def unsloth_lora(model, method, gradient_checkpointing: bool, seed: int):
    """Unsloth's LoRA wrapper in place of PEFT's get_peft_model (same rank, alpha, dropout, targets)."""
    from unsloth import FastLanguageModel

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] \
        if method.lora_target == "all" else [t.strip() for t in method.lora_target.split(",") if t.strip()]
    return FastLanguageModel.get_peft_model(
        model, r=method.lora_rank, lora_alpha=method.lora_alpha or 2 * method.lora_rank,
        lora_dropout=method.lora_dropout, target_modules=targets, bias="none", use_rslora=method.rslora,
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False, random_state=seed)
