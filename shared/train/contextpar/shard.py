"""Batches cut into context-parallel shards, and data loaders regrouped so that the N processes
of a group read the same batches.

Every row is right-padded to a multiple of N and cut into N contiguous shards; process i of the
group keeps shard i. What depends on the next token is computed on the whole row first, so it
crosses shard boundaries correctly:

- causal LM batches (pt, sft: PackedCollator): labels are shifted before the cut (`shift_labels`,
  which both transformers' loss and lmforge's chunked loss take as the targets as they are), so a
  shard's last token is trained to predict the first token of the next shard;
- preference pairs (dpo; TRL's collator: rows [chosen; rejected], right-padded): next-token
  targets and the mask of scored positions, and each row's scored-token count (whole row);
- reward pairs (rm; PairCollator): the rows and the index of each row's last token (whole row).

Padding added here continues the last example's positions, like the collator's own: causal
attention keeps it unseen by real tokens, and it carries no loss. When padding was added, the
shard also carries an `attention_mask` (0 on it), read only by a mixture of experts' balancing
loss (losses.py) so that the added tokens do not count among the routed ones; the attention
functions ignore it.
"""

from __future__ import annotations

from typing import Any

IGNORE = -100


def padded_length(length: int, size: int) -> int:
    return -(-length // size) * size


def _pad(x, pad: int, value):
    import torch.nn.functional as F

    return F.pad(x, (0, pad), value=value) if pad else x


def _continue(positions, pad: int):
    """Position ids extended by `pad` steps past each row's last one."""
    import torch

    if not pad:
        return positions
    steps = torch.arange(1, pad + 1, device=positions.device, dtype=positions.dtype)
    return torch.cat([positions, positions[:, -1:] + steps], dim=1)


def _cut(x, layout):
    part = x.shape[1] // layout.size
    return x[:, layout.rank * part:(layout.rank + 1) * part].contiguous()


def _right_padded(mask) -> bool:
    """Whether every row of a 0/1 mask is ones then zeros (right padding)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def _real_tokens(rows: int, length: int, total: int, device):
    import torch

    real = torch.ones(rows, total, dtype=torch.long, device=device)
    real[:, length:] = 0
    return real


def shard_causal(batch: dict, layout, pad_id: int = 0) -> dict:
    """This process's shard of a causal-LM batch (input_ids, labels, position_ids as PackedCollator
    makes them): input_ids, position_ids, labels and shift_labels (both the shifted targets)."""
    import torch

    ids = batch["input_ids"]
    rows, length = ids.shape
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(length, device=ids.device).expand(rows, -1)
    if positions.dim() != 2:
        raise ValueError("context parallelism takes one row of position ids per sequence (not multimodal 3-D ones)")
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("context parallelism takes padding-free rows (position ids), not an attention mask with zeros")
    total = padded_length(length, layout.size)
    pad = total - length
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "position_ids", "attention_mask")}
    out["input_ids"] = _cut(_pad(ids, pad, pad_id), layout)
    out["position_ids"] = _cut(_continue(positions, pad), layout)
    labels = batch.get("labels")
    if labels is not None:
        shifted = _pad(labels[:, 1:], 1, IGNORE)   # position t is trained to predict token t + 1
        out["labels"] = out["shift_labels"] = _cut(_pad(shifted, pad, IGNORE), layout)
    if pad:
        out["attention_mask"] = _cut(_real_tokens(rows, length, total, ids.device), layout)
    return out


def shard_pairs(batch: dict, layout, pad_id: int = 0) -> dict:
    """This process's shard of a preference batch (TRL's collator: input_ids, attention_mask,
    completion_mask, right-padded): input_ids, position_ids, `targets` (the next token),
    `scored` (whether that next token is a completion token), `counts` (scored tokens per row,
    whole row) and `row_tokens` (the batch's real tokens, whole rows). Other entries pass through."""
    import torch

    ids, mask = batch["input_ids"], batch["attention_mask"]
    if not _right_padded(mask):
        raise ValueError("context parallelism takes right-padded preference rows")
    rows, length = ids.shape
    scored = _pad(batch["completion_mask"][:, 1:].bool(), 1, False)   # position t predicts token t + 1
    targets = _pad(ids[:, 1:], 1, pad_id)
    total = padded_length(length, layout.size)
    pad = total - length
    positions = torch.arange(total, device=ids.device).expand(rows, -1)   # pads go on counting, as in the collator
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "completion_mask")}
    out.update(input_ids=_cut(_pad(ids, pad, pad_id), layout), position_ids=_cut(positions, layout),
               targets=_cut(_pad(targets, pad, pad_id), layout), scored=_cut(_pad(scored, pad, False), layout),
               counts=scored.sum(1), row_tokens=mask.sum())
    return out


def shard_rewards(batch: dict, layout, pad_id: int = 0) -> dict:
    """This process's shard of a reward-model batch (PairCollator: input_ids, last_index):
    input_ids, position_ids, and last_index as it was (an index into the whole row)."""
    import torch

    ids = batch["input_ids"]
    rows, length = ids.shape
    total = padded_length(length, layout.size)
    positions = torch.arange(total, device=ids.device).expand(rows, -1)
    out = dict(batch)
    out.update(input_ids=_cut(_pad(ids, total - length, pad_id), layout), position_ids=_cut(positions, layout))
    return out


SHARDERS = {"causal": shard_causal, "pairs": shard_pairs, "rewards": shard_rewards}


class ShardingCollator:
    """Wraps a collator: the batch it makes, cut to this process's shard (`kind`: causal, pairs or
    rewards). Its other attributes (token counts for tokens/s) are the wrapped collator's; those
    count the whole rows, which all N processes of a group see alike."""

    def __init__(self, collate, layout, kind: str = "causal", pad_id: int = 0):
        if kind not in SHARDERS:
            raise ValueError(f"unknown batch kind {kind!r} (use {', '.join(SHARDERS)})")
        self.collate, self.layout, self.kind, self.pad_id = collate, layout, kind, pad_id

    def __call__(self, rows: list[dict]) -> dict:
        return SHARDERS[self.kind](self.collate(rows), self.layout, self.pad_id)

    def __getattr__(self, name: str) -> Any:
        if name == "collate":
            raise AttributeError(name)
        return getattr(self.collate, name)


def regroup_loader(loader, layout):
    """A data loader that accelerate prepared for all W x N processes (each process its own
    batches), changed so that the N processes of a context-parallel group read the same batches
    and the W groups different ones: its batch sampler shards over the data-parallel groups.

    The Trainer's loaders are map-style datasets sharded by accelerate's BatchSamplerShard (every
    process walks the same seeded order and keeps every P-th batch); with P and the index set to
    the data-parallel size and group, each group keeps every W-th batch. The loader's length and
    total batch size follow (they are read from the sampler)."""
    if layout.size == 1:
        return loader
    sampler: Any = getattr(loader, "batch_sampler", None)   # accelerate's BatchSamplerShard
    if (sampler is None or type(sampler).__name__ != "BatchSamplerShard" or not hasattr(sampler, "process_index")
            or getattr(sampler, "split_batches", True)):
        raise RuntimeError("context parallelism: the data loader is not sharded by batches "
                           f"(got {type(sampler).__name__}); an iterable or dispatched dataset is not supported")
    sampler.num_processes = layout.dp_size
    sampler.process_index = layout.dp_rank
    return loader
