"""What a Hugging Face Trainer needs to train context-parallel: its data loaders regrouped, so that
the N processes of a group read the same batches.

    class CPTrainer(ContextParallelMixin, Trainer): ...
    trainer = CPTrainer(..., data_collator=ShardingCollator(collator, layout, "causal"))
    trainer.cp_layout = layout

Nothing else: for causal-LM batches the Trainer counts num_items_in_batch from every process's
shift_labels (each target token once, all processes together; in evaluation too), divides each
shard's summed loss by it and multiplies by the number of processes, and DDP averages: the
gradient of the whole batch's mean token loss; the logged and evaluation losses are the means
over all processes, the same figures. Preference and reward losses are the group's on every
process of it (losses.py).
"""

from __future__ import annotations


class ContextParallelMixin:
    """Mix in before the Trainer class (any Trainer subclass: TRL's too); set `cp_layout`."""

    cp_layout = None

    def get_train_dataloader(self):
        from lmforge.shared.train.contextpar.shard import regroup_loader

        loader = super().get_train_dataloader()  # type: ignore[misc]
        return loader if self.cp_layout is None else regroup_loader(loader, self.cp_layout)

    def get_eval_dataloader(self, eval_dataset=None):
        from lmforge.shared.train.contextpar.shard import regroup_loader

        loader = super().get_eval_dataloader(eval_dataset)  # type: ignore[misc]
        return loader if self.cp_layout is None else regroup_loader(loader, self.cp_layout)
