"""Loading models for training, merging, evaluation and serving.

- dtype per device: bf16 on GPUs of compute capability >= 8, fp16 on older GPUs, fp32 on CPU
  (unless asked otherwise);
- attention: per architecture, what transformers supports for the model's class
  (`attention_for`): flash_attention_2 when installed on CUDA, else sdpa, else eager;
  an explicit `--attn` the class does not support is refused, naming the ones it does;
- RoPE scaling when the training cutoff exceeds the model's context;
- tokens added by `data pack` (template markers) are added again and the embeddings resized,
  new rows drawn around the mean of the old ones (transformers' `mean_resizing`);
- 4/8-bit loading through bitsandbytes (QLoRA) when asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lmforge.shared.core import log
from lmforge.shared.core.errors import BadInput
from lmforge.shared.modeldir.config import is_quantized, is_vision, load_config
from lmforge.shared.modeldir.tokenizers import load_tokenizer_for
from lmforge.shared.modeldir.weights import load_weights


@dataclass
class Device:
    kind: str                 # cuda | mps | cpu
    dtype_name: str           # bf16 | fp16 | fp32
    attn: str

    @property
    def dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype_name]


def dtype_for(kind: str, capability: tuple[int, int] | None = None) -> str:
    """The precision `--precision auto` picks: bf16 on CUDA GPUs of compute capability >= 8.0
    (A100, L4, H100/H200: bf16 tensor cores), fp16 on older ones (V100 7.0, T4 7.5: no bf16
    tensor cores), fp16 on Apple's MPS, fp32 on CPUs."""
    if kind == "cuda":
        return "bf16" if capability is not None and capability[0] >= 8 else "fp16"
    return "fp16" if kind == "mps" else "fp32"


def choose_device(precision: str = "auto", attn: str = "auto") -> Device:
    import torch

    if torch.cuda.is_available():
        kind = "cuda"
        auto = dtype_for(kind, torch.cuda.get_device_capability())
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        kind, auto = "mps", dtype_for("mps")
    else:
        kind, auto = "cpu", dtype_for("cpu")
    dtype = auto if precision == "auto" else precision
    if kind == "cpu" and dtype == "fp16":
        raise BadInput("--precision fp16 needs a GPU", "use bf16 or fp32 on a CPU")
    return Device(kind, dtype, attn)   # attn "auto" is resolved per model by load_model


_preferred_attention = "auto"


def prefer_attention(attn: str) -> None:
    """The `--attn` of a command that loads models for inference (eval, serve, chat)."""
    global _preferred_attention
    _preferred_attention = attn


def attention_for(config, requested: str, device_kind: str, dtype_name: str) -> str:
    """The attention kernel for this model: what its transformers class supports.

    auto: flash_attention_2 on CUDA in half precision when installed, else sdpa, else eager
    (gemma2's soft-capped scores and gpt_oss's attention sinks have only eager on a CPU: see
    archrules). An explicit choice the class lacks is refused with the choices it has."""
    from lmforge.shared.model import archrules

    supported = archrules.attention_kernels(config)
    if requested in ("auto", "", None):
        if "flash_attention_2" in supported and flash_attention_fits(device_kind, dtype_name, _cuda_capability()):
            try:
                import flash_attn  # noqa: F401

                return "flash_attention_2"
            except ImportError:
                pass
        return "sdpa" if "sdpa" in supported else "eager"
    if requested not in supported:
        why = archrules.attention_reason(config)
        raise BadInput(f"--attn {requested}: transformers has no {requested} attention for "
                       f"{getattr(config, 'model_type', '?')} models" + (f" ({why})" if why else ""),
                       f"use --attn {' or '.join(k for k in ('eager', 'sdpa', 'flash_attention_2') if k in supported)}"
                       " (or auto)")
    return requested


def flash_attention_fits(device_kind: str, dtype_name: str, capability: tuple[int, int] | None) -> bool:
    """Whether flash-attention 2 can run here (when installed): CUDA, half precision, and an
    Ampere or newer GPU (compute capability >= 8.0; a V100 or T4 has no kernel for it)."""
    return (device_kind == "cuda" and dtype_name in ("bf16", "fp16") and capability is not None
            and capability[0] >= 8)


def _cuda_capability() -> tuple[int, int] | None:
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def rope_scaling_for(config, cutoff: int | None, kind: str = "auto") -> dict | None:
    """RoPE parameters stretched to `cutoff` when it exceeds the model's context (None: leave as is)."""
    context = getattr(config, "max_position_embeddings", None)
    if kind == "none" or not cutoff or not context or cutoff <= context:
        return None
    factor = float(math.ceil(cutoff / context))
    base = dict(getattr(config, "rope_parameters", None) or {})
    base.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    base.update({"rope_type": "linear" if kind == "auto" else kind, "factor": factor})
    if kind == "yarn":
        base["original_max_position_embeddings"] = context
    return base


