"""The ring's unit of work: this process's queries of one row against one shard of keys, as tiles
with their log-sum-exp, forward and backward.

Which keys a query may see: not after it, from its own example, inside the window. `first` (per
row, non-decreasing along it) is the first key each query may see (its example's start, or the
window's), so a query i sees the keys [first[i], i]. Against an earlier shard the queries that see
anything are a prefix of this shard's (those whose first key lies before the shard's end), each
seeing a suffix of it; against its own shard every query sees at least itself. So no tile has a
query without keys, whose softmax would be empty.

A tile is (query rows [a, e), keys [ks, ke) of the shard, kind): "full" (every query sees every
key of the range: no mask), "causal" (the key range is the query range: the kernels' own causal
mask) or "mask" (an explicit one, built only for that tile; tiles with masks are cut to a bounded
number of query rows).

Two kernels compute a tile:
- on a CPU (values of the queries' head size), PyTorch's flash-attention kernel for CPUs (the op sdpa itself runs, which returns the
  log-sum-exp, and its backward, which takes the whole row's output and log-sum-exp so that each
  tile's gradient is its share of the exact one), grouped-query heads native;
- elsewhere (and where that op is missing), plain matrix products in fp32 (any device and dtype,
  exact, slower than a fused kernel).
"""

from __future__ import annotations

import torch

SCORES = 1 << 22    # mask (or, for the matrix-product kernel, score) elements per tile
_NEG = float("-inf")


