"""Neat-packed rows attended example by example (training with sdpa).

With `--neat-packing` data, every packed row holds several examples and no token may attend
across an example's boundary. transformers expresses that with a block-diagonal mask built from
the restarting position ids: sdpa then computes the whole row's L x L scores (and, on a CPU, can
no longer use its causal fast path), although a row of k examples only needs sum(l_i²) of them.
Here each example gets its own causal sdpa call, so attention costs sum(l_i²) instead of L²;
nothing else changes (the same scores, softmax and values: tested equal in loss and gradients
to transformers' masked path on several architectures).

How: a registered attention function ("lmforge_packed_sdpa") whose mask function returns None (no
L x L mask is built). The attention function reads the segments from `position_ids`, which the
decoder layers hand to it: a segment starts wherever a position is not the previous one plus one
(PackedCollator restarts them per example and continues them over the padding at a row's end,
which causality keeps harmless). Without position ids, or with a KV cache (generation), it is
plain causal sdpa. Installed only while training; `uninstall` puts sdpa back before saving.

Only for architectures whose attention is plain causal softmax attention called through
transformers' AttentionInterface with the position ids (ARCHS); a sliding window is honoured
per segment. Flash-attention does the same through its variable-length kernels, so it is left
alone.
"""

from __future__ import annotations

# plain causal softmax attention through the AttentionInterface, each checked equal to
# transformers' masked path in tests/test_packedattn.py (falcon is not: its sdpa call takes no function)
ARCHS = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "phi", "phi3", "gemma",
         "gemma3_text", "olmo2", "granite", "starcoder2", "stablelm", "cohere", "gpt_neox", "internlm3",
         "deepseek_v3", "smollm3")
NAME = "lmforge_packed_sdpa"


def applies(model, attn: str, neat: bool) -> bool:
    """Whether `model` (loaded, not yet PEFT-wrapped) training on this data gets per-example attention."""
    return neat and attn == "sdpa" and getattr(model.config, "model_type", None) in ARCHS


def install(model) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from lmforge.shared.train.patches.shiftattn import set_attention

    AttentionInterface.register(NAME, _packed_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    set_attention(model, NAME)


def uninstall(model) -> None:
    from lmforge.shared.train.patches.shiftattn import set_attention

    if getattr(model.config, "_attn_implementation", None) == NAME:
        set_attention(model, "sdpa")


def _no_mask(*args, **kwargs):
    return None   # the segments come from the position ids; no L x L mask is built


def segments(position_ids) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each run of consecutive positions."""
    rows, length = position_ids.shape
    breaks = (position_ids[:, 1:] != position_ids[:, :-1] + 1).nonzero().tolist()
    starts: list[list[int]] = [[0] for _ in range(rows)]
    for row, at in breaks:
        starts[row].append(at + 1)
    return [[(s, e) for s, e in zip(row, [*row[1:], length])] for row in starts]


def _packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      position_ids=None, sliding_window=None, **kwargs):
    """query (B, H, L, D), key/value (B, Hkv, L, D) after RoPE -> ((B, L, H, D), None)."""
    import torch
    import torch.nn.functional as F

    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise RuntimeError("packed attention: this model's attention is not plain softmax attention")
    batch, length = query.shape[0], query.shape[2]
    if key.shape[2] != length:   # a KV cache (generation): transformers' own sdpa over all the keys
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, sliding_window=sliding_window, **kwargs)
    if position_ids is None or position_ids.dim() != 2:
        spans = [[(0, length)]] * batch
    else:
        spans = segments(position_ids)
        if len(spans) == 1 and batch > 1:   # one row of positions shared by the batch (the model's own arange)
            spans = spans * batch
    gqa = query.shape[1] != key.shape[1]
    low = query.dtype
    if query.device.type == "cpu" and low in (torch.bfloat16, torch.float16):
        # a CPU's sdpa ran a bf16 example 25-30% slower than the same in fp32 (forward and backward,
        # 512-token rows, SmolLM2's heads; bench:train in RESULTS.md): upcast, attend, cast back
        query, key, value = query.float(), key.float(), value.float()
    # unbind and split, not indexing: their backward writes each piece's gradient into one buffer,
    # where a slice's backward would zero and fill a whole-tensor gradient per example
    rows = []
    for row_q, row_k, row_v, parts in zip(query.unbind(0), key.unbind(0), value.unbind(0), spans):
        lengths = [end - start for start, end in parts]
        outs = []
        for q, k, v in zip(row_q.split(lengths, dim=1), row_k.split(lengths, dim=1), row_v.split(lengths, dim=1)):
            n = q.shape[1]
            mask = None
            if sliding_window and n > sliding_window:   # causal within the window
                i = torch.arange(n, device=q.device)
                mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < sliding_window)
            outs.append(F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, dropout_p=dropout,
                                                       scale=scaling, is_causal=mask is None and n > 1, enable_gqa=gqa))
        rows.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
    out = (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)).transpose(1, 2)
    if out.dtype == low:
        return out.contiguous(), None
    return torch.empty(out.shape, dtype=low, device=out.device).copy_(out), None   # cast and lay out: one copy
