"""Fine-tuning methods: which parameters train, and how.

full        every parameter
freeze      the last N decoder layers (negative N: the first |N|), optionally only some of their
            submodules, plus extra modules by name
lora        PEFT LoRA adapters (rsLoRA scaling and LoRA+ learning rates optional)
dora        weight-decomposed LoRA
pissa       LoRA initialised from the principal singular vectors; saved converted to a plain LoRA
            that applies to the original base model
llama-pro   block expansion: K copies of evenly spaced decoder layers are inserted with their
            output projections zeroed (so the model is unchanged at start); only they train
galore, badam   see optimizers.py (memory-efficient full-parameter training)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from lmforge.shared.core import catalog
from lmforge.shared.core import log
from lmforge.shared.core.errors import BadInput

METHODS = catalog.METHODS
ADAPTERS = ("lora", "dora", "pissa")


_DEFAULTS = catalog.defaults("train sft")   # the options' declared defaults


@dataclass
class MethodOptions:
    method: str = _DEFAULTS["method"]
    lora_rank: int = _DEFAULTS["lora_rank"]
    lora_alpha: float | None = _DEFAULTS["lora_alpha"]
    lora_dropout: float = _DEFAULTS["lora_dropout"]
    lora_target: str = _DEFAULTS["lora_target"]
    rslora: bool = _DEFAULTS["rslora"]
    loraplus_ratio: float | None = _DEFAULTS["loraplus_ratio"]
    freeze_layers: int = _DEFAULTS["freeze_layers"]
    freeze_modules: str = _DEFAULTS["freeze_modules"]
    freeze_extra: str = _DEFAULTS["freeze_extra"]
    expand_layers: int = _DEFAULTS["expand_layers"]
    galore_rank: int = _DEFAULTS["galore_rank"]
    galore_scale: float = _DEFAULTS["galore_scale"]
    galore_update_interval: int = _DEFAULTS["galore_update_interval"]
    galore_target: str = _DEFAULTS["galore_target"]
    badam_mode: str = _DEFAULTS["badam_mode"]
    badam_switch_interval: int = _DEFAULTS["badam_switch_interval"]
    added_token_ids: list[int] = field(default_factory=list)

    @property
    def is_adapter(self) -> bool:
        return self.method in ADAPTERS


def validate(o: MethodOptions) -> None:
    if o.method not in METHODS:
        raise BadInput(f"unknown method '{o.method}'", f"use one of {', '.join(METHODS)}")
    if o.is_adapter:
        if o.lora_rank < 1:
            raise BadInput("--lora-rank must be at least 1")
        if not 0 <= o.lora_dropout < 1:
            raise BadInput("--lora-dropout must be in [0, 1)")
        if o.loraplus_ratio is not None and o.loraplus_ratio <= 0:
            raise BadInput("--loraplus-ratio must be > 0")
    elif o.loraplus_ratio is not None or o.rslora:
        raise BadInput(f"--loraplus-ratio/--rslora apply to LoRA methods, not {o.method}", "use --method lora")
    if o.method == "llama-pro" and o.expand_layers < 1:
        raise BadInput("--method llama-pro needs --expand-layers N (N >= 1)")
    if o.method != "llama-pro" and o.expand_layers:
        raise BadInput("--expand-layers applies to --method llama-pro")
    if o.method == "galore" and (o.galore_rank < 1 or o.galore_update_interval < 1):
        raise BadInput("--galore-rank and --galore-update-interval must be at least 1")
    if o.method == "badam":
        if o.badam_mode not in ("ascending", "descending", "random"):
            raise BadInput(f"--badam-mode {o.badam_mode}: use ascending, descending or random")
        if o.badam_switch_interval < 1:
            raise BadInput("--badam-switch-interval must be at least 1")
    if o.method == "freeze" and o.freeze_layers == 0:
        raise BadInput("--freeze-layers 0 trains nothing", "give N > 0 (last N layers) or N < 0 (first N)")


def decoder_layers(model):
    """The ModuleList of transformer blocks (model.model.layers for Llama-like models)."""
    import torch

    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks", "layer"):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise BadInput(f"cannot find the decoder layers of {type(model).__name__}",
                       "use --method full or lora for this architecture")
    return best


def _names(text: str) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def apply(model, o: MethodOptions):
    """Set up `model` for method `o.method`; returns the model to train (PEFT-wrapped for adapters)."""
    if o.is_adapter:
        return _lora(model, o)
    if o.method in ("full", "galore", "badam"):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if o.method == "freeze":
        return _freeze(model, o)
    if o.method == "llama-pro":
        return _expand(model, o)
    raise BadInput(f"unknown method '{o.method}'")


def _lora(model, o: MethodOptions):
    from peft import LoraConfig, get_peft_model

    target = ("all-linear" if not _quantized_linears(model) else _quantized_linears(model)) \
        if o.lora_target == "all" else _names(o.lora_target)
    if target != "all-linear":
        present = {n.split(".")[-1] for n, _ in model.named_modules()}
        unknown = [t for t in target if t not in present]
        if unknown:
            linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
            raise BadInput(f"--lora-target: {', '.join(unknown)} not in the model", f"its linear layers: {', '.join(linear)}")
    # PEFT's annotations are narrower than what it accepts: lora_alpha is declared int (a float
    # works: the scale is alpha / rank), and its Literal cannot spell "pissa_niter_<n>"
    config = LoraConfig(
        task_type="CAUSAL_LM", r=o.lora_rank, lora_alpha=o.lora_alpha or 2 * o.lora_rank,  # type: ignore[arg-type]
        lora_dropout=o.lora_dropout, target_modules=target, use_dora=o.method == "dora",
        use_rslora=o.rslora, init_lora_weights="pissa_niter_16" if o.method == "pissa" else True,  # type: ignore[arg-type]
        trainable_token_indices=o.added_token_ids or None)
    return get_peft_model(model, config)


def _quantized_linears(model) -> list[str]:
    """Names of GPTQ/AWQ layers (PEFT's "all-linear" only recognises torch Linear layers)."""
    names = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "qweight")}
    return sorted(names)