def check_context(model: str, data: dict, generated: int = 0) -> None:
    """Without RoPE scaling, refuse data (by option: --data, --eval-data) longer than the model's
    context: positions it never saw."""
    from lmforge.shared.data.packed import longest_sequence

    context = getattr(load_config(model).get_text_config(), "max_position_embeddings", None)
    for what, packed in data.items():
        if not context or packed is None:
            continue
        tokens, row = longest_sequence(packed, generated)
        if tokens > context:
            raise BadInput(f"{what} {packed.path} row {row}: {tokens} tokens, longer than the {context}-token context "
                           f"of --model {model}, with --rope-scaling none",
                           "use --rope-scaling auto (or linear, dynamic, yarn), or pack with a smaller --cutoff")


def load_model(name: str | Path, device: Device, *, cutoff: int | None = None, rope: str = "auto",
               quant: int | None = None, tokenizer=None, for_training: bool = True, masters: bool = False):
    """A causal LM ready to train (or to run), on `device`, matching `tokenizer`'s vocabulary.

    `masters`: every weight trains (full, freeze, ...) in mixed precision on a GPU: the weights
    stay fp32 (the optimizer's master copy) and the Trainer's autocast computes in `device.dtype`;
    in bf16 alone, most updates of a small learning rate would fall below bf16's resolution."""
    config = load_config(name)
    scaling = rope_scaling_for(config, cutoff, rope)
    device.attn = attention_for(config, device.attn, device.kind, device.dtype_name)
    kwargs = {"dtype": weights_dtype(device, masters, bool(quant)), "attn_implementation": device.attn}
    if scaling:
        config.rope_parameters = scaling
        config.max_position_embeddings = int(config.max_position_embeddings * scaling["factor"])
        kwargs["config"] = config
        log.info(f"model: cutoff {cutoff} exceeds the context; {scaling['rope_type']} RoPE scaling x{scaling['factor']:g}")
    if quant:
        kwargs["quantization_config"] = quantization_config(quant, device)
        kwargs["device_map"] = {"": 0} if device.kind == "cuda" else {"": "cpu"}
    elif is_quantized(name):  # GPTQ/AWQ/bitsandbytes weights: loaded as stored
        kwargs["device_map"] = {"": 0} if device.kind == "cuda" else {"": "cpu"}
        kwargs.pop("dtype")
        quant = True
    if is_vision(name):
        from lmforge.shared.data import multimodal

        multimodal.family_of(str(name))   # a family lmforge does not support is refused, naming those it does
    model = load_weights(name, **kwargs)
    if tokenizer is not None:
        resize_to(model, tokenizer)
    if for_training:
        model.config.use_cache = False
    if device.kind != "cpu" and not quant:
        model.to(device.kind)
    return model


def weights_dtype(device: Device, masters: bool, quantized: bool = False):
    """The dtype a model is loaded in: the device's, except fp32 master weights for training every
    weight in mixed precision on a GPU (the Trainer's autocast computes in the device's dtype)."""
    import torch

    if masters and device.kind != "cpu" and device.dtype_name in ("bf16", "fp16") and not quantized:
        return torch.float32
    return device.dtype


def resize_to(model, tokenizer) -> None:
    """Grow the embeddings for tokens the tokenizer has and the model lacks (mean + noise init)."""
    size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        log.info(f"model: embeddings resized {size} -> {len(tokenizer)} for new tokens")


def quantization_config(bits: int, device: Device):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise BadInput(f"--quant {bits} needs bitsandbytes", "pip install 'lmforge[quant]'") from None
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=device.dtype)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise BadInput(f"--quant {bits}: use 4 or 8")


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_for_inference(model_dir: str, adapter: str | None, precision: str = "auto", attn: str | None = None):
    """(model, tokenizer) ready for inference (attention: `attn`, else the command's --attn)."""
    from lmforge.shared.core import rundir

    device = choose_device(precision, attn or _preferred_attention)
    if adapter:
        from lmforge.shared.model.merging import load_with_adapters

        model, tokenizer, _ = load_with_adapters(model_dir, [adapter], device.dtype, device.kind, attn=device.attn)
    else:
        rundir.require_finished(model_dir)
        record = rundir.read_record(model_dir)
        tokenizer = load_tokenizer_for(model_dir, record.get("added_tokens"))
        model = load_model(model_dir, device, tokenizer=tokenizer, for_training=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
