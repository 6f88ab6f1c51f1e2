"""The aligned schema (version 2): every source format becomes these columns, one row per example.

    prompt    list<message>   the messages before the answer
    response  list<message>   sft/kto: one assistant message; pairwise: [chosen, rejected];
                              pt: the text (one message)
    system    string          "" when none
    tools     string          JSON list of OpenAI-style tool schemas, "" when none
    label     bool            KTO only: is the response desirable

A message carries what OpenAI / Hugging Face chat messages carry:

    role          user | assistant | tool
    content       the text; null = no content (an assistant message with only tool calls),
                  "" = empty text (the two differ for some chat templates)
    parts         null for plain text; else the content as ordered parts (text and images):
                  {type: "text", text} or {type: "image", image: bytes, format: "png"|"jpeg"|...}
                  (images live in the row, so a file stays self-contained); content is then the
                  concatenated text
    reasoning     the thinking before the answer, null when none
    tool_calls    assistant: [{id, name, arguments (JSON text)}], null when none
    tool_call_id  tool: the id of the call this result answers (null when the data had none)
    name          tool: the name of the tool that answered (null when unknown)

Order: the prompt starts with a user message; an assistant message follows a user or tool
message; a tool message follows an assistant message with tool calls (or another tool message);
a user message follows an assistant or tool message. The prompt ends with a user or tool message.

Version 1 (roles user/assistant/function_call/observation, one string per message) is upgraded
on read (`upgrade`); the version is `schema_version` in the dataset's lmforge metadata.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import pyarrow as pa

from lmforge.shared.data.roles import ASSISTANT, FUNCTION, OBSERVATION, ROLES, TOOL, USER  # noqa: F401

VERSION = 2
IMAGE_FORMATS = ("png", "jpeg", "gif", "webp", "bmp", "tiff")
PART = pa.struct([("type", pa.string()), ("text", pa.string()), ("image", pa.binary()),
                  ("format", pa.string())])
CALL = pa.struct([("id", pa.string()), ("name", pa.string()), ("arguments", pa.string())])
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string()), ("parts", pa.list_(PART)),
                     ("reasoning", pa.string()), ("tool_calls", pa.list_(CALL)),
                     ("tool_call_id", pa.string()), ("name", pa.string())])
MESSAGES = pa.list_(MESSAGE)
STAGES = ("sft", "pairwise", "kto", "pt")
FIELDS = tuple(f.name for f in MESSAGE)
Message = dict[str, Any]


def schema(stage: str) -> pa.Schema:
    fields = [("prompt", MESSAGES), ("response", MESSAGES), ("system", pa.string()),
              ("tools", pa.string())]
    if stage == "kto":
        fields.append(("label", pa.bool_()))
    return pa.schema(fields)


class RowError(ValueError):
    """A row that cannot be aligned; the message is the reason (the caller adds where)."""


def message(role: str, content: str | None = None, *, parts: list[dict] | None = None,
            reasoning: str | None = None, tool_calls: list[dict] | None = None,
            tool_call_id: str | None = None, name: str | None = None) -> Message:
    """A message with every field present (None where absent)."""
    return {"role": role, "content": content, "parts": parts, "reasoning": reasoning,
            "tool_calls": tool_calls or None, "tool_call_id": tool_call_id, "name": name}


def call(name: str, arguments: object, id: str | None = None) -> dict:
    """A tool call; arguments are kept as canonical JSON text."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": id, "name": name, "arguments": text}


def has_images(m: Message) -> bool:
    return any(p.get("type") == "image" for p in m.get("parts") or [])


def _nonempty(m: Message) -> bool:
    return bool((m.get("content") or "").strip() or m.get("tool_calls") or has_images(m)
                or (m.get("reasoning") or "").strip())


def check_turns(prompt: list[Message], response: list[Message], stage: str) -> None:
    """Raise RowError unless the conversation has the shape the stage needs."""
    if stage == "pt":
        if len(response) != 1 or not (response[0].get("content") or "").strip():
            raise RowError("empty text")
        return
    if not prompt:
        raise RowError("no prompt turn")
    calls: set[str] = set()
    prev = None
    for i, m in enumerate(prompt):
        role = m["role"]
        if role not in ROLES:
            raise RowError(f"unknown role '{role}' in turn {i + 1}")
        # a tool result may also follow an assistant turn whose call is written in its text (as in
        # LLaMA-Factory's glaive data, which LLaMA-Factory trains as it is): never a user turn
        allowed = {None: (USER,), USER: (ASSISTANT,), ASSISTANT: (USER, TOOL),
                   TOOL: (TOOL, ASSISTANT, USER)}[prev]
        if role not in allowed:
            if role == TOOL:
                raise RowError(f"wrong turn order: tool result at turn {i + 1} does not follow an assistant turn")
            raise RowError(f"wrong turn order: turn {i + 1} is '{role}' after '{prev or 'nothing'}'")
        if role == ASSISTANT:
            calls = {c["id"] for c in m.get("tool_calls") or [] if c.get("id")} | (
                {""} if m.get("tool_calls") else set())
        if role == TOOL and m.get("tool_call_id") and calls - {""} and m["tool_call_id"] not in calls:
            raise RowError(f"turn {i + 1}: tool result for call id '{m['tool_call_id']}', "
                           "which no preceding tool call has")
        if role != TOOL and not _nonempty(m):
            raise RowError(f"empty content in turn {i + 1} ({role})")
        prev = role
    if prompt[-1]["role"] == ASSISTANT:
        raise RowError("wrong turn order: the prompt must end with a user or tool turn")
    wanted = 2 if stage == "pairwise" else 1
    if len(response) != wanted:
        raise RowError(f"expected {wanted} response message(s), found {len(response)}")
    for m in response:
        if m["role"] != ASSISTANT:
            raise RowError(f"wrong turn order: the response is '{m['role']}', expected assistant")
        if not _nonempty(m):
            raise RowError("empty response" if stage != "pairwise" else "empty chosen or rejected response")