def _freeze(model, o: MethodOptions):
    name, layers = decoder_layers(model)
    n = len(layers)
    if abs(o.freeze_layers) > n:
        raise BadInput(f"--freeze-layers {o.freeze_layers}: the model has {n} layers")
    chosen = range(n - o.freeze_layers, n) if o.freeze_layers > 0 else range(0, -o.freeze_layers)
    modules = _names(o.freeze_modules)
    extra = _names(o.freeze_extra)
    for p in model.parameters():
        p.requires_grad_(False)
    found = False
    for i in chosen:
        for pname, p in layers[i].named_parameters():
            if "all" in modules or any(m in pname.split(".") for m in modules):
                p.requires_grad_(True)
                found = True
    if not found:
        sub = sorted({k.split(".")[0] for k, _ in layers[0].named_parameters()})
        raise BadInput(f"--freeze-modules {o.freeze_modules}: no such submodule in the layers",
                       f"the layers hold {', '.join(sub)}")
    for pname, p in model.named_parameters():
        if any(e in pname.split(".") for e in extra):
            p.requires_grad_(True)
    if extra and not any(any(e in pname.split(".") for e in extra) for pname, _ in model.named_parameters()):
        raise BadInput(f"--freeze-extra {o.freeze_extra}: no such module in the model")
    _upcast_trainable(model)
    return model


_ZERO = ("o_proj", "down_proj", "out_proj", "dense_4h_to_h", "c_proj", "fc2")


def _expand(model, o: MethodOptions):
    """LLaMA-Pro: insert o.expand_layers identity-initialised copies of evenly spaced layers."""
    import torch

    name, layers = decoder_layers(model)
    n, k = len(layers), o.expand_layers
    if n % k:
        raise BadInput(f"--expand-layers {k} must divide the model's {n} layers")
    every = n // k
    expanded, new = [], []
    for i, layer in enumerate(layers):
        expanded.append(layer)
        if (i + 1) % every == 0:
            twin = copy.deepcopy(layer)
            zeroed = 0
            for pname, p in twin.named_parameters():
                if pname.split(".")[-2] in _ZERO:
                    with torch.no_grad():
                        p.zero_()
                    zeroed += 1
            if zeroed == 0:
                raise BadInput(f"--method llama-pro does not know the output projections of {type(layer).__name__}")
            expanded.append(twin)
            new.append(len(expanded) - 1)
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], torch.nn.ModuleList(expanded))
    for index, layer in enumerate(expanded):  # KV-cache slots follow the new order
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    config = model.config
    if getattr(config, "layer_types", None):
        types = list(config.layer_types)
        config.layer_types = [t for i, t in enumerate(types) for t in ([t, t] if (i + 1) % every == 0 else [t])]
    config.num_hidden_layers = len(expanded)
    for p in model.parameters():
        p.requires_grad_(False)
    for i in new:
        for p in expanded[i].parameters():
            p.requires_grad_(True)
    log.info(f"llama-pro: {n} -> {len(expanded)} layers; training the {k} new block(s) {new}")
    _upcast_trainable(model)
    return model


def _upcast_trainable(model) -> None:
    """Trainable parameters in fp32 when the model was loaded in half precision (stable updates)."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
