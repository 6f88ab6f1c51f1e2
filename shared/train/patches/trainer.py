"""transformers' Trainer: the loss it has summed since its last log line.

The Trainer keeps the loss of the steps since its last log line in `_tr_loss` (a tensor) and
the step of that line in `_globalstep_last_logged`; at each log line it moves the sum into
`_total_loss_scalar`. A resumed run must start with the same pending sum, or its log windows and
mean loss differ from an uninterrupted run's. No public API reads or sets these.

Checked against transformers 5.0 - 5.23.
"""

from __future__ import annotations

from contextlib import contextmanager

SEAMS = [
    # (what lmforge touches, how: attribute/override, the upstream object it lives on)
    ("transformers.Trainer._tr_loss", "attribute", "transformers.Trainer"),
    ("transformers.Trainer._globalstep_last_logged", "attribute", "transformers.Trainer"),
    ("transformers.Trainer._total_loss_scalar", "attribute", "transformers.Trainer"),
]


def loss_totals(trainer) -> tuple[float, float, int | None]:
    """(logged loss sum, pending loss sum, step of the last log line)."""
    logged = float(getattr(trainer, "_total_loss_scalar", 0.0))
    on_device = getattr(trainer, "_tr_loss", None)
    pending = float(on_device.item()) if on_device is not None and hasattr(on_device, "item") \
        else float(on_device or 0.0)
    last = getattr(trainer, "_globalstep_last_logged", None)
    return logged, pending, None if last is None else int(last)


def restore_pending_loss(trainer, pending: float, last_logged_step: int, device) -> None:
    """Put back what a checkpoint saved, at the start of a resumed run."""
    import torch

    trainer._tr_loss = torch.tensor(pending, device=device)
    trainer._globalstep_last_logged = last_logged_step


@contextmanager
def attributes_present(trainer):
    """Fail loudly (not silently wrong) if the Trainer stopped keeping these attributes."""
    yield
    missing = [name.rsplit(".", 1)[1] for name, _, _ in SEAMS if not hasattr(trainer, name.rsplit(".", 1)[1])]
    if missing:
        raise RuntimeError(f"transformers' Trainer no longer keeps {', '.join(missing)}: lmforge's resume of the "
                           "loss totals needs updating (shared/train/patches/trainer.py)")