class Builder:
    """Collects aligned rows and emits record batches."""

    def __init__(self, stage: str):
        self.stage = stage
        self.schema = schema(stage)
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self._rows: dict[str, list] = {name: [] for name in self.schema.names}

    def add(self, prompt: list[Message], response: list[Message],
            system: str = "", tools: str = "", label: bool | None = None) -> None:
        """Add a row; messages are dicts (version-1 (role, content) pairs are upgraded)."""
        for name, messages in (("prompt", prompt), ("response", response)):
            if messages and not isinstance(messages[0], dict):
                messages = from_v1(list(messages))
            self._rows[name].append([full(m) for m in messages])
        self._rows["system"].append(system)
        self._rows["tools"].append(tools)
        if self.stage == "kto":
            # kto rows always carry a label (row_values.label_of refuses a missing one)
            self._rows["label"].append(label)
        self.n += 1

    def flush(self) -> pa.RecordBatch:
        arrays = [pa.array(self._rows[f.name], type=f.type) for f in self.schema]
        batch = pa.record_batch(arrays, schema=self.schema)
        self._reset()
        return batch


def full(m: Message) -> Message:
    """A message with exactly the schema's fields."""
    return {k: m.get(k) for k in FIELDS}


def turns_of(messages: list[dict] | None) -> list[Message]:
    """Aligned message structs (as read back by pyarrow) -> message dicts."""
    return [full(m) for m in messages or []]


# ----------------------------------------------------------------------------- version 1

def from_v1(turns: list[tuple[str, str]]) -> list[Message]:
    """Version-1 (role, content) turns -> version-2 messages.

    function_call -> an assistant message with tool calls (no content, no ids); observation ->
    tool messages (a JSON list of strings was version 1's way of writing parallel results)."""
    out: list[Message] = []
    for role, content in turns:
        if role == FUNCTION:
            value = json.loads(content)
            calls = value if isinstance(value, list) else [value]
            out.append(message(ASSISTANT, None, tool_calls=[call(c["name"], c.get("arguments", {}))
                                                             for c in calls]))
        elif role == OBSERVATION:
            results = [content]
            if content.startswith("["):
                try:
                    value = json.loads(content)
                    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                        results = value
                except ValueError:
                    pass
            out += [message(TOOL, r) for r in results]
        else:
            out.append(message(role, content))
    return out


def version_of(meta: dict, schema_: pa.Schema) -> int:
    if "schema_version" in meta:
        return int(meta["schema_version"])
    if "prompt" in schema_.names:
        t = schema_.field("prompt").type
        if pa.types.is_list(t) and pa.types.is_struct(t.value_type) and t.value_type.get_field_index("tool_calls") >= 0:
            return VERSION
    return 1


def upgrade(batch: pa.RecordBatch, stage: str) -> pa.RecordBatch:
    """A version-1 aligned batch -> version 2."""
    rows = batch.to_pylist()
    builder = Builder(stage)
    for r in rows:
        builder.add(from_v1([(m["role"], m["content"]) for m in r["prompt"] or []]),
                    from_v1([(m["role"], m["content"]) for m in r["response"] or []]),
                    r.get("system") or "", r.get("tools") or "", r.get("label"))
    return builder.flush()


def batches(source) -> Iterator[pa.RecordBatch]:
    """An aligned ArrowSource's batches in version 2: version-1 data is upgraded on the fly; data
    from a newer version is refused."""
    from lmforge.shared.core.errors import BadInput

    version = version_of(source.meta, source.schema)
    if version > VERSION:
        raise BadInput(f"{source.name}: aligned with schema version {version}, this lmforge reads "
                       f"up to {VERSION}", "upgrade lmforge or re-run `lmforge data align`")
    stage = source.meta.get("stage") or "sft"
    for batch in source.batches():
        if version == VERSION:
            yield batch
            continue
        try:
            yield upgrade(batch, stage)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise BadInput(f"{source.name}: aligned data of schema version 1 that cannot be upgraded",
                           "re-run `lmforge data align` on the source data") from None
