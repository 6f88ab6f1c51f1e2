"""`train pt` and `train sft`: the plain Trainer on packed rows with the padding-free collator (or,
for a vision-language model, the collator that processes each batch's images), LoRA+ and BAdam
optimisers where asked, and the output layer's loss in chunks (patches/model.py)."""

from __future__ import annotations

from typing import Any

from lmforge.shared.data.packed import PackedData


def build_default_trainer(o, model, tokenizer, args, data: PackedData, eval_data: PackedData | None):
    """pt/sft: the plain Trainer on packed rows with the padding-free collator."""
    from lmforge.shared.data.collate import PackedCollator
    from transformers import Trainer

    collator = PackedCollator(neat=data.meta.get("packing") == "neat", pad_id=tokenizer.pad_token_id or 0)
    if data.meta.get("vision"):   # images decoded and processed per batch
        collator = vision_collator(o.model, model, tokenizer, data)
    optimizers: tuple[Any, None] = (None, None)  # (a torch optimizer, or None for the Trainer's own; no scheduler)
    if getattr(o, "loraplus_ratio", None):
        import torch
        from peft.optimizers import create_loraplus_optimizer

        optimizers = (create_loraplus_optimizer(model, optimizer_cls=torch.optim.AdamW, lr=o.lr(),
                                                loraplus_lr_ratio=o.loraplus_ratio,
                                                weight_decay=o.weight_decay), None)
    from lmforge.shared.train.optimizers import custom_optimizer

    custom = custom_optimizer(o, model)
    if custom is not None:
        optimizers = (custom, None)
    trainer = Trainer(model=model, args=args, train_dataset=data.dataset,
                      eval_dataset=eval_data.dataset if eval_data else None, data_collator=collator,
                      optimizers=optimizers)
    trainer.lmforge_chunked_loss = True   # type: ignore[attr-defined]
    return trainer, collator


def vision_collator(model_dir: str, model, tokenizer, data: PackedData):
    """The collator for a vision-language model's packed sft data."""
    import inspect

    from lmforge.shared.data import multimodal
    from lmforge.shared.data.collate import VisionCollator
    from lmforge.shared.model import vision

    vision.require_vlm(model, model_dir, data)
    images = multimodal.for_packed(model_dir, tokenizer, data)
    family = images.name
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    rope_index = getattr(inner, "get_rope_index", None) if family.startswith("qwen") else None
    accepted = inspect.signature(base.forward).parameters
    token_types = next((n for n in ("mm_token_type_ids", "token_type_ids") if n in accepted), None)
    return VisionCollator(neat=data.meta.get("packing") == "neat", pad_id=tokenizer.pad_token_id or 0,
                          vision=images, rope_index=rope_index, token_types=token_types)
