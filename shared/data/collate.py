"""Batches for training on packed data.

Rows are right-padded to the longest row of the batch. Right padding needs no attention mask:
attention is causal, so no real token ever sees a pad, and pads carry no loss. Packed rows are
nearly full, so little is padded.

- unpacked data and `--packing`: position ids 0..n-1 per row, so the fast causal attention
  kernel runs; with `--packing` the examples inside a row may attend to each other (as in
  LLaMA-Factory's plain packing);
- `--neat-packing`: position ids restart at every example, and transformers turns the restarts
  into a block-diagonal causal mask (sdpa/eager) or variable-length kernels (flash-attention):
  no token attends across examples.

Loss: the first label of every example is set to -100, so one example's last token is never
trained to predict the next example's first. The model shifts labels itself; the Trainer divides
the summed loss by the number of trained tokens over all gradient-accumulation steps.
"""

from __future__ import annotations

IGNORE = -100


class PackedCollator:
    def __init__(self, neat: bool, pad_id: int = 0):
        self.neat = neat
        self.pad_id = pad_id
        self.tokens = 0          # real (unpadded) tokens seen, for tokens/s
        self.counts: list[int] = []   # per batch: the loader reads ahead, so what trained is a prefix

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        self.counts.append(sum(len(r["input_ids"]) for r in rows))
        longest = max(len(r["input_ids"]) for r in rows)
        ids, labels, positions = [], [], []
        for row in rows:
            n = len(row["input_ids"])
            pad = longest - n
            row_labels = list(row["labels"])
            start = 0
            row_positions: list[int] = []
            for length in (row["lengths"] if self.neat else [n]):
                row_labels[start] = IGNORE
                row_positions += range(length)
                start += length
            # pads continue the last segment's positions: causal attention keeps them harmless
            row_positions += range(row_positions[-1] + 1, row_positions[-1] + 1 + pad)
            ids.append(list(row["input_ids"]) + [self.pad_id] * pad)
            labels.append(row_labels + [IGNORE] * pad)
            positions.append(row_positions)
            self.tokens += n
        # use_cache=False: with a KV cache, transformers builds a plain causal mask and ignores
        # restarts in position_ids, which would let attention cross examples
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "position_ids": torch.tensor(positions), "use_cache": False}


class PairCollator:
    """Rows of (prompt_ids, chosen_ids, rejected_ids) -> [all chosen; all rejected], right-padded."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.tokens = 0
        self.counts: list[int] = []

    def __call__(self, rows: list[dict]) -> dict:
        sequences = [r["prompt_ids"] + r["chosen_ids"] for r in rows] + [r["prompt_ids"] + r["rejected_ids"] for r in rows]
        longest = max(len(s) for s in sequences)
        self.tokens += sum(len(s) for s in sequences)
        self.counts.append(sum(len(s) for s in sequences))
        import torch

        return {"input_ids": torch.tensor([s + [self.pad_id] * (longest - len(s)) for s in sequences]),
                "last_index": torch.tensor([len(s) - 1 for s in sequences])}
