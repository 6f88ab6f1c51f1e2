"""Ring attention: each process keeps its queries; key/value shards travel around the group.

With N processes, process r holds the queries, keys and values of shard r. In N steps it attends
its queries to every shard's keys (its own first, then those of r-1, r-2, ... as they arrive
from the previous process while the current block is computed), and merges the partial results
exactly by their log-sum-exp (the online softmax):

    lse = logaddexp(lse_a, lse_b),  out = out_a exp(lse_a - lse) + out_b exp(lse_b - lse)

A query may see a key when the key is not after it, belongs to the same example (position ids
restart per example; the whole row's are known to every process) and lies inside the sliding
window if the layer has one. Blocks wholly after the queries (shards r+1..N-1) are skipped: with
contiguous shards the last process does the most work (the price of keeping shards contiguous,
as the data path cuts them).

Backward (flash-attention's): the saved output and log-sum-exp give each block's probabilities
again, P = exp(S - lse); the gradients of the block's keys and values travel around the ring
with it, each process adding its queries' share, and arrive home after N hops.

Each block is computed in tiles limited to the keys their queries can see (for neat-packed rows,
little more than their examples), by a fused kernel on a CPU or plain matrix products elsewhere
(blocks.py). Grouped-query attention travels as it is (only the key/value heads go round).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lmforge.shared.train.contextpar import blocks


def segment_starts(positions: torch.Tensor) -> torch.Tensor:
    """(rows, L) position ids -> (rows, L): the index of the first token of each token's example
    (an example starts wherever a position is not the previous one plus one)."""
    rows, length = positions.shape
    index = torch.arange(length, device=positions.device).expand(rows, -1)
    start = torch.ones_like(positions, dtype=torch.bool)
    start[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    return torch.where(start, index, torch.zeros_like(index)).cummax(dim=1).values


def first_keys(positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """(rows, L): the first key each query may see (its example's start, or the window's)."""
    first = segment_starts(positions)
    if window:
        index = torch.arange(positions.shape[1], device=positions.device)
        first = torch.maximum(first, index - window + 1)
    return first


def _exchange(send: torch.Tensor, layout, tag: int):
    """Send to the next process, receive from the previous one (non-blocking)."""
    recv = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, layout.next, layout.group, tag),
           dist.P2POp(dist.irecv, recv, layout.prev, layout.group, tag)]
    return recv, dist.batch_isend_irecv(ops)


def _wait(works) -> None:
    for work in works:
        work.wait()


def _pack(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    out, at = [], 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        out.append(flat[at:at + n].view(shape))
        at += n
    return out


def _tiles(q, v, first, first_cpu, starts_cpu, layout) -> blocks.Tiles:
    return blocks.Tiles(first, first_cpu, starts_cpu, layout.rank * q.shape[2], q.shape[2], blocks.fused(q, v),
                        q.shape[1], blocks.SCORES)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, first, first_cpu, starts_cpu, layout, scale: float):
        rows, heads, length, _ = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)   # softmax statistics and sums: fp32 at least
        tiles = _tiles(q, v, first, first_cpu, starts_cpu, layout)
        out = torch.zeros(rows, heads, length, v.shape[-1], dtype=acc, device=q.device)
        lse = torch.full((rows, heads, length), float("-inf"), dtype=acc, device=q.device)
        kv, shapes = _pack(k, v), (k.shape, v.shape)
        for step in range(layout.size):
            source = (layout.rank - step) % layout.size
            if step < layout.size - 1:   # the next block travels while this one is computed
                arriving, works = _exchange(kv, layout, 0)
            if source <= layout.rank:    # later shards are wholly in the future
                kb, vb = _unpack(kv, shapes)
                k0 = source * length
                for row in range(rows):
                    for a, e, ks, ke, kind in tiles.plan(row, k0, length):
                        allowed = tiles.allowed(row, a, e, k0, ks, ke) if kind == "mask" else None
                        part, part_lse = blocks.forward(q[row, :, a:e], kb[row, :, ks:ke], vb[row, :, ks:ke], kind,
                                                        allowed, scale)
                        old = lse[row, :, a:e]
                        new = torch.logaddexp(old, part_lse.to(acc))
                        out[row, :, a:e] = (out[row, :, a:e] * torch.exp(old - new)[..., None]
                                            + part.to(acc) * torch.exp(part_lse.to(acc) - new)[..., None])
                        lse[row, :, a:e] = new
            if step < layout.size - 1:
                _wait(works)
                kv = arriving
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, first, first_cpu, starts_cpu)
        ctx.layout, ctx.scale = layout, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, first, first_cpu, starts_cpu = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        rows, heads, length, _ = q.shape
        acc = lse.dtype
        dout = grad_out.contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        tiles = _tiles(q, v, first, first_cpu, starts_cpu, layout)
        kv, shapes = _pack(k, v), (k.shape, v.shape)
        pending = None
        for step in range(layout.size):
            source = (layout.rank - step) % layout.size
            if step < layout.size - 1:
                arriving, works = _exchange(kv, layout, 0)
            mine = torch.zeros(k.numel() + v.numel(), dtype=acc, device=q.device)
            if source <= layout.rank:
                kb, vb = _unpack(kv, shapes)
                dk, dv = _unpack(mine, shapes)
                k0 = source * length
                for row in range(rows):
                    for a, e, ks, ke, kind in tiles.plan(row, k0, length):
                        allowed = tiles.allowed(row, a, e, k0, ks, ke) if kind == "mask" else None
                        tq, tk, tv = blocks.backward(dout[row, :, a:e], q[row, :, a:e], kb[row, :, ks:ke],
                                                     vb[row, :, ks:ke], out[row, :, a:e], lse[row, :, a:e], kind,
                                                     allowed, scale)
                        dq[row, :, a:e] += tq
                        dk[row, :, ks:ke] += tk
                        dv[row, :, ks:ke] += tv
            if layout.size == 1:
                pending = (mine, [])
                continue
            if pending is not None:   # the gradients of the block now held, from the processes before
                _wait(pending[1])
                mine += pending[0]
            pending = _exchange(mine, layout, 1)
            if step < layout.size - 1:
                _wait(works)
                kv = arriving
        assert pending is not None
        _wait(pending[1])   # after N hops, this process's own block with every process's share
        dk, dv = _unpack(pending[0], shapes)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: torch.Tensor, first_cpu: torch.Tensor,
                   starts_cpu: torch.Tensor, layout, scale: float) -> torch.Tensor:
    """q (B, H, Ls, D), k (B, Hkv, Ls, D), v (B, Hkv, Ls, Dv) of this process's shard; `first`
    (B, N Ls) the first key index each query of the whole row may see (first_keys), on the
    device and on the CPU; `starts_cpu` where each token's example starts (segment_starts).
    Returns (B, H, Ls, Dv)."""
    return _RingAttention.apply(q, k, v, first, first_cpu, starts_cpu, layout, scale)
