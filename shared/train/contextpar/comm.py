"""The collectives context-parallel attention and losses need, with their gradients.

Each is an autograd Function whose backward is the adjoint of its forward, so that every
process's backward computes its part of the gradient of the sum of all processes' losses:

- all_to_all: scatter one dimension among the group, gather another; backward is the reverse
  all-to-all (Ulysses' sequence <-> head resharding);
- all_reduce_sum: forward sums a tensor over the group; backward sums the gradients (each
  process's copy of the result fed its own loss);
- gather_positions: position ids of the whole row, no gradient (they are integers).

The ring's point-to-point exchange lives in ring.py, inside its own autograd Function.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    n = dist.get_world_size(group)
    send = torch.stack(x.chunk(n, dim=scatter_dim))   # (n, ...): piece j goes to process j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)  # piece i came from process i


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad.contiguous(), ctx.group, gather_dim, scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split `x` into group-size pieces along `scatter_dim`, send piece j to process j, and join
    what arrives, in process order, along `gather_dim`."""
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of `x` over the group, on every process of it, differentiably."""
    return _AllReduceSum.apply(x, group)


def gather_last(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every process's `x` along the last dimension, in process order (no gradient)."""
    n = dist.get_world_size(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)
