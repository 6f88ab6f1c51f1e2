"""Vision-language data: images in aligned rows -> image tokens in packed rows -> pixels per batch.

`data pack` with a vision-language model (a model directory with an image processor) renders each
conversation as text with one placeholder per image (the family's own, e.g. Qwen's
`<|vision_start|><|image_pad|><|vision_end|>`), tokenizes it, and replaces each placeholder with
exactly as many image tokens as the model's vision tower returns for that image at its size
(after --image-max-pixels / --image-min-pixels). Labels are never on image tokens. The images
(resized where the caps applied, else the original bytes) travel in the packed row's `images`
column, in the order their tokens appear; the collator decodes them per batch with the model's
image processor (`Vision.pixels`), so memory stays flat however many rows there are.

The image processor is read from the model directory by modeldir/ (on its own, not through
AutoProcessor: see load_image_processor).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable

from lmforge.shared.core.errors import BadInput
from lmforge.shared.modeldir.config import config_dict, is_vision
from lmforge.shared.modeldir.weights import load_image_processor

IGNORE = -100


@dataclass(frozen=True)
class Family:
    placeholder: str      # what stands for one image in the rendered text
    image_token: str      # the token whose embeddings the vision features replace
    count: str            # how the number of image tokens is found: grid | square | fixed


_QWEN = Family("<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>", "grid")
FAMILIES: dict[str, Family] = {
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": _QWEN,
    "llava": Family("<image>", "<image>", "square"),
    "gemma3": Family("<start_of_image>", "<image_soft_token>", "fixed"),
}
SUPPORTED = tuple(FAMILIES)


def is_vision_model(model: str) -> bool:
    """A model directory with an image processor and a vision-language config."""
    return is_vision(model)


def family_of(model: str) -> str:
    config = config_dict(model) or {}
    name = str(config.get("model_type", "unknown"))
    if name not in FAMILIES:
        raise BadInput(f"{model}: vision-language model type '{name}' is not supported",
                       f"supported: {', '.join(SUPPORTED)}")
    return name


def fit_size(width: int, height: int, max_pixels: int, min_pixels: int) -> tuple[int, int]:
    """(width, height) scaled (aspect kept) into [min_pixels, max_pixels], as LLaMA-Factory does."""
    import math

    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
    elif width * height < min_pixels:
        scale = math.sqrt(min_pixels / (width * height))
    else:
        return width, height
    return max(1, int(width * scale)), max(1, int(height * scale))


# what PIL raises on bytes that are not a readable image (some plugins raise SyntaxError or EOFError)
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError)


class ImageTooLarge(BadInput):
    """An image over a size limit, found from its header before anything is decoded."""


def image_size(data: bytes, where: str = "image", max_pixels: int | None = None) -> tuple[int, int]:
    """An image's (width, height), read from its header alone: PIL opens lazily and decodes no
    pixels here, so a small file claiming a huge size (a decompression bomb) costs nothing.
    ImageTooLarge above `max_pixels` (or above what PIL itself decodes); BadInput when the bytes
    are not a readable image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as exc:   # its header claims over twice PIL's own pixel limit
        limit = f"; at most {max_pixels:,} pixels are taken" if max_pixels is not None else ""
        raise ImageTooLarge(f"{where}: the image is too large to decode ({exc}){limit}",
                            "send a smaller image") from None
    except _UNREADABLE as exc:
        raise BadInput(f"{where}: the image cannot be decoded ({exc})", "fix or drop the image") from None
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"{where}: the image is {width} x {height} = {width * height:,} pixels; "
                            f"at most {max_pixels:,} are taken", "send a smaller image")
    return width, height


