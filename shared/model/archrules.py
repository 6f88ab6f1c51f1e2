"""What particular architectures need, in one table.

lmforge treats every Hugging Face causal LM alike; the few places where an architecture needs
something else are the rows of `RULES`, each with the model types it covers (or a test on the
config), what it needs, and the code that acts on it. tests/test_archrules.py has a test per row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _has(key: str) -> Callable[[object], bool]:
    return lambda config: bool(getattr(config, key, None))


def _type_in(*types: str) -> Callable[[object], bool]:
    return lambda config: getattr(config, "model_type", None) in types


@dataclass(frozen=True)
class Rule:
    name: str
    applies: Callable[[object], bool]   # config (or tokenizer, see `on`) -> does this row concern the model?
    examples: tuple[str, ...]           # model types it covers (those the matrix tests)
    need: str                           # what the architecture needs, and what lmforge does
    on: str = "config"                  # what `applies` reads: the model's config or its tokenizer


def _no_generation_marker(tokenizer) -> bool:
    """The chat template ignores add_generation_prompt, yet its answers open with a header."""
    from lmforge.shared.data.jinja_template import JinjaRenderer

    return bool(getattr(tokenizer, "chat_template", None)) and bool(JinjaRenderer(tokenizer).implied_header)


def _moe(config) -> bool:
    return any(getattr(config, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts"))


LAYER_LISTS = ("layer_types", "no_rope_layers", "sliding_window_pattern_list")   # one entry per layer
LAYER_INDICES = ("mlp_only_layers",)                                               # lists of layer indices

EAGER_ONLY = {  # model type -> why transformers has no sdpa/flex kernel for it
    "gemma2": "its attention scores are soft-capped",
    "gpt_oss": "its attention has learned sinks",
}

RULES: tuple[Rule, ...] = (
    Rule("attention kernel", _type_in(*EAGER_ONLY), tuple(EAGER_ONLY),
         "no sdpa kernel in transformers: --attn auto picks eager (models.attention_for); --attn sdpa is refused "
         "naming --attn eager"),
    Rule("soft-capped logits", _has("final_logit_softcapping"), ("gemma2",),
         "logits pass through tanh soft-capping after the output layer: training keeps transformers' own loss "
         "(the chunked loss assumes logits linear in the hidden state; lossfn.install)"),
    Rule("scaled logits", lambda c: bool(getattr(c, "logits_scaling", None) or getattr(c, "logit_scale", None)),
         ("granite", "cohere"),
         "logits are scaled after the output layer: the scale is linear, so the chunked loss stays exact "
         "(it sees the scaled hidden state)"),
    Rule("scaled embeddings", _type_in("gemma", "gemma2", "gemma3_text"), ("gemma", "gemma2", "gemma3_text"),
         "embeddings are multiplied by sqrt(hidden) inside the embedding module: resizing for added tokens "
         "keeps the scale, and NEFTune's noise is added after it"),
    Rule("router auxiliary loss", lambda c: _moe(c) and getattr(c, "router_aux_loss_coef", None) is not None,
         ("mixtral", "qwen3_moe", "gpt_oss"),
         "when the router trains (full, freeze, llama-pro), output_router_logits is switched on so the "
         "load-balancing loss (router_aux_loss_coef) is added to the training loss (methods.apply)"),
    Rule("fused experts", _moe, ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"),
         "experts are 3-D tensors, not linear layers: LoRA adapts them through PEFT's parameter targets, DoRA "
         "cannot (--method dora with --lora-target all is refused, naming lora or explicit targets); LLaMA-Pro "
         "zeroes their down projections"),
    Rule("linear layers that are not linear", _moe, ("phimoe",),
         "a torch Linear subclass whose forward returns something else than its product (Phi-MoE's router "
         "returns logits, weights and the chosen experts): LoRA on it breaks the layer that calls it, so "
         "--lora-target all leaves every such layer out (PEFT's exclude_modules) and naming one is refused "
         "(archrules.not_linear)"),
    Rule("per-layer config lists",
         lambda c: any(getattr(c, k, None) for k in (*LAYER_LISTS, *LAYER_INDICES, "first_k_dense_replace")),
         ("smollm3", "gemma3_text", "gpt_oss", "deepseek_v3"),
         "config entries that describe each layer (layer_types, no_rope_layers; mlp_only_layers; "
         "first_k_dense_replace) are expanded with LLaMA-Pro's new layers, and the expanded config must rebuild the "
         "expanded model (else LLaMA-Pro is refused)"),
    Rule("no generation marker", _no_generation_marker, ("chatml without add_generation_prompt",),
         "the chat template ignores add_generation_prompt but opens each answer with a header: --template auto "
         "finds the header by rendering an answer and adds it to every generation prompt, so it is never "
         "trained and eval/serve prompt with it (jinja_template.JinjaRenderer.implied_header)", on="tokenizer"),
)


def rules_for(config) -> list[Rule]:
    return [r for r in RULES if r.on == "config" and r.applies(config)]


def attention_kernels(config) -> set[str]:
    """The attention implementations transformers has for this config's causal-LM class."""
    from transformers import AutoModelForCausalLM

    kernels = {"eager"}
    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return {"eager", "sdpa"}
    if getattr(cls, "_supports_sdpa", False):
        kernels.add("sdpa")
    if getattr(cls, "_supports_flash_attn", False):
        kernels.add("flash_attention_2")
    if getattr(config, "model_type", None) in EAGER_ONLY:
        kernels.discard("sdpa")
    return kernels


