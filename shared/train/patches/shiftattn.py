"""`--shift-attn`: S² attention (shifted sparse attention, LongLoRA, Chen et al. 2023), for training.

While the model trains, each attention layer attends within groups of a quarter of the sequence
instead of over all of it. Half of the heads (the second chunk, as `torch.chunk(2)` splits them)
see the sequence shifted by half a group, so their groups straddle the others' boundaries and
information still flows between groups; their output is shifted back. The paper's Algorithm 1:

    qkv = cat(qkv.chunk(2, heads)[0], qkv.chunk(2, heads)[1].roll(-G/2, seq)).view(B*N/G, G, 3, H, D)
    out = self_attn(qkv)                      # causal attention within each group
    out = cat(out.chunk(2, heads)[0], out.chunk(2, heads)[1].roll(G/2, seq))

Attention costs L²/4 instead of L² (scores and their softmax in memory too). In eval mode and
during generation (`model.eval()`, a KV cache) the layer is the model's own full attention, so
a model trained this way is used like any other.

What we do differently from the reference implementation, on purpose:
- causality follows the tokens' real positions. Rolling wraps the last half-group of the
  sequence onto the first, and the reference's group-causal mask then lets the first G/2 tokens
  of the shifted heads see the *last* tokens of the row (a look into the future). Here a token
  never sees a later one, in any head.
- the model's own mask is kept inside each group: padding, and packed examples kept apart
  (`--neat-packing`: transformers turns restarting position ids into a block-diagonal mask),
  so S² works with packing and neat packing alike.
- a row whose length is not a multiple of 4 is padded at its end for the grouping (causality
  keeps real tokens from seeing the padding) and cut back after.

Installed as an attention function of transformers' AttentionInterface ("lmforge_s2_sdpa" or
"lmforge_s2_eager", with the mask the model's own kernel would get), which every Llama-family
attention layer calls through `config._attn_implementation`. Only models whose attention is
plain causal softmax attention qualify (ARCHS): no logit soft-capping, no attention sinks, and a
sliding window only when no group is wider than it.
"""

from __future__ import annotations

from lmforge.shared.core.errors import BadInput

ARCHS = ("llama", "qwen2", "qwen3", "mistral")   # plain causal attention through the AttentionInterface
BASES = ("sdpa", "eager")                         # the kernels whose masks we read (bool / additive)
PREFIX = "lmforge_s2_"


def check_attention(attn: str) -> None:
    """--attn must leave us a kernel whose masks we read (before anything is loaded)."""
    if attn not in ("auto", *BASES):
        raise BadInput(f"--shift-attn works with --attn sdpa or eager, not {attn}",
                       "use --attn auto (sdpa) or eager")


def check_model(config) -> None:
    """Refuse architectures whose attention is not the plain kind S² is defined for (BadInput)."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHS:
        raise BadInput(f"--shift-attn: {kind or 'this'} models are not supported "
                       f"(S² attention is implemented for {', '.join(ARCHS)})", "drop --shift-attn")


def install(model) -> str:
    """Switch `model` (a causal LM of ARCHS, not yet PEFT-wrapped) to S² attention for training.
    Returns the attention it had (`uninstall` puts it back)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    config = model.config
    base = config._attn_implementation
    if base not in BASES:
        raise BadInput(f"--shift-attn works with sdpa or eager attention, not {base}", "use --attn sdpa or eager")
    name = PREFIX + base
    AttentionInterface.register(name, _s2_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])   # the masks `base` gets
    set_attention(model, name)
    return base


def uninstall(model) -> None:
    """Back to the model's own attention (before saving, and for whatever uses the model after)."""
    name = model.config._attn_implementation
    if name and name.startswith(PREFIX):
        set_attention(model, name[len(PREFIX):])


def set_attention(model, name: str) -> None:
    # every (sub)config of the model: decoder layers read the config they were built with
    seen = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, "_attn_implementation"):
            seen.add(id(config))
            config._attn_implementation = name


