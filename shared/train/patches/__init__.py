"""Every place lmforge reaches into transformers, TRL, PEFT or accelerate beyond their public
API, in one package: each patch is entered through one context manager (undone on the way out,
in the reverse order), and each module lists its seams — the upstream names it overrides or
reads — with the versions it was checked against. tests/test_upstream_seams.py reads every
seam's signature from the installed packages and fails, naming the seam and this package, when
an upgrade changes one.

    model.py       the model patches a run enters (and leaves before saving):
      packedattn.py  neat-packed rows attend example by example (AttentionInterface)
      shiftattn.py   S² attention while training (AttentionInterface)
      kernels.py     Liger's and Unsloth's kernels (CUDA)
      lossfn.py      the output layer's loss in chunks (the model's loss_function)
    lorafused.py   PEFT's lora.Linear forward in the base's precision, as one autograd node
    trainer.py     the Trainer's pending-loss totals, for an exact resume
    fsdp.py        the Trainer's checkpoint steps for a model sharded with FSDP2 (--fsdp)
    grpo.py        TRL GRPOTrainer's private hooks: packed prompt ids, image rows, reward checks
    preference.py  TRL's DPO/KTO and the Trainer's private hooks for reward models and preference losses
"""

from __future__ import annotations

from lmforge.shared.train.patches.model import model_patches, trainer_patches
from lmforge.shared.train.patches.trainer import attributes_present as trainer_state_kept

__all__ = ["model_patches", "trainer_patches", "trainer_state_kept", "seams"]


def seams() -> list[tuple]:
    """Every seam of every patch module: (upstream name, kind, expected parameters or None,
    checked versions)."""
    from lmforge.shared.train.agent import trainer as agent
    from lmforge.shared.train.patches import fsdp, grpo, lorafused, lossfn, model, preference, trainer

    return [*model.SEAMS, *trainer.SEAMS, *grpo.SEAMS, *preference.SEAMS, *lorafused.SEAMS, *lossfn.SEAMS,
            *fsdp.SEAMS, *agent.SEAMS]
