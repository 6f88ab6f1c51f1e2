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
        self.trained_tokens = 0  # tokens with a loss

    def __call__(self, rows: list[dict]) -> dict:
        import torch

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
            self.trained_tokens += sum(1 for x in row_labels if x != IGNORE)
        # use_cache=False: with a KV cache, transformers builds a plain causal mask and ignores
        # restarts in position_ids, which would let attention cross examples
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "position_ids": torch.tensor(positions), "use_cache": False}