def _cpu_flash():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the CPU's fused kernel computes these tiles (it needs values of the queries' head size)."""
    return (q.device.type == "cpu" and q.shape[-1] == v.shape[-1] and _cpu_flash() is not None
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"))


class Tiles:
    """Plans the tiles of one row against one key shard (on CPU copies of `first` and of the
    examples' starts: no device sync per tile) and builds their masks (on the device)."""

    def __init__(self, first: torch.Tensor, first_cpu: torch.Tensor, starts_cpu: torch.Tensor, q0: int, q_len: int,
                 fused: bool, heads: int, budget: int):
        self.first, self.first_cpu, self.starts_cpu, self.q0, self.q_len = first, first_cpu, starts_cpu, q0, q_len
        self.fused, self.heads, self.budget = fused, heads, budget

    def plan(self, row: int, k0: int, k_len: int):
        """Yield (a, e, ks, ke, kind) with a, e local to the queries and ks, ke to the key shard.

        Cut at the examples' boundaries first: without a window an example's queries see all of
        an earlier shard's keys of their example ("full") or their own shard's up to themselves
        ("causal"), so a neat-packed row needs no mask at all and costs the sum of its examples'
        squares, as lmforge's per-example attention does."""
        first = self.first_cpu[row]
        k_end = k0 + k_len
        if k0 >= self.q0 + self.q_len:
            return
        seeing = int(torch.searchsorted(first[self.q0:self.q0 + self.q_len].contiguous(), k_end))
        starts = self.starts_cpu[row, self.q0:self.q0 + seeing]
        cuts = [0, *((starts[1:] != starts[:-1]).nonzero().flatten() + 1).tolist(), seeing] if seeing else [0]
        for a0, e0 in zip(cuts[:-1], cuts[1:]):
            ks, ke, kind = self._kind(first, a0, e0, k0, k_end)
            if kind != "mask" and self.fused:   # one call, no mask: the fused kernel takes any length
                yield a0, e0, ks, ke, kind
                continue
            per_row = max(1, ke - ks) * (1 if self.fused else self.heads)   # a mask row, or all heads' scores
            rows = max(16, self.budget // per_row)
            for a in range(a0, e0, rows):
                e = min(e0, a + rows)
                yield (a, e, *self._kind(first, a, e, k0, k_end))

    def _kind(self, first, a: int, e: int, k0: int, k_end: int):
        ga, ge = self.q0 + a, self.q0 + e
        ks, ke = max(int(first[ga]), k0), min(ge, k_end)
        last_first = int(first[ge - 1])
        if last_first <= ks and ke - 1 <= ga:
            kind = "full"
        elif last_first <= ks and ks == ga and ke == ge:
            kind = "causal"
        else:
            kind = "mask"
        return ks - k0, ke - k0, kind

    def allowed(self, row: int, a: int, e: int, k0: int, ks: int, ke: int) -> torch.Tensor:
        """(e-a, ke-ks) bool: which keys each query of the tile sees."""
        device = self.first.device
        q_index = torch.arange(self.q0 + a, self.q0 + e, device=device)
        k_index = torch.arange(k0 + ks, k0 + ke, device=device)
        return (k_index[None, :] <= q_index[:, None]) & (k_index[None, :] >= self.first[row, self.q0 + a:self.q0 + e, None])


def forward(q, k, v, kind: str, allowed, scale: float):
    """q (H, lq, D), k (Hkv, lk, D), v (Hkv, lk, Dv) -> out (H, lq, Dv) in the statistics' dtype,
    lse (H, lq): one tile."""
    if fused(q, v):
        mask = None if allowed is None else torch.zeros(allowed.shape, dtype=q.dtype).masked_fill_(~allowed, _NEG)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q[None], k[None], v[None], 0.0, kind == "causal", attn_mask=mask, scale=scale)
        return out[0], lse[0]
    acc = torch.promote_types(q.dtype, torch.float32)
    heads, kv_heads = q.shape[0], k.shape[0]
    qg = q.view(kv_heads, heads // kv_heads, *q.shape[1:])
    s = torch.matmul(qg, k[:, None].transpose(-1, -2)).to(acc) * scale
    mask = _mask(kind, allowed, s.shape[-2:], s.device)
    if mask is not None:
        s.masked_fill_(~mask, _NEG)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    out = torch.matmul(p.to(v.dtype), v[:, None]).to(acc)
    return out.flatten(0, 1), lse.flatten(0, 1)


def backward(dout, q, k, v, out, lse, kind: str, allowed, scale: float):
    """The tile's share of the gradients, given the whole row's output and log-sum-exp
    (flash-attention's backward): dq (H, lq, D), dk (Hkv, lk, D), dv (Hkv, lk, Dv)."""
    if fused(q, v):
        mask = None if allowed is None else torch.zeros(allowed.shape, dtype=q.dtype).masked_fill_(~allowed, _NEG)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(dout[None].to(q.dtype), q[None], k[None], v[None], out[None].to(q.dtype), lse[None], 0.0,
                        kind == "causal", attn_mask=mask, scale=scale)
        return dq[0], dk[0], dv[0]
    acc = lse.dtype
    heads, kv_heads = q.shape[0], k.shape[0]
    group = heads // kv_heads
    qg = q.view(kv_heads, group, *q.shape[1:])
    dog = dout.view(kv_heads, group, *dout.shape[1:])
    s = torch.matmul(qg, k[:, None].transpose(-1, -2)).to(acc) * scale
    mask = _mask(kind, allowed, s.shape[-2:], s.device)
    if mask is not None:
        s.masked_fill_(~mask, _NEG)
    p = torch.exp(s - lse.view(kv_heads, group, -1)[..., None])
    dv = torch.matmul(p.transpose(-1, -2).to(dog.dtype), dog).to(acc).sum(1)
    dp = torch.matmul(dog, v[:, None].transpose(-1, -2)).to(acc)
    delta = (dout.to(acc) * out.to(acc)).sum(-1).view(kv_heads, group, -1)   # rowsum(dO * O)
    ds = p.mul_(dp.sub_(delta[..., None])).mul_(scale)
    dq = torch.matmul(ds.to(k.dtype), k[:, None]).to(acc)
    dk = torch.matmul(ds.transpose(-1, -2).to(q.dtype), qg).to(acc).sum(1)
    return dq.flatten(0, 1), dk, dv


def _mask(kind: str, allowed, shape, device):
    if kind == "causal":
        return torch.ones(shape, dtype=torch.bool, device=device).tril_()
    return allowed
