"""Converters: each source format's rows -> aligned (prompt, response, system, tools, label).

`converter(spec)` returns a function that converts one row and raises RowError for a bad one.
"""

from __future__ import annotations

from typing import Callable

from lmforge.shared.data.aligned import (
    ASSISTANT,
    FUNCTION,
    OBSERVATION,
    TOOL,
    USER,
    Message,
    RowError,
    check_turns,
    message,
)
from lmforge.shared.data.formats import Spec, make_spec
from lmforge.shared.data.image_parts import image_part
from lmforge.shared.data.message_content import leftover_images, read_content, refuse_media_columns, row_images
from lmforge.shared.data.row_values import calls_of, kind_of, label_of, normalize_call, normalize_tools, text_of

Turns = list[Message]
Converted = tuple[Turns, Turns, str, str, bool | None]


def converter(spec: Spec) -> Callable[[dict], Converted]:
    return {"alpaca": _alpaca, "sharegpt": _chat, "openai": _chat, "preference": _preference,
            "text": _plain_text, "aligned": _aligned}[spec.base](spec)


def _checked(convert: Callable[[dict], Converted], stage: str) -> Callable[[dict], Converted]:
    def run(row: dict) -> Converted:
        if not isinstance(row, dict):
            raise RowError(f"expected an object, found {kind_of(row)}")
        result = convert(row)
        check_turns(result[0], result[1], stage)
        return result
    return run


def _alpaca(spec: Spec) -> Callable[[dict], Converted]:
    c, stage, media = spec.columns, spec.stage, spec.media_dir
    c_ins, c_inp, c_out, c_sys, c_hist = (c["instruction"], c["input"], c["output"], c["system"],
                                          c["history"])

    def user(text: str, images: list | None) -> Message:
        return read_content(text, "the prompt", media, images).message(USER)

    def convert(row: dict) -> Converted:
        refuse_media_columns(row)
        images = row_images(row, c.get("images", "images"))
        total = len(images or [])
        parts = [p for p in (text_of(row, c_ins, required=False), text_of(row, c_inp, required=False)) if p]
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
        leftover_images(prompt, images, media, total=total)
        system = text_of(row, c_sys, required=False)
        label = None
        if stage == "pairwise":
            if c["chosen"] in row or c["rejected"] in row:
                response = [message(ASSISTANT, text_of(row, c["chosen"])),
                            message(ASSISTANT, text_of(row, c["rejected"]))]
            else:
                out = row.get(c_out)
                if not (isinstance(out, list) and len(out) == 2 and all(isinstance(x, str) for x in out)):
                    raise RowError(f"pairwise data needs '{c['chosen']}' and '{c['rejected']}' "
                                   f"or '{c_out}' as [chosen, rejected]")
                response = [message(ASSISTANT, out[0]), message(ASSISTANT, out[1])]
        else:
            response = [message(ASSISTANT, text_of(row, c_out))]
            if stage == "kto":
                label = label_of(row, c["label"])
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
        content = read_content(value, where, media, images)
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
        refuse_media_columns(row)
        msgs = row.get(c["messages"])
        if msgs is None and stage == "pairwise":
            msgs, row = _shared_prompt(row, c["chosen"], c["rejected"], role_tag)
        if msgs is None:
            raise RowError(f"missing '{c['messages']}'")
        if not isinstance(msgs, list):
            raise RowError(f"'{c['messages']}' must be a list of messages, found {kind_of(msgs)}")
        images = row_images(row, c.get("images", "images"))
        total = len(images or [])
        system = text_of(row, c["system"], required=False)
        if msgs and isinstance(msgs[0], dict) and msgs[0].get(role_tag) in system_tags:
            if not system:
                system = read_content(msgs[0].get(content_tag), "the system turn").text() or ""
            msgs = msgs[1:]
        turns = [convert_message(msg, i, images) for i, msg in enumerate(msgs)]
        leftover_images(turns, images, media, total=total)
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
                label = label_of(row, c["label"])
        return prompt, response, system, tools, label

    return _checked(convert, stage)


def _shared_prompt(row: dict, chosen: str, rejected: str, role_tag: str) -> tuple[list | None, dict]:
    """Two whole conversations (LLaMA-Factory v1's chosen_messages / rejected_messages): the turns
    they share are the prompt, their last (assistant) turns the two answers."""
    a, b = row.get(chosen), row.get(rejected)
    if not (isinstance(a, list) and isinstance(b, list) and len(a) > 1 and len(b) > 1):
        return None, row
    strip = [{k: v for k, v in m.items() if k != "loss_weight"} if isinstance(m, dict) else m for m in a[:-1]]
    other = [{k: v for k, v in m.items() if k != "loss_weight"} if isinstance(m, dict) else m for m in b[:-1]]
    if strip != other:
        raise RowError(f"'{chosen}' and '{rejected}' differ before their last turn: the prompt must be shared")
    for side in (a[-1], b[-1]):
        if not isinstance(side, dict) or side.get(role_tag) not in ("assistant", "gpt"):
            raise RowError(f"'{chosen}' and '{rejected}' must each end with the assistant's answer")
    return strip, {**row, chosen: [a[-1]], rejected: [b[-1]]}


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
        system = text_of(row, c["system"], required=False)
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
                label = label_of(row, c["label"])
        return prompt, response, system, "", label

    return _checked(convert, stage)


def _plain_text(spec: Spec) -> Callable[[dict], Converted]:
    col = spec.columns["text"]

    def convert(row: dict) -> Converted:
        return [], [message(ASSISTANT, text_of(row, col))], "", "", None

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
        label = label_of(row, "label") if stage == "kto" else None
        return (turns(row.get("prompt"), "prompt"), turns(row.get("response"), "response"),
                text_of(row, "system", required=False), normalize_tools(row.get("tools")), label)

    return _checked(convert, stage)
