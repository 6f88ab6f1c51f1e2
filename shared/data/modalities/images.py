"""Images: vision-language models (Qwen2-VL / 2.5-VL / 3-VL, LLaVA, Gemma 3).

The data side — placeholders, token counts, images fitted and stored in packed rows, pixel
inputs per batch — is multimodal.py's `Vision`; here is what the stages ask of it, and the
model's parts:

    tower       the vision tower (model.visual, model.vision_tower, model.vision_model)
    projector   between the tower and the language model (multi_modal_projector; Qwen's merger)

Defaults (as LLaMA-Factory's): the tower and the projector are frozen; LoRA adapts the language
model's linear layers only; full and freeze train the language model. `--train-projector` and
`--train-vision-tower` add those parts (LoRA: as fully trained modules saved with the adapter).
"""

from __future__ import annotations

from typing import Any

from lmforge.shared.core.errors import BadInput
from lmforge.shared.data import multimodal
from lmforge.shared.data.modalities.base import Modality

TOWER = ("visual", "vision_tower", "vision_model")
PROJECTOR = ("multi_modal_projector", "merger", "deepstack_merger_list", "mm_projector")


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _outermost(model, leaves: tuple[str, ...]) -> list[str]:
    names = [n for n, _ in _base(model).named_modules() if n.split(".")[-1] in leaves]
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class Images(Modality):
    name = "images"

    def reads(self, model_dir: str) -> bool:
        return multimodal.is_vision_model(model_dir)

    def encoder(self, model_dir: str, tokenizer: Any, **limits: int) -> multimodal.Vision:
        return multimodal.Vision(model_dir, tokenizer, limits.get("max_pixels", 768 * 768),
                                 limits.get("min_pixels", 32 * 32))

    # ------------------------------------------------------------------ batches
    def check(self, model: Any, model_dir: str, data: Any) -> None:
        if not self.tower_modules(model):
            raise BadInput(f"{data.path}: the data holds images (packed for a {data.meta['vision'].get('family')} "
                           f"model) and {model_dir} is a text model",
                           "train a vision-language model on it, or pack text-only data")

    def sft_collator(self, model_dir: str, model: Any, tokenizer: Any, data: Any) -> Any:
        """The padding-free collator plus each batch's pixels; Qwen's 3D rotary positions per example."""
        import inspect

        from lmforge.shared.data.collate import VisionCollator

        self.check(model, model_dir, data)
        images = multimodal.for_packed(model_dir, tokenizer, data)
        base = _base(model)
        inner = getattr(base, "model", base)
        rope_index = getattr(inner, "get_rope_index", None) if images.name.startswith("qwen") else None
        accepted = inspect.signature(base.forward).parameters
        token_types = next((n for n in ("mm_token_type_ids", "token_type_ids") if n in accepted), None)
        return VisionCollator(neat=data.meta.get("packing") == "neat", pad_id=tokenizer.pad_token_id or 0,
                              vision=images, rope_index=rope_index, token_types=token_types)

    def pair_collator(self, collate: Any, model_dir: str, model: Any, tokenizer: Any, data: Any,
                      paired: bool = True) -> Any:
        self.check(model, model_dir, data)
        return ImagePairs(collate, model, multimodal.for_packed(model_dir, tokenizer, data), paired)

    def prompts(self, model_dir: str, model: Any, tokenizer: Any, data: Any) -> multimodal.PromptImages:
        self.check(model, model_dir, data)
        return multimodal.PromptImages(model_dir, model, tokenizer, data)

    # ------------------------------------------------------------------ the model's parts
    def tower_modules(self, model: Any) -> list[str]:
        return _outermost(model, TOWER)

    def projector_modules(self, model: Any) -> list[str]:
        return _outermost(model, PROJECTOR)

    def freeze(self, model: Any, train_projector: bool, train_tower: bool) -> None:
        tower, projector = self.tower_modules(model), self.projector_modules(model)
        for name, param in _base(model).named_parameters():
            if _under(name, projector):
                param.requires_grad_(train_projector)
            elif _under(name, tower):
                param.requires_grad_(train_tower)

    def language_linears(self, model: Any, linears: list[str]) -> list[str]:
        skip = self.tower_modules(model) + self.projector_modules(model)
        return [n for n in linears if not _under(n, skip)]

    def modules_to_save(self, model: Any, train_projector: bool, train_tower: bool) -> list[str]:
        """A projector inside the tower (Qwen's merger) trains with it."""
        tower, projector = self.tower_modules(model), self.projector_modules(model)
        out = list(tower) if train_tower else []
        if train_projector:
            out += [p for p in projector if not _under(p, out)]
        return out


class ImagePairs:
    """A preference batch + each prompt's images, processed by the model's image processor.
    Paired (dpo, rm: rows [chosen; rejected]) the images go twice, in that order; unpaired (kto) once,
    for the answer rows and again for the KL rows (the same prompts with a neighbour's answer), which
    get their own token types (KL_*)."""

    def __init__(self, collate, model, vision: multimodal.Vision, paired: bool = True):
        self.collate, self.model, self.vision, self.paired = collate, model, vision, paired

    def __call__(self, rows):
        images = [b for r in rows for b in r.get("prompt_images") or []]
        batch = self.collate([{k: v for k, v in r.items() if k != "prompt_images"} for r in rows])
        if images:
            batch.update(self.vision.pixels(images + images if self.paired else images))
        base = _base(self.model)
        batch.update(self.vision.token_types(base, batch["input_ids"]))
        if "KL_input_ids" in batch:
            batch.update({"KL_" + k: v for k, v in self.vision.token_types(base, batch["KL_input_ids"]).items()})
        return batch

    def __getattr__(self, name):   # the wrapped collator's token counts (tokens, counts) for tokens/s
        if name == "collate":
            raise AttributeError(name)
        return getattr(self.collate, name)