def open_image(data: bytes, where: str = "image"):
    """Bytes -> an RGB PIL image; unreadable bytes, or an image larger than PIL decodes (a
    decompression bomb), are a one-line BadInput."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB") if image.mode != "RGB" else image
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{where}: the image is too large to decode ({exc})", "send a smaller image") from None
    except _UNREADABLE as exc:
        raise BadInput(f"{where}: the image cannot be decoded ({exc})", "fix or drop the image") from None


class Vision:
    """One model's image facts: placeholder, token counts, pixels. Built once per process."""

    def __init__(self, model: str, tokenizer: Any, max_pixels: int = 768 * 768, min_pixels: int = 32 * 32):
        if min_pixels > max_pixels:
            raise BadInput(f"--image-min-pixels {min_pixels} is above --image-max-pixels {max_pixels}",
                           "lower --image-min-pixels")
        self.model = model
        self.name = family_of(model)
        self.family = FAMILIES[self.name]
        self.config = config_dict(model) or {}
        self.max_pixels, self.min_pixels = max_pixels, min_pixels
        self.tokenizer = tokenizer
        self.processor = load_image_processor(model)
        missing = [t for t in (self.family.image_token, *self._specials())
                   if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if missing:
            raise BadInput(f"{model}: the tokenizer lacks the image token(s) {', '.join(missing)}",
                           "save the model's own tokenizer with it")
        self.image_token_id: int = tokenizer.convert_tokens_to_ids(self.family.image_token)
        self.placeholder_ids: list[int] = tokenizer.encode(self.family.placeholder, add_special_tokens=False)
        self._expansions: dict[tuple[int, int], list[int]] = {}

    def _specials(self) -> list[str]:
        return [t for t in self.family.placeholder.replace("><", ">\x00<").split("\x00") if t.startswith("<")]

    # ------------------------------------------------------------------ counts

    def count(self, width: int, height: int) -> int:
        """Image tokens for an image of this size (as the processor resizes it)."""
        kind = self.family.count
        if kind == "grid":
            merge = int(getattr(self.processor, "merge_size", 2))
            return int(self.processor.get_number_of_image_patches(height, width, {})) // merge ** 2
        vision = self.config.get("vision_config") or {}
        if kind == "square":
            side = int(vision.get("image_size", 336)) // int(vision.get("patch_size", 14))
            full = self.config.get("vision_feature_select_strategy", "default") == "full"
            return side * side + (1 if full else 0)
        return int(self.config.get("mm_tokens_per_image", 256))

    def expansion(self, width: int, height: int) -> list[int]:
        """The token ids that replace one placeholder for an image of this size."""
        key = (width, height)
        if key not in self._expansions:
            n = self.count(width, height)
            tok = self.tokenizer
            if self.name == "gemma3":
                text = f"\n\n<start_of_image>{self.family.image_token * n}<end_of_image>\n\n"
                ids = tok.encode(text, add_special_tokens=False)
            elif self.family.count == "grid":
                ids = [self.placeholder_ids[0], *[self.image_token_id] * n, *self.placeholder_ids[-1:]]
            else:
                ids = [self.image_token_id] * n
            self._expansions[key] = ids
        return self._expansions[key]

    # ------------------------------------------------------------------ rows

    def fit(self, data: bytes, where: str) -> tuple[bytes, int, int]:
        """Image bytes within the pixel caps (re-encoded as PNG only when resized), and their size."""
        from PIL import Image

        image = open_image(data, where)
        width, height = fit_size(image.width, image.height, self.max_pixels, self.min_pixels)
        try:
            self.count(width, height)   # the image processor's own limits (Qwen's: an aspect ratio under 200)
        except ValueError as exc:
            raise BadInput(f"{where}: the model's image processor cannot take a {image.width} x {image.height} "
                           f"image ({exc})", "crop or pad the image") from None
        if (width, height) == (image.width, image.height):
            return data, width, height
        out = io.BytesIO()
        image.resize((width, height), Image.Resampling.BICUBIC).save(out, format="PNG")
        return out.getvalue(), width, height

    def textual(self, messages: list[dict]) -> tuple[list[dict], list[bytes]]:
        """Messages with image parts written as placeholders in their text, and the images in order."""
        out, images = [], []
        for m in messages:
            parts = m.get("parts")
            if parts and any(p.get("type") == "image" for p in parts):
                text = []
                for p in parts:
                    if p.get("type") == "image":
                        images.append(p["image"])
                        text.append(self.family.placeholder)
                    else:
                        text.append(p.get("text") or "")
                m = {**m, "content": "".join(text), "parts": None}
            out.append(m)
        return out, images

    def expand(self, ids, labels, images: list[bytes], where: str):
        """Each placeholder in `ids` -> its image tokens (labels -100 there).

        Returns (ids, labels, shift, fitted images): shift(i) maps an old token index to the new one."""
        from array import array

        p = self.placeholder_ids
        found = [i for i in range(len(ids) - len(p) + 1) if ids[i] == p[0] and list(ids[i:i + len(p)]) == p]
        if len(found) != len(images):
            raise BadInput(f"{where}: the conversation has {len(found)} image placeholder(s) "
                           f"('{self.family.placeholder}') for {len(images)} image(s)",
                           "remove literal image placeholders from the text")
        if not images:
            return ids, labels, (lambda i: i), []
        new_ids, new_labels, fitted = array("i"), array("i"), []
        starts: list[tuple[int, int]] = []   # (old index of a placeholder's end, tokens added so far)
        at, added = 0, 0
        for k, start in enumerate(found):
            data, width, height = self.fit(images[k], f"{where}: image {k + 1}")
            fitted.append(data)
            tokens = self.expansion(width, height)
            new_ids.extend(ids[at:start])
            new_labels.extend(labels[at:start])
            new_ids.extend(tokens)
            new_labels.extend([IGNORE] * len(tokens))
            at = start + len(p)
            added += len(tokens) - len(p)
            starts.append((at, added))
        new_ids.extend(ids[at:])
        new_labels.extend(labels[at:])

        def shift(i: int) -> int:
            extra = 0
            for end, total in starts:
                if i >= end:
                    extra = total
            return i + extra

        return new_ids, new_labels, shift, fitted

    def image_tokens(self, ids) -> int:
        import numpy as np

        return int(np.count_nonzero(np.asarray(ids, dtype=np.int64) == self.image_token_id))

    # ------------------------------------------------------------------ batches

    def pixels(self, images: list[bytes]) -> dict:
        """Stored images -> the model's pixel inputs (pixel_values, and image_grid_thw for Qwen)."""
        decoded = [open_image(b) for b in images]
        kwargs: dict = {"return_tensors": "pt"}
        if self.name == "gemma3":
            kwargs["do_pan_and_scan"] = False
        out = self.processor(images=decoded, **kwargs)
        return {k: v for k, v in out.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}

    def token_types(self, model, ids) -> dict:
        """The forward argument that marks image tokens, where the model takes one (Qwen:
        mm_token_type_ids, for its 3D positions; Gemma 3: token_type_ids, for attention within images)."""
        import inspect

        import torch

        accepted = inspect.signature(model.forward).parameters
        name = next((n for n in ("mm_token_type_ids", "token_type_ids") if n in accepted), None)
        return {name: (ids == self.image_token_id).to(torch.long)} if name else {}

    def metadata(self) -> dict:
        return {"family": self.name, "image_token_id": self.image_token_id,
                "max_pixels": self.max_pixels, "min_pixels": self.min_pixels}


def from_metadata(model: str, tokenizer: Any, meta: dict | None) -> Vision | None:
    """The Vision a packed dataset was made with (None for text data)."""
    if not meta:
        return None
    return Vision(model, tokenizer, int(meta.get("max_pixels", 768 * 768)), int(meta.get("min_pixels", 32 * 32)))


def for_packed(model: str, tokenizer: Any, data: Any) -> Vision:
    """The Vision of packed image data, checked against the model that trains on it."""
    meta = data.meta["vision"]
    family = family_of(model)
    if family != meta.get("family"):
        raise BadInput(f"{data.path}: packed for a {meta.get('family')} model, not {family} ({model})",
                       "pack the data with this model")
    return Vision(model, tokenizer, int(meta.get("max_pixels", 768 * 768)), int(meta.get("min_pixels", 32 * 32)))


class PromptImages:
    """The images of packed prompts (ppo-stage rows), as model inputs for a batch of row numbers:
    train grpo and train ppo. Rows are read from the memory-mapped data when needed."""

    def __init__(self, model_dir: str, model, tokenizer, data):
        self.vision = for_packed(model_dir, tokenizer, data)
        self.rows = data.dataset
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model

    def prompt_ids(self, rows: list[int]) -> list[list[int]]:
        return [list(self.rows[r]["prompt_ids"]) for r in rows]

    def pixels(self, rows: list[int]) -> dict:
        """pixel_values (+ image_grid_thw / image_sizes) of the rows' images in order, and num_images."""
        images = [list(self.rows[r]["prompt_images"] or []) for r in rows]
        flat = [b for row in images for b in row]
        return {**(self.vision.pixels(flat) if flat else {}), "num_images": [len(row) for row in images]}

    def token_types(self, ids) -> dict:
        return self.vision.token_types(self.base, ids)

    def inputs(self, rows: list[int], ids, counts: bool = False) -> dict:
        """The forward arguments the rows' images add for the sequences `ids` (the rows', in order):
        pixel inputs and image-token types, on the sequences' device (+ num_images, with `counts`)."""
        out = self.pixels(rows)
        num_images = out.pop("num_images")
        out.update(self.token_types(ids))
        out = {k: v.to(ids.device) for k, v in out.items()}
        return {**out, "num_images": num_images} if counts else out


def rope_positions(get_rope_index: Callable, ids: list[int], image_token_id: int, grids) -> Any:
    """Qwen's multimodal (3D) rotary positions of one example, by the model's own get_rope_index."""
    import torch

    tensor = torch.tensor([ids], dtype=torch.long)
    types = (tensor == image_token_id).to(torch.int32)
    positions, _ = get_rope_index(tensor, mm_token_type_ids=types,
                                  image_grid_thw=grids if grids is not None and len(grids) else None)
    return positions[:, 0, :]


def generation_inputs(vision: Vision, renderer: Any, turns: list[dict], system: str, tools: str,
                      encode: Callable[[str], tuple[list[int], str]],
                      expand: bool = True) -> tuple[list[int], str, list[bytes], str]:
    """A conversation with images -> (prompt ids with each image's tokens, lead, fitted images, prompt text),
    the way `data pack` lays them out (for `serve`, `chat` and `eval generate`). expand=False: each image
    stays one placeholder in the ids (vLLM's processor expands them itself)."""
    from array import array

    textual, images = vision.textual(turns)
    prompt = renderer.generation_prompt(textual, system, tools)
    ids, lead = encode(prompt)
    if not expand:
        return ids, lead, [vision.fit(image, "the request")[0] for image in images], prompt
    expanded, _, _, fitted = vision.expand(array("i", ids), array("i", [IGNORE]) * len(ids), images, "the request")
    return list(expanded), lead, fitted, prompt
