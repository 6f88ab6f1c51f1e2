"""The aligned schema: every source format becomes these columns, one row per example.

    prompt    list<struct<role, content>>  the turns before the answer
    response  list<struct<role, content>>  sft/kto: one message; pairwise: [chosen, rejected];
                                           pt: the text (one message)
    system    string                       "" when none
    tools     string                       JSON list of OpenAI-style tool schemas, "" when none
    label     bool                         KTO only: is the response desirable

Roles: user, assistant, function_call (content: JSON {"name", "arguments"} or a list of them),
observation (a tool's result). Prompt turns alternate: user or observation on even positions,
assistant or function_call on odd ones; the prompt ends on the user side.
"""

from __future__ import annotations

from typing import cast

import pyarrow as pa
from lmforge.shared.core import columns

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)
USER, ASSISTANT, FUNCTION, OBSERVATION = "user", "assistant", "function_call", "observation"
USER_SIDE = (USER, OBSERVATION)
ASSISTANT_SIDE = (ASSISTANT, FUNCTION)
STAGES = ("sft", "pairwise", "kto", "pt")


def schema(stage: str) -> pa.Schema:
    fields = [("prompt", MESSAGES), ("response", MESSAGES), ("system", pa.string()),
              ("tools", pa.string())]
    if stage == "kto":
        fields.append(("label", pa.bool_()))
    return pa.schema(fields)


class RowError(ValueError):
    """A row that cannot be aligned; the message is the reason (the caller adds where)."""


def check_turns(prompt: list[tuple[str, str]], response: list[tuple[str, str]], stage: str) -> None:
    """Raise RowError unless the conversation has the shape the stage needs."""
    if stage == "pt":
        if len(response) != 1 or not response[0][1].strip():
            raise RowError("empty text")
        return
    if not prompt:
        raise RowError("no prompt turn")
    for i, (role, content) in enumerate(prompt):
        if role not in (USER_SIDE if i % 2 == 0 else ASSISTANT_SIDE):
            side = "user or observation" if i % 2 == 0 else "assistant or function_call"
            raise RowError(f"wrong turn order: turn {i + 1} is '{role}', expected {side}")
        if role == OBSERVATION and (i == 0 or prompt[i - 1][0] != FUNCTION):
            raise RowError(f"wrong turn order: observation at turn {i + 1} does not follow a function call")
        if not content.strip():
            raise RowError(f"empty content in turn {i + 1} ({role})")
    if len(prompt) % 2 == 0:
        raise RowError("wrong turn order: the prompt must end with a user or observation turn")
    wanted = 2 if stage == "pairwise" else 1
    if len(response) != wanted:
        raise RowError(f"expected {wanted} response message(s), found {len(response)}")
    for role, content in response:
        if role not in ASSISTANT_SIDE:
            raise RowError(f"wrong turn order: the response is '{role}', expected assistant or function_call")
        if not content.strip():
            raise RowError("empty response" if stage != "pairwise" else "empty chosen or rejected response")


class Builder:
    """Collects aligned rows column by column and emits record batches (much faster than
    building Python dicts and converting them)."""

    def __init__(self, stage: str):
        self.stage = stage
        self.schema = schema(stage)
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self._cols: dict[str, tuple[list[int], list[str], list[str]]] = {
            name: ([0], [], []) for name in ("prompt", "response")}  # offsets, roles, contents
        self._system: list[str] = []
        self._tools: list[str] = []
        self._label: list[bool | None] = []

    def add(self, prompt: list[tuple[str, str]], response: list[tuple[str, str]],
            system: str = "", tools: str = "", label: bool | None = None) -> None:
        for name, turns in (("prompt", prompt), ("response", response)):
            offsets, roles, contents = self._cols[name]
            for role, content in turns:
                roles.append(role)
                contents.append(content)
            offsets.append(len(roles))
        self._system.append(system)
        self._tools.append(tools)
        self._label.append(label)
        self.n += 1

    def flush(self) -> pa.RecordBatch:
        arrays = []
        for name in ("prompt", "response"):
            offsets, roles, contents = self._cols[name]
            values = pa.StructArray.from_arrays([columns.strings(roles), columns.strings(contents)],
                                                fields=list(MESSAGE))
            arrays.append(columns.lists(offsets, values, MESSAGES))
        arrays += [columns.strings(self._system), columns.strings(self._tools)]
        if self.stage == "kto":
            # kto rows always carry a label (formats._label refuses a missing one)
            arrays.append(columns.bools(cast("list[bool]", self._label)))
        batch = pa.record_batch(arrays, schema=self.schema)
        self._reset()
        return batch


def turns_of(messages: list[dict] | None) -> list[tuple[str, str]]:
    """Aligned message structs (as read back by pyarrow) -> (role, content) pairs."""
    return [(m["role"], m["content"]) for m in messages or []]
