"""A message's content taken apart (text parts and images in order, reasoning, tool calls), and a
row's images placed in its messages."""

from __future__ import annotations

from lmforge.shared.data.aligned import USER, Message, RowError, message
from lmforge.shared.data.image_parts import image_part, media_refused
from lmforge.shared.data.row_values import calls_of, kind_of


class Content:
    """A message's content taken apart: text parts and images in order, reasoning, tool calls."""

    def __init__(self) -> None:
        self.parts: list[dict] = []
        self.reasoning: list[str] = []
        self.calls: list[dict] = []
        self.present = False

    def text(self) -> str | None:
        """The text; None when there is no content, or when the parts hold only reasoning or calls."""
        texts = [p["text"] for p in self.parts if p["type"] == "text"]
        if not self.present or (not texts and (self.calls or self.reasoning)):
            return None
        return "".join(texts)

    def message(self, role: str, **extra) -> Message:
        images = any(p["type"] == "image" for p in self.parts)
        reasoning = "".join(self.reasoning) if self.reasoning else extra.pop("reasoning", None)
        return message(role, self.text(), parts=self.parts if images else None, reasoning=reasoning,
                       tool_calls=self.calls or None, **extra)


def read_content(value: object, where: str, media_dir: str | None = None,
                 images: list | None = None) -> Content:
    """Content as a string, OpenAI / Hugging Face parts ({"type": "text", "text"}, image_url, image)
    or LLaMA-Factory's parts ({"type": "text" | "reasoning" | "tool_call" | "image", "value"}).
    `images` supplies the row's images for parts that only say {"type": "image"} and for
    `<image>` placeholders in text."""
    out = Content()
    if value is None:
        return out
    out.present = True
    if isinstance(value, str):
        _text_with_placeholders(value, out, where, media_dir, images)
        return out
    if not isinstance(value, list):
        raise RowError(f"{where}: content must be a string or a list of parts, found {kind_of(value)}")
    for part in value:
        if isinstance(part, str):
            _text_with_placeholders(part, out, where, media_dir, images)
            continue
        if not isinstance(part, dict):
            raise RowError(f"{where}: a content part must be an object, found {kind_of(part)}")
        kind = part.get("type", "text" if "text" in part else None)
        body = part.get(kind) if isinstance(kind, str) and kind in part else part.get("value", part.get("text"))
        if kind in ("text", "input_text", "output_text"):
            if not isinstance(body, str):
                raise RowError(f"{where}: a text part has no text")
            _text_with_placeholders(body, out, where, media_dir, images)
        elif kind in ("reasoning", "thinking", "think"):
            if not isinstance(body, str):
                raise RowError(f"{where}: a reasoning part has no text")
            out.reasoning.append(body)
        elif kind in ("tool_call", "tool_calls", "function_call"):
            out.calls += calls_of(body)
        elif kind in ("image", "image_url", "input_image"):
            source = body if body not in (None, {}) else (part.get("url") or part.get("path"))
            if source is None:  # the image is in the row's images column
                out.parts.append(_next_image(images, media_dir, where))
            else:
                out.parts.append(image_part(source, media_dir, where))
        elif kind in ("video", "video_url", "input_video", "audio", "audio_url", "input_audio"):
            raise media_refused(kind.split("_")[-1] if kind.startswith("input_") else kind.split("_")[0], where)
        else:
            raise RowError(f"{where}: unknown content part type {kind!r} "
                           "(text, image, image_url, reasoning and tool_call are read)")
    return out


def _next_image(images: list | None, media_dir: str | None, where: str) -> dict:
    if not images:
        raise RowError(f"{where}: more image placeholders than images in the row")
    return image_part(images.pop(0), media_dir, where)


def _text_with_placeholders(text: str, out: Content, where: str, media_dir: str | None,
                            images: list | None) -> None:
    pieces = text.split("<image>") if images is not None else [text]
    for i, piece in enumerate(pieces):
        if i:
            out.parts.append(_next_image(images, media_dir, where))
        if piece or len(pieces) == 1:
            out.parts.append({"type": "text", "text": piece, "image": None, "format": None})


def row_images(row: dict, col: str) -> list | None:
    """The row's images column (LLaMA-Factory `images`, Hugging Face vision datasets), if any."""
    value = row.get(col)
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        value = [value]
    return list(value)


def leftover_images(turns: list[Message], images: list | None, media_dir: str | None, where: str = "images",
                    total: int = 0) -> None:
    """A row without any image placeholder has its images put before the text of the first user
    message (as Hugging Face vision datasets mean them); a row with placeholders must have one per
    image (`total`: the row's image count). Media columns other than images are refused by the caller."""
    if not images:
        return
    if len(images) < total:
        raise RowError(f"{total - len(images)} image placeholder(s) for {total} images in the row "
                       "(one <image> placeholder per image)")
    first = next((m for m in turns if m["role"] == USER), None)
    if first is None:
        raise RowError("images but no user message to hold them")
    parts = [image_part(x, media_dir, where) for x in images]
    images.clear()
    text = first.get("content") or ""
    first["parts"] = parts + (first.get("parts") or
                              ([{"type": "text", "text": text, "image": None, "format": None}] if text else []))


def refuse_media_columns(row: dict) -> None:
    for col in ("videos", "audios"):
        if row.get(col):
            raise media_refused(col[:-1], f"'{col}'")
