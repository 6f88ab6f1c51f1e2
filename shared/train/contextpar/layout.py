"""Process groups for context parallelism.

World size = data-parallel size x N. The N processes that share a sequence are N consecutive
ranks (0..N-1, N..2N-1, ...): under torchrun those are processes of one machine, so the
all-to-alls and ring exchanges of attention stay on its fastest links, while the data-parallel
groups (ranks i, i+N, i+2N, ...) span machines and only meet in the gradient reduction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.shared.core.errors import BadInput


@dataclass(frozen=True)
class Layout:
    """Where this process sits: its context-parallel group (`size` processes, this one holds shard
    `rank`) and its data-parallel group (`dp_size` groups; this one's batches are the `dp_rank`-th)."""

    size: int
    rank: int
    group: Any            # torch.distributed ProcessGroup of the N processes sharing a sequence
    ranks: tuple[int, ...]   # their global ranks, shard order
    dp_size: int
    dp_rank: int
    dp_group: Any         # the processes holding the same shard of different batches

    @property
    def next(self) -> int:
        """Global rank of the next process in the ring (the one holding the following shard)."""
        return self.ranks[(self.rank + 1) % self.size]

    @property
    def prev(self) -> int:
        return self.ranks[(self.rank - 1) % self.size]


def setup(size: int) -> Layout:
    """Create the groups for `size` processes per sequence (every process must call it, with the
    same size, after torch.distributed is initialised)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise BadInput(f"--context-parallel {size} needs a distributed launch",
                       f"start with torchrun --nproc-per-node {size} (or a multiple of it)")
    world, me = dist.get_world_size(), dist.get_rank()
    check_world(size, world)
    cp_group = dp_group = None
    cp_ranks: list[int] = []
    # new_group is collective: every process creates every group, in the same order
    for first in range(0, world, size):
        ranks = list(range(first, first + size))
        group = dist.new_group(ranks)
        if me in ranks:
            cp_group, cp_ranks = group, ranks
    for offset in range(size):
        ranks = list(range(offset, world, size))
        group = dist.new_group(ranks)
        if me in ranks:
            dp_group = group
    return Layout(size=size, rank=me % size, group=cp_group, ranks=tuple(cp_ranks),
                  dp_size=world // size, dp_rank=me // size, dp_group=dp_group)


def check_world(size: int, world: int) -> None:
    if size < 1:
        raise BadInput(f"--context-parallel {size}: must be at least 1", "1 turns context parallelism off")
    if world % size:
        raise BadInput(f"--context-parallel {size} does not divide the {world} processes of this launch",
                       f"launch a multiple of {size} processes (each group of {size} shares one sequence)")
