"""`train pt` and `train sft`: the plain Trainer on packed rows with the padding-free collator (or
the data's modality's, which adds each batch's media), LoRA+ and BAdam optimisers where asked, and
the output layer's loss in chunks (patches/model.py)."""

from __future__ import annotations

from typing import Any

from lmforge.shared.data.packed import PackedData


def build_default_trainer(o, model, tokenizer, args, data: PackedData, eval_data: PackedData | None):
    """pt/sft: the plain Trainer on packed rows with the padding-free collator."""
    from lmforge.shared.data.collate import PackedCollator
    from transformers import Trainer

    from lmforge.shared.data import modalities

    media = modalities.of_packed(data)
    collator = (media.sft_collator(o.model, model, tokenizer, data) if media is not None   # pixels per batch
                else PackedCollator(neat=data.meta.get("packing") == "neat", pad_id=tokenizer.pad_token_id or 0))
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
