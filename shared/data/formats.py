"""Source formats -> the aligned schema (see aligned.py).

A `Spec` says how to read one source: its base format, the stage the rows are for, the column
names and (for chat formats) the role tags. `detect()` builds one from the columns a source has,
`from_dataset_info()` from a LLaMA-Factory dataset_info.json entry. `converter(spec)` returns a
function row -> (prompt, response, system, tools, label) that raises RowError for bad rows.

Base formats
- alpaca: instruction, input, output, system, history ([[q, r], ...]); pairwise with chosen and
  rejected columns or output = [chosen, rejected]; kto with a label column.
- sharegpt: a conversation list of {from, value} (tags configurable), optional system turn,
  function_call and observation turns, tools; pairwise chosen/rejected messages; kto label.
- openai: messages of {role, content}; assistant tool_calls become function_call turns, tool
  messages observation turns.
- preference: TRL's prompt/chosen/rejected (pairwise), prompt/completion/label (kto) and
  prompt/completion (sft), strings or message lists.
- text: one text column, for pre-training.
- aligned: already aligned rows (re-validated).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from lmforge.shared.core.errors import BadInput, close_names
from lmforge.shared.data.aligned import (
    ASSISTANT,
    FUNCTION,
    OBSERVATION,
    TOOL,
    USER,
    Message,
    RowError,
    call,
    check_turns,
    message,
)

FORMATS = ("auto", "alpaca", "sharegpt", "openai", "pairwise", "kto", "text")

DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "system": "system",
               "history": "history", "chosen": "chosen", "rejected": "rejected", "label": "label",
               "images": "images"},
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools",
                 "chosen": "chosen", "rejected": "rejected", "label": "label", "images": "images"},
    "openai": {"messages": "messages", "system": "system", "tools": "tools",
               "chosen": "chosen", "rejected": "rejected", "label": "label", "images": "images"},
    "preference": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected",
                   "completion": "completion", "system": "system", "label": "label"},
    "text": {"text": "text"},
    "aligned": {"prompt": "prompt", "response": "response", "system": "system", "tools": "tools",
                "label": "label"},
}
# LLaMA-Factory's column names for the same things.
COLUMN_ALIASES = {"prompt": "instruction", "query": "input", "response": "output", "kto_tag": "label",
                  "conversations": "messages"}
DEFAULT_TAGS: dict[str, dict[str, str]] = {
    "sharegpt": {"role": "from", "content": "value", "user": "human", "assistant": "gpt",
                 "observation": "observation", "function": "function_call", "system": "system"},
    "openai": {"role": "role", "content": "content", "user": "user", "assistant": "assistant",
               "observation": "tool", "function": "function_call", "system": "system"},
}
TAG_ALIASES = {f"{k}_tag": k for k in ("role", "content", "user", "assistant", "observation",
                                       "function", "system")}


@dataclass
class Spec:
    base: str
    stage: str
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    media_dir: str | None = None    # where relative image paths are looked up (the data's folder)

    def describe(self) -> str:
        stage = {"sft": "", "pairwise": " (pairwise)", "kto": " (kto)", "pt": " (text)"}[self.stage]
        return f"{self.base}{stage}"

    def required(self) -> list[str]:
        """Canonical columns a source must have."""
        c = self.columns
        if self.base == "alpaca":
            need = [c["instruction"]]
            if self.stage == "pairwise":
                return need  # chosen/rejected or a list-valued output: checked per row
            need.append(c["output"])
            return need + ([c["label"]] if self.stage == "kto" else [])
        if self.base in ("sharegpt", "openai"):
            need = [c["messages"]]
            if self.stage == "pairwise":
                need += [c["chosen"], c["rejected"]]
            return need + ([c["label"]] if self.stage == "kto" else [])
        if self.base == "preference":
            if self.stage == "pairwise":
                return [c["prompt"], c["chosen"], c["rejected"]]
            return [c["prompt"], c["completion"]] + ([c["label"]] if self.stage == "kto" else [])
        if self.base == "text":
            return [c["text"]]
        return ["prompt", "response"]


def parse_pairs(text: str | None, what: str, aliases: dict[str, str], known: set[str]) -> dict[str, str]:
    """`a=b,c=d` -> {"a": "b", "c": "d"} with keys checked against the known names."""
    if not text:
        return {}
    pairs = {}
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise BadInput(f"--{what} {text!r}: '{item}' is not NAME=VALUE",
                           f"write e.g. --{what} instruction=question,output=answer")
        key, value = (part.strip() for part in item.split("=", 1))
        key = aliases.get(key, key)
        if key not in known:
            raise BadInput(f"--{what}: unknown name '{key}'", close_names(key, sorted(known)))
        pairs[key] = value
    return pairs


def _known_columns() -> set[str]:
    return {k for cols in DEFAULT_COLUMNS.values() for k in cols}


def user_columns(text: str | None) -> dict[str, str]:
    return parse_pairs(text, "columns", COLUMN_ALIASES, _known_columns())


def user_tags(text: str | None) -> dict[str, str]:
    return parse_pairs(text, "tags", TAG_ALIASES, set(DEFAULT_TAGS["sharegpt"]))


def make_spec(base: str, stage: str, columns: dict[str, str] | None = None,
              tags: dict[str, str] | None = None) -> Spec:
    cols = dict(DEFAULT_COLUMNS[base])
    cols.update({k: v for k, v in (columns or {}).items() if k in cols})
    return Spec(base, stage, cols, {**DEFAULT_TAGS.get(base, {}), **(tags or {})})


def detect(fmt: str, names: list[str], first: dict | None, columns: dict[str, str],
           tags: dict[str, str], source: str, meta_stage: str | None = None) -> Spec:
    """Choose base format and stage from the source's column names (and its first row).

    `columns` maps our names to the source's (from --columns); `fmt` is the --format choice."""
    present = set(names)
    columns = dict(columns)
    if "messages" not in columns:  # the chat list under either usual name
        for name in ("conversations", "messages"):
            if name in present:
                columns["messages"] = name
                break
    if "label" not in columns and "kto_tag" in present:
        columns["label"] = "kto_tag"
    reverse = {src: ours for ours, src in columns.items()}
    keys = {reverse.get(n, n) for n in names}

    def first_value(ours: str) -> object:
        return first.get(columns.get(ours, ours)) if isinstance(first, dict) else None

    if fmt == "text":
        return make_spec("text", "pt", columns)
    stage = {"pairwise": "pairwise", "kto": "kto"}.get(fmt)
    if fmt in ("alpaca", "sharegpt", "openai"):
        base = fmt
    elif {"prompt", "response"} <= keys and isinstance(first_value("prompt"), list):
        base = "aligned"
    elif "messages" in keys:
        msgs = first_value("messages")
        sample = msgs[0] if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) else {}
        role_tag = tags.get("role")
        if role_tag:
            base = "openai" if role_tag == "role" else "sharegpt"
        else:
            base = "openai" if "role" in sample else "sharegpt"
    elif "instruction" in keys or ("output" in keys and "prompt" not in keys):
        base = "alpaca"
    elif "prompt" in keys and ({"chosen", "rejected"} <= keys or "completion" in keys):
        base = "preference"
    elif "text" in keys:
        return make_spec("text", "pt", columns)
    else:
        raise BadInput(f"{source}: cannot tell the format from its columns ({', '.join(sorted(names)) or 'none'})",
                       "pass --format and, if the names differ, --columns (e.g. --columns instruction=question)")

    if base == "aligned":
        return make_spec(base, stage or meta_stage or _aligned_stage(first), columns)
    if stage is None:
        if {"chosen", "rejected"} <= keys or (base == "alpaca" and isinstance(first_value("output"), list)):
            stage = "pairwise"
        elif "label" in keys:
            stage = "kto"
        else:
            stage = "sft"
    return make_spec(base, stage, columns, tags)


