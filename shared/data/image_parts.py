"""Images in source rows: a path, a data URL or bytes -> a stored image part (its bytes and format)."""

from __future__ import annotations

from lmforge.shared.data.aligned import RowError
from lmforge.shared.data.row_values import kind_of


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
          (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))


def image_format(data: bytes) -> str | None:
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def image_part(value: object, media_dir: str | None, where: str) -> dict:
    """An image given as a path, a data URL, bytes, or {"bytes", "path"} / {"url"} -> a stored part."""
    import base64
    from pathlib import Path

    data: bytes | None = None
    if isinstance(value, dict):
        if isinstance(value.get("bytes"), (bytes, bytearray)):
            data = bytes(value["bytes"])
        else:
            value = value.get("url") or value.get("path") or value.get("image_url") or value.get("image")
            if isinstance(value, dict):
                value = value.get("url")
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    if data is None:
        if not isinstance(value, str) or not value:
            raise RowError(f"{where}: an image must be a path, a data URL or bytes, found {kind_of(value)}")
        if value.startswith("data:"):
            head, _, payload = value.partition(",")
            if ";base64" not in head:
                raise RowError(f"{where}: only base64 data URLs are supported for images")
            try:
                data = base64.b64decode(payload, validate=True)
            except ValueError:
                raise RowError(f"{where}: the image data URL is not valid base64") from None
        elif "://" in value:
            raise RowError(f"{where}: image '{value[:60]}' is a remote URL; download it and give a local path")
        else:
            path = Path(value[len("file://"):] if value.startswith("file://") else value)
            if not path.is_absolute() and media_dir:
                path = Path(media_dir) / path
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise RowError(f"{where}: image '{value}' cannot be read ({exc.strerror})") from None
    fmt = image_format(data)
    if fmt is None:
        raise RowError(f"{where}: the image is not a PNG, JPEG, GIF, WebP, BMP or TIFF file")
    return {"type": "image", "text": None, "image": data, "format": fmt}


def media_refused(kind: str, where: str) -> RowError:
    return RowError(f"{where}: {kind} content is not supported yet (text and images are)")
