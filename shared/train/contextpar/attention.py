"""Context-parallel attention installed on a Hugging Face model through transformers'
AttentionInterface (any architecture whose attention layers call it with the position ids).

`install(model, layout, mode)` registers "lmforge_cp_ulysses" or "lmforge_cp_ring" and switches
every attention layer to it (config._attn_implementation), with a mask function that builds no
mask: which keys a query may see comes from the whole row's position ids, gathered from the group
once per forward pass (the first layer's call; the others, and a checkpointed layer's recompute,
reuse it). Rotary embeddings need nothing: the model computes them from the shard's own position
ids before attention. `uninstall` puts sdpa back before the model is saved or used alone.

Everything the model does between attention layers is per token and runs on the shard as it is
(LoRA, experts, norms): PEFT, full tuning, gradient checkpointing, DDP and FSDP2 see an ordinary
model whose attention happens to talk to the other processes of its group.
"""

from __future__ import annotations

import functools

import torch

from lmforge.shared.train.contextpar import comm
from lmforge.shared.train.contextpar.checks import resolve_mode

NAMES = {"ulysses": "lmforge_cp_ulysses", "ring": "lmforge_cp_ring"}


class RowState:
    """The whole row's position ids (and what the ring derives from them) for the batch in flight.

    Keyed by the shard's position-id tensor itself: every layer of one forward pass (and the
    recompute of a checkpointed layer) is handed the same tensor, and a new batch brings a new
    one, on every process of the group alike, so the gather happens once per forward pass on all
    of them (a collective that one process skipped would hang the others)."""

    def __init__(self, layout):
        self.layout = layout
        self._key: torch.Tensor | None = None
        self._full: torch.Tensor | None = None
        self._first: dict = {}

    def positions(self, local: torch.Tensor | None) -> torch.Tensor:
        if local is None:
            raise RuntimeError("context-parallel attention needs the shard's position ids "
                               "(the sharded batch carries them; the model's own would restart at 0 on every shard)")
        if local is not self._key:
            self._key, self._full, self._first = local, comm.gather_last(local, self.layout.group), {}
        assert self._full is not None
        return self._full

    def first_keys(self, local: torch.Tensor, window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first key each query of the row may see, on the device and on the CPU, and where
        each token's example starts, on the CPU (the ring plans its tiles on the CPU, without a
        device sync per tile)."""
        from lmforge.shared.train.contextpar.ring import first_keys, segment_starts

        full = self.positions(local)
        if window not in self._first:
            first = first_keys(full, window)
            self._first[window] = (first, first.cpu(), segment_starts(full).cpu())
        return self._first[window]


def _no_mask(*args, **kwargs):
    return None   # which keys each query sees comes from the row's position ids


def _expand_rows(positions: torch.Tensor, rows: int) -> torch.Tensor:
    if positions.shape[0] == 1 and rows > 1:   # one row of positions shared by the batch
        return positions.expand(rows, -1)
    return positions


def ulysses_attention(state: RowState, module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling=None, position_ids=None, sliding_window=None, **kwargs):
    """query (B, H, Ls, D), key/value (B, Hkv, Ls, D) of the shard, after RoPE -> ((B, Ls, H, D), None).

    All-to-all to (B, H/N, L, D): this process attends H/N heads over the whole row, example by
    example (packedattn's per-example sdpa, its sliding window included), and the output goes back
    to (B, Ls, H, D). With fewer key/value heads than processes each is repeated N/Hkv times first,
    so that every process gets the one its query heads use."""
    from lmforge.shared.train.patches.packedattn import _packed_attention

    layout = state.layout
    if key.shape[2] != query.shape[2]:
        raise RuntimeError("context-parallel attention is for training (no KV cache)")
    full = _expand_rows(state.positions(position_ids), query.shape[0])
    kv_heads = key.shape[1]
    if kv_heads % layout.size:   # resolve_mode allowed this only when N is a multiple of Hkv
        key = key.repeat_interleave(layout.size // kv_heads, dim=1)
        value = value.repeat_interleave(layout.size // kv_heads, dim=1)
    q = comm.all_to_all(query, layout.group, scatter_dim=1, gather_dim=2)
    k = comm.all_to_all(key, layout.group, scatter_dim=1, gather_dim=2)
    v = comm.all_to_all(value, layout.group, scatter_dim=1, gather_dim=2)
    out, _ = _packed_attention(module, q, k, v, None, dropout=dropout, scaling=scaling, position_ids=full,
                               sliding_window=sliding_window, **kwargs)
    return comm.all_to_all(out, layout.group, scatter_dim=1, gather_dim=2), None   # (B, L, H/N, D) -> (B, Ls, H, D)


def ring_attention(state: RowState, module, query, key, value, attention_mask, dropout: float = 0.0,
                   scaling=None, position_ids=None, sliding_window=None, **kwargs):
    """query (B, H, Ls, D), key/value (B, Hkv, Ls, D) of the shard, after RoPE -> ((B, Ls, H, D), None)."""
    from lmforge.shared.train.contextpar.ring import ring_attention as ring

    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise RuntimeError("ring attention: this model's attention is not plain softmax attention")
    if dropout:
        raise RuntimeError("ring attention has no attention dropout (set the model's attention_dropout to 0)")
    if key.shape[2] != query.shape[2]:
        raise RuntimeError("context-parallel attention is for training (no KV cache)")
    first, first_cpu, starts_cpu = (_expand_rows(t, query.shape[0]) for t in state.first_keys(position_ids, sliding_window))
    low = query.dtype
    if query.device.type == "cpu" and low in (torch.bfloat16, torch.float16):
        query, key, value = query.float(), key.float(), value.float()   # a CPU's half-precision matmuls are slow
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = ring(query, key, value, first, first_cpu, starts_cpu, state.layout, scale)
    return out.transpose(1, 2).to(low).contiguous(), None


def install(model, layout, mode: str = "auto") -> str:
    """Switch `model` (loaded, PEFT-wrapped or not) to context-parallel attention over `layout`'s
    group; returns the mode used (auto: Ulysses where the heads allow it, else ring). Refuses
    (BadInput) models and modes that cannot work."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from lmforge.shared.train.contextpar import losses
    from lmforge.shared.train.patches.shiftattn import set_attention

    chosen = resolve_mode(model.config, layout.size, mode)
    state = RowState(layout)
    fn = ulysses_attention if chosen == "ulysses" else ring_attention
    name = NAMES[chosen]
    AttentionInterface.register(name, functools.partial(fn, state))
    AttentionMaskInterface.register(name, _no_mask)
    set_attention(model, name)
    losses.install_router_loss(model, layout)
    return chosen


def uninstall(model) -> None:
    """Back to sdpa (before saving, and for anything that uses the model on whole sequences)."""
    from lmforge.shared.train.contextpar import losses
    from lmforge.shared.train.patches.shiftattn import set_attention

    if getattr(model.config, "_attn_implementation", None) in NAMES.values():
        set_attention(model, "sdpa")
    losses.uninstall_router_loss(model)