def attention_reason(config) -> str:
    return EAGER_ONLY.get(getattr(config, "model_type", ""), "")


# config fields that scale the logits after the output layer (Cohere logit_scale, Granite and MiniCPM3
# logits_scaling, Falcon-H1 lm_head_multiplier, output_multiplier), as TRL's fused head lists them
LOGIT_SCALES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")


def logits_scaled(config) -> bool:
    """Does the model scale its logits after the output layer? (The chunked sft loss receives the
    scaled hidden state through the model's forward; code that calls the output layer itself does not.)"""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any(getattr(text, name, None) not in (None, 1, 1.0) for name in LOGIT_SCALES)


def chunked_loss_exact(config) -> bool:
    """Can the loss be computed from the hidden state and the output layer alone (no soft-capping)?"""
    return not getattr(config, "final_logit_softcapping", None)


def is_moe(config) -> bool:
    return _moe(config)


def wants_router_loss(model) -> bool:
    """Does a trainable router of this MoE model call for the load-balancing loss?"""
    config = model.config
    if not (_moe(config) and getattr(config, "router_aux_loss_coef", None) is not None):
        return False
    import re

    router = re.compile(r"(^|\.)(gate|router)(\.|$)")   # mlp.gate (its weight, or a LoRA on it), mlp.router
    return any(p.requires_grad and router.search(n) for n, p in model.named_parameters())


def fused_expert_modules(model) -> list[str]:
    """Names of modules holding experts as 3-D tensors (what PEFT's DoRA cannot adapt)."""
    return [n for n, m in model.named_modules()
            if any(p.ndim == 3 for p in m.parameters(recurse=False))]


def not_linear(model) -> list[str]:
    """Full names of the torch Linear subclasses in a model's own code whose forward returns no
    tensor (a router returning logits and its choice): a LoRA wrapper would hand the caller the
    wrong thing. Each such layer's forward is tried once on a row of zeros, in eval mode."""
    import torch

    found = []
    for name, module in model.named_modules():
        cls = type(module)
        if not isinstance(module, torch.nn.Linear) or cls.forward is torch.nn.Linear.forward:
            continue
        if not cls.__module__.startswith("transformers."):   # quantized and adapter linears return their product
            continue
        weight = module.weight
        if weight.is_meta:
            continue
        training = module.training
        try:
            module.eval()
            with torch.no_grad():
                out = module(torch.zeros(1, module.in_features, dtype=weight.dtype, device=weight.device))
            plain = isinstance(out, torch.Tensor)
        except Exception:   # noqa: BLE001 - a layer that cannot take its own input shape is no plain linear
            plain = False
        finally:
            module.train(training)
        if not plain:
            found.append(name)
    return found
