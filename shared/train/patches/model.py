"""Patches of a model instance for training: its attention function (neat-packed rows attend
example by example; S² attention while training), Liger's fused kernels, and the output layer's
loss computed in chunks. Installed before PEFT wraps the model, removed before it is saved, so
the saved model (and anything that reuses the object) has its own attention and forward back.

Attention functions go through transformers' public AttentionInterface; the chunked loss
replaces the model's `loss_function` attribute, Liger its modules' forwards.

Checked against transformers 5.0 - 5.23, liger-kernel 0.6.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

from lmforge.shared.core import log

SEAMS = [
    ("transformers.AttentionInterface.register", "call", ("key", "value")),
    ("transformers.masking_utils.AttentionMaskInterface.register", "call", ("key", "value")),
]


@contextmanager
def model_patches(model, device, *, shift: bool, kernels: str, neat: bool, layout=None, mode: str = "auto"):
    """The attention and kernel patches a run asks for, undone on exit. With a context-parallel
    `layout`, attention spans the group (Ulysses or ring) and keeps neat-packed examples apart."""
    from lmforge.shared.train.patches import kernels as kernels_
    from lmforge.shared.train.patches import packedattn, shiftattn

    with ExitStack() as undo:
        if layout is not None:
            from lmforge.shared.train.contextpar import attention as context_parallel

            chosen = context_parallel.install(model, layout, mode)
            undo.callback(context_parallel.uninstall, model)
            log.info(f"train: context parallel over {layout.size} processes per row ({chosen})")
        elif shift:
            shiftattn.check_model(model.config)
            shiftattn.install(model)
            undo.callback(shiftattn.uninstall, model)
            log.info(f"train: S² attention (--shift-attn) while training, over {device.attn}")
        elif packedattn.applies(model, device.attn, neat):   # one causal attention per example
            packedattn.install(model)
            undo.callback(packedattn.uninstall, model)
            log.info("train: neat-packed rows attend example by example (sdpa per example)")
        if kernels == "liger":
            kernels_.apply_liger(model)   # for the run's lifetime: the model object is not reused unpatched
        yield


@contextmanager
def trainer_patches(trainer, model, o):
    """The output layer's loss in chunks (less memory), when the stage's trainer asks for it
    (`trainer.lmforge_chunked_loss`) and nothing else fuses the loss: not under ZeRO-3 (which
    gathers a layer's weights only inside its forward), not with Liger or Unsloth."""
    from lmforge.shared.core.commands.training import zero3
    from lmforge.shared.train.patches import lossfn

    restore = None
    if getattr(trainer, "lmforge_chunked_loss", False) and not zero3(getattr(o, "deepspeed", None)) \
            and getattr(o, "kernels", "none") in ("none", "", None):
        restore = lossfn.install(model)
    try:
        yield
    finally:
        if restore is not None:
            restore()
