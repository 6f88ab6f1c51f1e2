"""transformers' Trainer around a model lmforge sharded with FSDP2 (`--fsdp`, train/fsdp.py): the
private steps of its checkpoint sequence, overridden so that checkpoints are sharded and written
whole or not at all (train/sharded.py), and the final save gathered into one directory.

- `_save_checkpoint`: the Trainer's own sequence (weights, optimizer and scheduler, random state,
  trainer_state.json) runs into a hidden directory that rank 0 renames once every process is done;
- `save_model`: inside a checkpoint, each process's shards; the final save, the whole model or
  adapter gathered on rank 0;
- `_save_optimizer_and_scheduler`, `_load_optimizer_and_scheduler`: the optimizer state as shards
  (re-split on load for another number of processes), the scheduler as the Trainer keeps it;
- `_load_from_checkpoint`: the weights that train, from the shards.

The accelerator's `prepare_model` (public) is told to leave the sharded model unwrapped (fsdp.py).

Checked against transformers 5.0 - 5.24.
"""

from __future__ import annotations

from pathlib import Path

SEAMS = [
    ("transformers.Trainer._save_checkpoint", "override", ("self", "model", "trial")),
    ("transformers.Trainer._save_optimizer_and_scheduler", "override", ("self", "output_dir")),
    ("transformers.Trainer._load_optimizer_and_scheduler", "override", ("self", "checkpoint")),
    # _load_from_checkpoint (self, resume_from_checkpoint, model): listed once, in preference.SEAMS
    ("transformers.Trainer.save_model", "override", ("self", "output_dir", "_internal_call")),
    ("accelerate.Accelerator.prepare_model", "call", ("self", "model", "device_placement", "evaluation_mode")),
]


def _optimizer(trainer):
    """The torch optimizer behind accelerate's wrapper."""
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


class ShardedTrainerMixin:
    """Mixed in before the stage's Trainer class (fsdp.prepare)."""

    def _save_checkpoint(self, model, trial):
        from lmforge.shared.train import sharded

        def write(staging: Path) -> None:
            kept = self.args.output_dir  # type: ignore[attr-defined]
            self.args.output_dir = str(staging)  # type: ignore[attr-defined]  # checkpoint-N goes under it
            try:
                super(ShardedTrainerMixin, self)._save_checkpoint(model, trial)  # type: ignore[misc]
            finally:
                self.args.output_dir = kept  # type: ignore[attr-defined]

        sharded.save_checkpoint(self, write)

    def save_model(self, output_dir=None, _internal_call=False):
        from lmforge.shared.train import fsdp, sharded

        target = Path(output_dir or self.args.output_dir)  # type: ignore[attr-defined]
        if _internal_call:   # inside a checkpoint: each process's shards
            sharded.save_model(self.model, target)  # type: ignore[attr-defined]
        else:
            fsdp.save_whole(self, str(target))

    def _save_optimizer_and_scheduler(self, output_dir):
        from lmforge.shared.train import sharded

        sharded.save_optimizer(self.model, _optimizer(self), self.lr_scheduler,  # type: ignore[attr-defined]
                               Path(output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from lmforge.shared.train import sharded

        sharded.load_model(model if model is not None else self.model,  # type: ignore[attr-defined]
                           Path(resume_from_checkpoint))

    def _load_optimizer_and_scheduler(self, checkpoint):
        from lmforge.shared.train import sharded

        if checkpoint is not None:
            sharded.load_optimizer(self.model, _optimizer(self), self.lr_scheduler,  # type: ignore[attr-defined]
                                   Path(checkpoint))