def _aligned_stage(first: dict | None) -> str:
    if not first:
        return "sft"
    if "label" in first and first["label"] is not None:
        return "kto"
    if len(first.get("response") or []) == 2:
        return "pairwise"
    if not first.get("prompt"):
        return "pt"
    return "sft"


def from_dataset_info(info: dict, name: str, where: str) -> tuple[Spec, dict]:
    """A LLaMA-Factory dataset_info.json entry -> (Spec, where the data is).

    The second value is {"file": name} for local data or {"hub": load_dataset kwargs}."""
    if name not in info:
        raise BadInput(f"{where}: no dataset named '{name}'", close_names(name, list(info)))
    entry = info[name]
    if not isinstance(entry, dict):
        raise BadInput(f"{where}: entry '{name}' is not a mapping")
    for key in ("file_name", "hf_hub_url", "formatting", "split", "subset", "folder"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise BadInput(f"{where}: dataset '{name}': '{key}' must be a string, not {type(entry[key]).__name__}",
                           "fix the entry")
    for key in ("columns", "tags"):
        value = entry.get(key)
        if value is not None and not (isinstance(value, dict)
                                      and all(isinstance(v, str) or v is None for v in value.values())):
            raise BadInput(f"{where}: dataset '{name}': '{key}' must map names to column names (strings)",
                           "fix the entry")
    cols: dict[str, str] = dict(entry.get("columns") or {})
    for media in ("videos", "audios"):
        if media in cols:
            raise BadInput(f"{where}: dataset '{name}' has {media}; video and audio are not supported yet",
                           "align a dataset of text and images")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise BadInput(f"{where}: dataset '{name}' has unknown formatting '{formatting}'",
                       "use alpaca, sharegpt or openai")
    ranking = bool(entry.get("ranking"))
    columns = {COLUMN_ALIASES.get(k, k): v for k, v in cols.items() if v}
    if formatting == "alpaca":
        columns = {"instruction": "instruction", "input": "input", "output": "output", **columns}
        if set(cols) == {"prompt"}:  # LLaMA-Factory's pre-training entries: one text column
            spec = make_spec("text", "pt", {"text": cols["prompt"]})
        else:
            stage = "pairwise" if ranking else ("kto" if "label" in columns else "sft")
            spec = make_spec("alpaca", stage, columns)
    else:
        columns = {"messages": "conversations", **columns}
        tags = {TAG_ALIASES.get(k, k): v for k, v in (entry.get("tags") or {}).items()}
        if formatting == "openai":
            tags = {**DEFAULT_TAGS["openai"], **tags}
        stage = "pairwise" if ranking else ("kto" if "label" in columns else "sft")
        spec = make_spec(formatting, stage, columns, tags)
    if entry.get("file_name"):
        return spec, {"file": entry["file_name"]}
    if entry.get("hf_hub_url"):
        hub = {"path": entry["hf_hub_url"], "split": entry.get("split", "train")}
        if entry.get("subset"):
            hub["name"] = entry["subset"]
        if entry.get("folder"):
            hub["data_dir"] = entry["folder"]
        return spec, {"hub": hub}
    raise BadInput(f"{where}: dataset '{name}' has neither file_name nor hf_hub_url",
                   "only local files and Hugging Face Hub datasets are supported")


# ----------------------------------------------------------------------------- converters

Turns = list[Message]
Converted = tuple[Turns, Turns, str, str, bool | None]


def _kind(value: object) -> str:
    return "null" if value is None else {"str": "a string", "list": "a list", "dict": "an object",
                                         "int": "a number", "float": "a number",
                                         "bool": "a boolean"}.get(type(value).__name__, type(value).__name__)


def _text(row: dict, col: str, required: bool = True) -> str:
    value = row.get(col)
    if value is None:
        if required:
            raise RowError(f"missing '{col}'")
        return ""
    if not isinstance(value, str):
        raise RowError(f"'{col}' must be a string, found {_kind(value)}")
    return value


def _label(row: dict, col: str) -> bool:
    value = row.get(col)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if value is None:
        raise RowError(f"missing '{col}' (the KTO label)")
    raise RowError(f"'{col}' must be a boolean, found {_kind(value)}")


def normalize_tools(value: object) -> str:
    """Tool schemas (JSON text or objects) -> a JSON list of {"type": "function", "function": ...}."""
    if value is None or value == "" or value == []:
        return ""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RowError("'tools' is not valid JSON") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError(f"'tools' must be a JSON list of tool schemas, found {_kind(value)}")
    tools = []
    for tool in value:
        if not isinstance(tool, dict):
            raise RowError("'tools' entries must be JSON objects")
        if tool.get("type") == "function" and isinstance(tool.get("function"), dict):
            fn = tool["function"]
        elif "name" in tool:
            fn = tool
        else:
            raise RowError("a tool schema has no 'name'")
        tools.append({"type": "function", "function": fn})
    return json.dumps(tools, ensure_ascii=False) if tools else ""


def _call(obj: object) -> dict:
    """One tool call in any usual shape -> {id, name, arguments (canonical JSON text)}."""
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except ValueError:
            raise RowError("function call content is not valid JSON") from None
    if isinstance(obj, dict) and isinstance(obj.get("function"), dict):  # OpenAI: {id, type, function}
        fn = obj["function"]
        ident = obj.get("id")
    else:
        fn, ident = obj, obj.get("id") if isinstance(obj, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RowError("a function call must be a JSON object with a 'name'")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise RowError("function call arguments are not valid JSON") from None
    if ident is not None and not isinstance(ident, str):
        ident = str(ident)
    return call(fn["name"], args, ident)


def normalize_call(content: object) -> str:
    """Version-1 function-call content -> canonical JSON: {"name", "arguments"} or a list of them."""
    if isinstance(content, str):
        try:
            content = json.loads(content)
        except ValueError:
            raise RowError("function call content is not valid JSON") from None
    if isinstance(content, list):
        if not content:
            raise RowError("empty function call list")
        return json.dumps([_v1(_call(c)) for c in content], ensure_ascii=False)
    return json.dumps(_v1(_call(content)), ensure_ascii=False)


def _v1(c: dict) -> dict:
    return {"name": c["name"], "arguments": json.loads(c["arguments"])}


def calls_of(value: object) -> list[dict]:
    """Tool calls: one call or a list of them (objects or JSON text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RowError("function call content is not valid JSON") from None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RowError("empty function call list")
    return [_call(c) for c in items]


# ----------------------------------------------------------------------------- images

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
            raise RowError(f"{where}: an image must be a path, a data URL or bytes, found {_kind(value)}")
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


def _media_refused(kind: str, where: str) -> RowError:
    return RowError(f"{where}: {kind} content is not supported yet (text and images are)")


# ----------------------------------------------------------------------------- content

class _Content:
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


def _content(value: object, where: str, media_dir: str | None = None,
             images: list | None = None) -> _Content:
    """Content as a string, OpenAI / Hugging Face parts ({"type": "text", "text"}, image_url, image)
    or LLaMA-Factory's parts ({"type": "text" | "reasoning" | "tool_call" | "image", "value"}).
    `images` supplies the row's images for parts that only say {"type": "image"} and for
    `<image>` placeholders in text."""
    out = _Content()
    if value is None:
        return out
    out.present = True
    if isinstance(value, str):
        _text_with_placeholders(value, out, where, media_dir, images)
        return out
    if not isinstance(value, list):
        raise RowError(f"{where}: content must be a string or a list of parts, found {_kind(value)}")
    for part in value:
        if isinstance(part, str):
            _text_with_placeholders(part, out, where, media_dir, images)
            continue
        if not isinstance(part, dict):
            raise RowError(f"{where}: a content part must be an object, found {_kind(part)}")
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
            raise _media_refused(kind.split("_")[-1] if kind.startswith("input_") else kind.split("_")[0], where)
        else:
            raise RowError(f"{where}: unknown content part type {kind!r} "
                           "(text, image, image_url, reasoning and tool_call are read)")
    return out


def _next_image(images: list | None, media_dir: str | None, where: str) -> dict:
    if not images:
        raise RowError(f"{where}: more image placeholders than images in the row")
    return image_part(images.pop(0), media_dir, where)


def _text_with_placeholders(text: str, out: _Content, where: str, media_dir: str | None,
                            images: list | None) -> None:
    pieces = text.split("<image>") if images is not None else [text]
    for i, piece in enumerate(pieces):
        if i:
            out.parts.append(_next_image(images, media_dir, where))
        if piece or len(pieces) == 1:
            out.parts.append({"type": "text", "text": piece, "image": None, "format": None})


def _row_images(row: dict, col: str) -> list | None:
    """The row's images column (LLaMA-Factory `images`, Hugging Face vision datasets), if any."""
    value = row.get(col)
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        value = [value]
    return list(value)


def _leftover_images(turns: Turns, images: list | None, media_dir: str | None, where: str = "images",
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


def _refuse_media_columns(row: dict) -> None:
    for col in ("videos", "audios"):
        if row.get(col):
            raise _media_refused(col[:-1], f"'{col}'")


def converter(spec: Spec) -> Callable[[dict], Converted]:
    return {"alpaca": _alpaca, "sharegpt": _chat, "openai": _chat, "preference": _preference,
            "text": _plain_text, "aligned": _aligned}[spec.base](spec)


def _checked(convert: Callable[[dict], Converted], stage: str) -> Callable[[dict], Converted]:
    def run(row: dict) -> Converted:
        if not isinstance(row, dict):
            raise RowError(f"expected an object, found {_kind(row)}")
        result = convert(row)
        check_turns(result[0], result[1], stage)
        return result
    return run


def _alpaca(spec: Spec) -> Callable[[dict], Converted]:
    c, stage, media = spec.columns, spec.stage, spec.media_dir
    c_ins, c_inp, c_out, c_sys, c_hist = (c["instruction"], c["input"], c["output"], c["system"],
                                          c["history"])

    def user(text: str, images: list | None) -> Message:
        return _content(text, "the prompt", media, images).message(USER)

    def convert(row: dict) -> Converted:
        _refuse_media_columns(row)
        images = _row_images(row, c.get("images", "images"))
        total = len(images or [])
        parts = [p for p in (_text(row, c_ins, required=False), _text(row, c_inp, required=False)) if p]
        if not parts:
            raise RowError(f"empty '{c_ins}'" + (f" and '{c_inp}'" if c_inp in row else ""))
        prompt: Turns = []
        history = row.get(c_hist)
        if history:
            if not isinstance(history, list):
                raise RowError(f"'{c_hist}' must be a list of [query, response] pairs")
            for pair in history:
                if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                        or not all(isinstance(x, str) for x in pair)):
                    raise RowError(f"'{c_hist}' must be a list of [query, response] string pairs")
                prompt += [user(pair[0], images), message(ASSISTANT, pair[1])]
        prompt.append(user("\n".join(parts), images))
        _leftover_images(prompt, images, media, total=total)
        system = _text(row, c_sys, required=False)
        label = None
        if stage == "pairwise":
            if c["chosen"] in row or c["rejected"] in row:
                response = [message(ASSISTANT, _text(row, c["chosen"])),
                            message(ASSISTANT, _text(row, c["rejected"]))]
            else:
                out = row.get(c_out)
                if not (isinstance(out, list) and len(out) == 2 and all(isinstance(x, str) for x in out)):
                    raise RowError(f"pairwise data needs '{c['chosen']}' and '{c['rejected']}' "
                                   f"or '{c_out}' as [chosen, rejected]")
                response = [message(ASSISTANT, out[0]), message(ASSISTANT, out[1])]
        else:
            response = [message(ASSISTANT, _text(row, c_out))]
            if stage == "kto":
                label = _label(row, c["label"])
        return prompt, response, system, "", label

    return _checked(convert, stage)


_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def _chat(spec: Spec) -> Callable[[dict], Converted]:
    """sharegpt, openai, Hugging Face messages and LLaMA-Factory's current messages: a list of
    messages with role tags."""
    c, t, stage, openai, media = spec.columns, spec.tags, spec.stage, spec.base == "openai", spec.media_dir
    role_tag, content_tag = t["role"], t["content"]
    roles = {t["user"]: USER, t["assistant"]: ASSISTANT, t["observation"]: OBSERVATION,
             t["function"]: FUNCTION}
    if openai:
        roles.update({"user": USER, "assistant": ASSISTANT, "tool": OBSERVATION, "function": OBSERVATION,
                      "observation": OBSERVATION, "function_call": FUNCTION})
    system_tags = {t["system"], "system", "developer"} if openai else {t["system"]}

    def convert_message(msg: object, i: int, images: list | None) -> Message:
        where = f"turn {i + 1}"
        if not isinstance(msg, dict):
            raise RowError(f"{where} is not an object")
        tag = msg.get(role_tag)
        if tag not in roles:
            if tag in system_tags:
                raise RowError(f"a system turn at turn {i + 1}; only the first turn may be the system prompt")
            raise RowError(f"unknown role {tag!r} in turn {i + 1}" if tag is not None
                           else f"turn {i + 1} has no '{role_tag}'")
        role = roles[tag]
        value = msg.get(content_tag)
        if role == FUNCTION:  # a turn whose content is the call(s)
            return message(ASSISTANT, None, tool_calls=calls_of(value))
        content = _content(value, where, media, images)
        if role == OBSERVATION:
            if content.calls or content.reasoning or any(p["type"] == "image" for p in content.parts):
                raise RowError(f"{where}: a tool result holds only text")
            ident, name = msg.get("tool_call_id"), msg.get("name")
            return message(TOOL, content.text() or "", tool_call_id=ident if isinstance(ident, str) else None,
                           name=name if isinstance(name, str) else None)
        extra: dict = {}
        if role == ASSISTANT:
            for key in _REASONING_KEYS:
                if isinstance(msg.get(key), str):
                    extra["reasoning"] = msg[key]
                    break
            if msg.get("tool_calls"):
                content.calls += calls_of(msg["tool_calls"])
            elif isinstance(msg.get("function_call"), dict):  # OpenAI's legacy single call
                content.calls += calls_of(msg["function_call"])
            if not content.calls and not content.present:
                raise RowError(f"{where}: missing content")
        elif content.calls or content.reasoning:
            raise RowError(f"{where}: only assistant messages hold reasoning or tool calls")
        elif not content.present:
            raise RowError(f"{where}: missing content")
        return content.message(role if role != OBSERVATION else TOOL, **extra)

    def convert(row: dict) -> Converted:
        _refuse_media_columns(row)
        msgs = row.get(c["messages"])
        if msgs is None:
            raise RowError(f"missing '{c['messages']}'")
        if not isinstance(msgs, list):
            raise RowError(f"'{c['messages']}' must be a list of messages, found {_kind(msgs)}")
        images = _row_images(row, c.get("images", "images"))
        total = len(images or [])
        system = _text(row, c["system"], required=False)
        if msgs and isinstance(msgs[0], dict) and msgs[0].get(role_tag) in system_tags:
            if not system:
                system = _content(msgs[0].get(content_tag), "the system turn").text() or ""
            msgs = msgs[1:]
        turns = [convert_message(msg, i, images) for i, msg in enumerate(msgs)]
        _leftover_images(turns, images, media, total=total)
        tools = normalize_tools(row.get(c["tools"]))
        label = None
        if stage == "pairwise":
            response = [_side(row, c["chosen"], convert_message), _side(row, c["rejected"], convert_message)]
            prompt = turns
        else:
            if not turns:
                raise RowError("no turns")
            prompt, response = turns[:-1], [turns[-1]]
            if stage == "kto":
                label = _label(row, c["label"])
        return prompt, response, system, tools, label

    return _checked(convert, stage)


def _side(row: dict, col: str, convert_message: Callable) -> Message:
    value = row.get(col)
    if value is None:
        raise RowError(f"missing '{col}'")
    if isinstance(value, str):
        return message(ASSISTANT, value)
    if isinstance(value, list):
        if len(value) != 1:
            raise RowError(f"'{col}' must hold one message, found {len(value)}")
        value = value[0]
    return convert_message(value, 0, None)


def _preference(spec: Spec) -> Callable[[dict], Converted]:
    """TRL's dataset shapes: prompt + chosen/rejected, or prompt + completion (+ label)."""
    c, stage = spec.columns, spec.stage
    chat = _chat(make_spec("openai", "sft"))

    def side(value: object, col: str) -> Message:
        if isinstance(value, str):
            return message(ASSISTANT, value)
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
            _, response, _, _, _ = chat({"messages": [{"role": "user", "content": "x"}, value[0]]})
            return response[0]
        if value is None:
            raise RowError(f"missing '{col}'")
        raise RowError(f"'{col}' must be a string or one message")

    def convert(row: dict) -> Converted:
        prompt_value = row.get(c["prompt"])
        system = _text(row, c["system"], required=False)
        if isinstance(prompt_value, str):
            prompt = [message(USER, prompt_value)]
        elif isinstance(prompt_value, list):
            # a message list: reuse the openai conversion with a dummy answer, then drop it
            p, _, s, _, _ = chat({"messages": prompt_value + [{"role": "assistant", "content": "x"}]})
            prompt, system = p, system or s
        else:
            raise RowError(f"'{c['prompt']}' must be a string or a list of messages")
        label = None
        if stage == "pairwise":
            response = [side(row.get(c["chosen"]), c["chosen"]), side(row.get(c["rejected"]), c["rejected"])]
        else:
            response = [side(row.get(c["completion"]), c["completion"])]
            if stage == "kto":
                label = _label(row, c["label"])
        return prompt, response, system, "", label

    return _checked(convert, stage)


def _plain_text(spec: Spec) -> Callable[[dict], Converted]:
    col = spec.columns["text"]

    def convert(row: dict) -> Converted:
        return [], [message(ASSISTANT, _text(row, col))], "", "", None

    return _checked(convert, "pt")


def _aligned(spec: Spec) -> Callable[[dict], Converted]:
    """Aligned rows (version 2, or version 1's (role, content) messages, upgraded)."""
    from lmforge.shared.data.aligned import FIELDS, ROLES, from_v1

    stage = spec.stage

    def turns(value: object, col: str) -> Turns:
        if not isinstance(value, list):
            raise RowError(f"'{col}' must be a list of messages")
        out: Turns = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RowError(f"'{col}' turn {i + 1} must have a role")
            if m["role"] in ROLES:
                msg = {k: m.get(k) for k in FIELDS}
                if msg["content"] is not None and not isinstance(msg["content"], str):
                    raise RowError(f"'{col}' turn {i + 1}: content must be a string or null")
                if msg["tool_calls"]:
                    msg["tool_calls"] = calls_of(msg["tool_calls"])
                if msg["parts"]:
                    msg["parts"] = [p if p.get("type") == "text" else
                                    image_part(p.get("image"), spec.media_dir, f"'{col}' turn {i + 1}")
                                    for p in msg["parts"]]
                out.append(msg)
            else:
                content = m.get("content")
                if not isinstance(content, str):
                    raise RowError(f"'{col}' turn {i + 1}: content must be a string")
                if m["role"] == FUNCTION:
                    content = normalize_call(content)
                out += from_v1([(m["role"], content)])
        return out

    def convert(row: dict) -> Converted:
        label = _label(row, "label") if stage == "kto" else None
        return (turns(row.get("prompt"), "prompt"), turns(row.get("response"), "response"),
                _text(row, "system", required=False), normalize_tools(row.get("tools")), label)

    return _checked(convert, stage)
