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
    USER,
    RowError,
    check_turns,
)

FORMATS = ("auto", "alpaca", "sharegpt", "openai", "pairwise", "kto", "text")

DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "system": "system",
               "history": "history", "chosen": "chosen", "rejected": "rejected", "label": "label"},
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools",
                 "chosen": "chosen", "rejected": "rejected", "label": "label"},
    "openai": {"messages": "messages", "system": "system", "tools": "tools",
               "chosen": "chosen", "rejected": "rejected", "label": "label"},
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
    cols: dict[str, str] = dict(entry.get("columns") or {})
    for media in ("images", "videos", "audios"):
        if media in cols:
            raise BadInput(f"{where}: dataset '{name}' has {media}; multimodal data is not supported",
                           "align a text-only dataset")
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

Turns = list[tuple[str, str]]
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
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise RowError("a function call must be a JSON object with a 'name'")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise RowError("function call arguments are not valid JSON") from None
    return {"name": obj["name"], "arguments": args}


def normalize_call(content: object) -> str:
    """A function-call turn's content -> canonical JSON: {"name", "arguments"} or a list of them."""
    if isinstance(content, str):
        try:
            content = json.loads(content)
        except ValueError:
            raise RowError("function call content is not valid JSON") from None
    if isinstance(content, list):
        if not content:
            raise RowError("empty function call list")
        return json.dumps([_call(c) for c in content], ensure_ascii=False)
    return json.dumps(_call(content), ensure_ascii=False)


