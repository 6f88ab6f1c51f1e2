"""What an input other than text changes, behind one interface the stages call: `Modality`.

Images are the one modality today (images.py). A modality answers, for a model directory or a
packed dataset, everything the pipeline does differently for it:

    data pack        encoder(model_dir, tokenizer, max_pixels, min_pixels)   media -> tokens in rows
    pt/sft batches   sft_collator(...)                                        + pixel inputs per batch
    rm/dpo/kto       pair_collator(...)                                       the prompts' media, per batch
    grpo/ppo         prompts(...)                                             a prompt row's media as inputs
    the model        freeze(...), language_linears(...), modules_to_save(...), tower_modules(...)
    generation       encoder(...).textual / expand (serve, chat, eval generate)

The stages look a modality up (`of_packed(data)`, `of_model_dir(path)`, `of_model(model)`) and call
it; none of them knows a family's details. Audio or video later is one module implementing
`Modality`, registered in MODALITIES.
"""

from __future__ import annotations

from typing import Any

from lmforge.shared.data.modalities.base import Modality
from lmforge.shared.data.modalities.images import Images

MODALITIES: dict[str, Modality] = {"vision": Images()}   # the packed metadata's key -> the modality


def of_packed(data: Any) -> Modality | None:
    """The modality of packed data (its metadata names it), or None for text."""
    meta = getattr(data, "meta", data) or {}
    return next((m for key, m in MODALITIES.items() if meta.get(key)), None)


def of_model_dir(path: str) -> Modality | None:
    """The modality a model directory takes beyond text, or None."""
    return next((m for m in MODALITIES.values() if m.reads(path)), None)


def of_model(model: Any) -> Modality | None:
    """The modality whose towers a loaded model has, or None."""
    return next((m for m in MODALITIES.values() if m.tower_modules(model)), None)


__all__ = ["MODALITIES", "Modality", "of_model", "of_model_dir", "of_packed"]
