"""Batches for training on packed data.

Rows are right-padded to the longest row of the batch. Right padding needs no attention mask:
attention is causal, so no real token ever sees a pad, and pads carry no loss. Packed rows are
nearly full, so little is padded.

- unpacked data and `--packing`: position ids 0..n-1 per row, so the fast causal attention
  kernel runs; with `--packing` the examples inside a row may attend to each other (as in
  LLaMA-Factory's plain packing);
- `--neat-packing`: position ids restart at every example, and training runs one causal sdpa
  call per example (train/packedattn.py), or transformers turns the restarts into a block-diagonal
  causal mask (other kernels) or variable-length kernels (flash-attention): no token attends
  across examples.

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


class VisionCollator(PackedCollator):
    """Vision-language sft rows: the PackedCollator's batch plus the rows' images,
    decoded and processed per batch by the model's image processor (so memory stays flat).

    Qwen-VL models take 3D (multimodal) rotary positions: they are computed here per example
    with the model's own `get_rope_index` and concatenated, restarting at each example with
    `--neat-packing` (the first of the 4 position rows, the text positions, then carries the
    restarts that keep attention within each example)."""

    def __init__(self, neat: bool, pad_id: int, vision, rope_index=None, token_types: str | None = None):
        super().__init__(neat, pad_id)
        self.vision = vision
        self.rope_index = rope_index
        self.token_types = token_types   # the forward argument that marks image tokens, if any

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        batch = super().__call__(rows)
        images = [b for r in rows for b in r.get("images") or []]
        image_id = self.vision.image_token_id
        ids = batch["input_ids"]
        if images:
            batch.update(self.vision.pixels(images))
        if self.token_types:
            batch[self.token_types] = (ids == image_id).to(torch.long)
        if self.rope_index is not None:
            batch["position_ids"] = self._rope_positions(rows, batch, image_id)
        return batch

    def _rope_positions(self, rows: list[dict], batch: dict, image_id: int):
        import torch

        from lmforge.shared.data.multimodal import rope_positions

        grids = batch.get("image_grid_thw")
        used = 0
        out = torch.zeros((4, *batch["input_ids"].shape), dtype=torch.long)
        for b, row in enumerate(rows):
            ids = list(row["input_ids"])
            start = 0
            for length in (row["lengths"] if self.neat else [len(ids)]):
                seg = ids[start:start + length]
                runs = sum(1 for i, t in enumerate(seg) if t == image_id and (i == 0 or seg[i - 1] != image_id))
                mine = grids[used:used + runs] if grids is not None else None
                used += runs
                out[1:, b, start:start + length] = rope_positions(self.rope_index, seg, image_id, mine)
                out[0, b, start:start + length] = torch.arange(length)
                start += length
            pad = out.shape[2] - start
            if pad:   # pads continue the last positions (causal attention keeps them harmless)
                out[:, b, start:] = out[:, b, start - 1:start] + torch.arange(1, pad + 1)
        return out