def _base_of(module) -> str:
    name = module.config._attn_implementation
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def _s2_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """An AttentionInterface function: query (B, H, L, D), key/value (B, Hkv, L, D) after RoPE;
    returns ((B, L, H, D), None) like transformers' own kernels."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base = _base_of(module)
    if not module.training or query.shape[2] != key.shape[2] or query.shape[2] < 4:
        # inference, generation with a cache, or too short to group: the model's own full attention
        if base == "eager":
            from transformers.models.llama.modeling_llama import eager_attention_forward

            return eager_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, **kwargs)
        return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, dropout=dropout,
                                             scaling=scaling, **kwargs)
    length = query.shape[2]
    group = (length + 3) // 4
    window = kwargs.get("sliding_window")
    if window and group > window:
        raise BadInput(f"--shift-attn: groups of {group} tokens exceed the model's sliding window ({window})",
                       f"use a --cutoff of at most {4 * window} with --shift-attn, or drop it")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise BadInput("--shift-attn: this model's attention (soft-capping or sinks) is not plain softmax attention",
                       "drop --shift-attn")
    return s2_attention(query, key, value, attention_mask, dropout=dropout, scaling=scaling), None


def s2_attention(query, key, value, attention_mask=None, *, dropout: float = 0.0, scaling=None):
    """Shifted sparse attention of query (B, H, L, D) over key/value (B, Hkv, L, D) -> (B, L, H, D).

    attention_mask: None (causal), a bool mask (B or 1, 1, L, L; True = may attend) or an additive
    float mask (0 = may attend), as transformers builds them for sdpa and eager."""
    import torch
    import torch.nn.functional as F

    batch, heads, length, dim = query.shape
    repeat = heads // key.shape[1]
    if repeat > 1:   # grouped-query attention: each query head gets its own copy of its key/value head
        key = key.repeat_interleave(repeat, dim=1)
        value = value.repeat_interleave(repeat, dim=1)
    allowed = None
    if attention_mask is not None:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        allowed = allowed[:, 0]   # (B or 1, L, L): the same for every head
    pad = (-length) % 4
    if pad:   # pad the row at its end; causality keeps real tokens from seeing the padding
        query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
        if allowed is not None:
            allowed = F.pad(allowed, (0, pad, 0, pad), value=False)
    padded = length + pad
    group, groups = padded // 4, 4
    device = query.device
    positions = torch.arange(padded, device=device)
    kept = heads - heads // 2   # torch.chunk(2): the first chunk is the larger one
    out = torch.empty(batch, heads, padded, dim, dtype=query.dtype, device=device)
    for part, order in ((slice(0, kept), positions), (slice(kept, heads), (positions + group // 2) % padded)):
        h = part.stop - part.start
        if h == 0:
            continue
        # (B, h, L, D) in the order of `order` (the shift is a roll by -G/2), cut into groups:
        # (B * groups, h, G, D), each group a row of its own for sdpa
        q, k, v = (t[:, part].index_select(2, order).view(batch, h, groups, group, dim).transpose(1, 2)
                   .reshape(batch * groups, h, group, dim) for t in (query, key, value))
        at = order.view(groups, group)   # the real position of each slot of each group
        if allowed is None and part.start == 0:
            # unshifted heads, no mask of the model's own: plain causal groups (sdpa's fast kernels)
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
        else:
            mask = at[:, :, None] >= at[:, None, :]   # causal by real position: (groups, G, G)
            if allowed is not None:   # the model's own mask (padding, packed examples), group by group
                mask = mask & allowed[:, at[:, :, None], at[:, None, :]]   # (B or 1, groups, G, G)
            else:
                mask = mask[None]
            mask = mask | torch.eye(group, dtype=torch.bool, device=device)   # no row left fully masked
            mask = mask.expand(batch, groups, group, group).reshape(batch * groups, 1, group, group)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
        o = o.view(batch, groups, h, group, dim).transpose(1, 2).reshape(batch, h, padded, dim)
        out[:, part] = o.index_select(2, _inverse(order))   # shifted back (a roll by +G/2)
    return out[:, :, :length].transpose(1, 2).contiguous()


def _inverse(order):
    """The permutation that undoes `order` (the roll back by +G/2)."""
    import torch

    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return inverse
