"""Vision-language models: which parts are the vision tower, the projector and the language model,
and what trains.

Defaults (as LLaMA-Factory's): the vision tower and the projector are frozen; LoRA adapts the
language model's linear layers only; full and freeze train the language model. `--train-projector`
and `--train-vision-tower` add those parts (LoRA: as fully trained modules saved with the adapter).

Families (transformers' module names):
    qwen2_vl, qwen2_5_vl, qwen3_vl   model.visual (its merger / deepstack mergers: the projector),
                                     model.language_model
    llava                            model.vision_tower, model.multi_modal_projector, model.language_model
    gemma3                           model.vision_tower, model.multi_modal_projector, model.language_model
"""

from __future__ import annotations

VISION = ("visual", "vision_tower", "vision_model")
PROJECTOR = ("multi_modal_projector", "merger", "deepstack_merger_list", "mm_projector")


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_vlm(model) -> bool:
    return bool(vision_modules(model))


def require_vlm(model, model_dir: str, data) -> None:
    """Packed image data trains only a vision-language model: one line otherwise."""
    from lmforge.shared.core.errors import BadInput

    if not is_vlm(model):
        raise BadInput(f"{data.path}: the data holds images (packed for a {data.meta['vision'].get('family')} "
                       f"model) and {model_dir} is a text model",
                       "train a vision-language model on it, or pack text-only data")


def vision_modules(model) -> list[str]:
    """Full names of the vision tower(s) (outermost only)."""
    names = [n for n, _ in _base(model).named_modules() if n.split(".")[-1] in VISION]
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def projector_modules(model) -> list[str]:
    names = [n for n, _ in _base(model).named_modules() if n.split(".")[-1] in PROJECTOR]
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def language_linears(model, linears: list[str]) -> list[str]:
    """The linear layers outside the vision tower and projector."""
    skip = vision_modules(model) + projector_modules(model)
    return [n for n in linears if not _under(n, skip)]


def set_trainable(model, train_projector: bool, train_vision_tower: bool) -> None:
    """Freeze (or unfreeze) the vision tower and projector of a non-adapter model."""
    vision, projector = vision_modules(model), projector_modules(model)
    for name, param in _base(model).named_parameters():
        if _under(name, projector):
            param.requires_grad_(train_projector)
        elif _under(name, vision):
            param.requires_grad_(train_vision_tower)


def modules_to_save(model, train_projector: bool, train_vision_tower: bool) -> list[str]:
    """LoRA: the parts that train fully beside the adapter (a projector inside the vision tower,
    as Qwen's merger, trains with it)."""
    vision, projector = vision_modules(model), projector_modules(model)
    out = list(vision) if train_vision_tower else []
    if train_projector:
        out += [p for p in projector if not _under(p, out)]
    return out