def _content(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        texts = []
        for part in value:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise RowError(f"{where}: only text content parts are supported")
        return "".join(texts)
    if value is None:
        raise RowError(f"{where}: missing content")
    raise RowError(f"{where}: content must be a string, found {_kind(value)}")


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
    c, stage = spec.columns, spec.stage
    c_ins, c_inp, c_out, c_sys, c_hist = (c["instruction"], c["input"], c["output"], c["system"],
                                          c["history"])

    def convert(row: dict) -> Converted:
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
                prompt += [(USER, pair[0]), (ASSISTANT, pair[1])]
        prompt.append((USER, "\n".join(parts)))
        system = _text(row, c_sys, required=False)
        label = None
        if stage == "pairwise":
            if c["chosen"] in row or c["rejected"] in row:
                response = [(ASSISTANT, _text(row, c["chosen"])), (ASSISTANT, _text(row, c["rejected"]))]
            else:
                out = row.get(c_out)
                if not (isinstance(out, list) and len(out) == 2 and all(isinstance(x, str) for x in out)):
                    raise RowError(f"pairwise data needs '{c['chosen']}' and '{c['rejected']}' "
                                   f"or '{c_out}' as [chosen, rejected]")
                response = [(ASSISTANT, out[0]), (ASSISTANT, out[1])]
        else:
            response = [(ASSISTANT, _text(row, c_out))]
            if stage == "kto":
                label = _label(row, c["label"])
        return prompt, response, system, "", label

    return _checked(convert, stage)


def _chat(spec: Spec) -> Callable[[dict], Converted]:
    """sharegpt and openai: a list of messages with role tags."""
    c, t, stage, openai = spec.columns, spec.tags, spec.stage, spec.base == "openai"
    role_tag, content_tag = t["role"], t["content"]
    roles = {t["user"]: USER, t["assistant"]: ASSISTANT, t["observation"]: OBSERVATION,
             t["function"]: FUNCTION}
    if openai:
        roles.update({"user": USER, "assistant": ASSISTANT, "tool": OBSERVATION, "function": OBSERVATION})
    system_tag = t["system"]

    def message(msg: object, i: int) -> tuple[str, str]:
        if not isinstance(msg, dict):
            raise RowError(f"turn {i + 1} is not an object")
        tag = msg.get(role_tag)
        if tag not in roles:
            if tag == system_tag:
                raise RowError(f"a system turn at turn {i + 1}; only the first turn may be the system prompt")
            raise RowError(f"unknown role {tag!r} in turn {i + 1}" if tag is not None
                           else f"turn {i + 1} has no '{role_tag}'")
        role = roles[tag]
        if openai and role == ASSISTANT and msg.get("tool_calls"):
            text = msg.get(content_tag)
            if text and _content(text, f"turn {i + 1}").strip():
                raise RowError(f"turn {i + 1}: an assistant message with both text and tool_calls "
                               "is not supported")
            calls = [call.get("function", call) if isinstance(call, dict) else call
                     for call in msg["tool_calls"]]
            return FUNCTION, normalize_call(calls if len(calls) > 1 else calls[0])
        value = msg.get(content_tag)
        if role == FUNCTION:
            return FUNCTION, normalize_call(value)
        return role, _content(value, f"turn {i + 1}")

    def convert(row: dict) -> Converted:
        msgs = row.get(c["messages"])
        if msgs is None:
            raise RowError(f"missing '{c['messages']}'")
        if not isinstance(msgs, list):
            raise RowError(f"'{c['messages']}' must be a list of messages, found {_kind(msgs)}")
        system = _text(row, c["system"], required=False)
        if msgs and isinstance(msgs[0], dict) and msgs[0].get(role_tag) == system_tag:
            if not system:
                system = _content(msgs[0].get(content_tag), "the system turn")
            msgs = msgs[1:]
        turns: Turns = []
        for i, msg in enumerate(msgs):
            role, content = message(msg, i)
            if role == OBSERVATION and turns and turns[-1][0] == OBSERVATION:
                # parallel tool results: keep them together as a JSON list
                prev = turns[-1][1]
                merged = json.loads(prev) if prev.startswith("[") and _is_json_list(prev) else [prev]
                turns[-1] = (OBSERVATION, json.dumps(merged + [content], ensure_ascii=False))
                continue
            turns.append((role, content))
        tools = normalize_tools(row.get(c["tools"]))
        label = None
        if stage == "pairwise":
            response = [_side(row, c["chosen"], message), _side(row, c["rejected"], message)]
            prompt = turns
        else:
            if not turns:
                raise RowError("no turns")
            prompt, response = turns[:-1], [turns[-1]]
            if stage == "kto":
                label = _label(row, c["label"])
        return prompt, response, system, tools, label

    return _checked(convert, stage)


def _is_json_list(text: str) -> bool:
    try:
        return isinstance(json.loads(text), list)
    except ValueError:
        return False


def _side(row: dict, col: str, message: Callable) -> tuple[str, str]:
    value = row.get(col)
    if value is None:
        raise RowError(f"missing '{col}'")
    if isinstance(value, str):
        return ASSISTANT, value
    if isinstance(value, list):
        if len(value) != 1:
            raise RowError(f"'{col}' must hold one message, found {len(value)}")
        value = value[0]
    return message(value, 0)


def _preference(spec: Spec) -> Callable[[dict], Converted]:
    """TRL's dataset shapes: prompt + chosen/rejected, or prompt + completion (+ label)."""
    c, stage = spec.columns, spec.stage
    chat = _chat(make_spec("openai", "sft"))

    def side(value: object, col: str) -> tuple[str, str]:
        if isinstance(value, str):
            return ASSISTANT, value
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
            return ASSISTANT, _content(value[0].get("content"), f"'{col}'")
        if value is None:
            raise RowError(f"missing '{col}'")
        raise RowError(f"'{col}' must be a string or one message")

    def convert(row: dict) -> Converted:
        prompt_value = row.get(c["prompt"])
        system = _text(row, c["system"], required=False)
        if isinstance(prompt_value, str):
            prompt = [(USER, prompt_value)]
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
        return [], [(ASSISTANT, _text(row, col))], "", "", None

    return _checked(convert, "pt")


def _aligned(spec: Spec) -> Callable[[dict], Converted]:
    stage = spec.stage

    def turns(value: object, col: str) -> Turns:
        if not isinstance(value, list):
            raise RowError(f"'{col}' must be a list of messages")
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RowError(f"'{col}' turn {i + 1} must have a role")
            out.append((m["role"], _content(m.get("content"), f"'{col}' turn {i + 1}")))
        return out

    def convert(row: dict) -> Converted:
        label = _label(row, "label") if stage == "kto" else None
        return (turns(row.get("prompt"), "prompt"), turns(row.get("response"), "response"),
                _text(row, "system", required=False), normalize_tools(row.get("tools")), label)

    return _checked(convert, stage)
