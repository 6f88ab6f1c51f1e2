"""A model's turn read with its template, and what follows it written with the same template.

Reading: the turn's text is split into reasoning (thinking templates), content and tool calls by
`templates.parse_calls`, the parser `serve` uses, for the template's tool style. Text that tries to
call a tool and fails (a `<tool_call>` block that is not JSON, an answer that opens with `{` but
is not a call) is a malformed call: the model is told so, and it is counted.

Writing: tool results and observations become token ids appended after the model's own tokens.
They are the text the template puts between the end of an assistant turn and the start of the
next one (the turn's closing glue, the tool or user turn, the next assistant header), found by
rendering a stand-in conversation that ends with this turn and its results: the ids are then
exactly those that tokenizing the whole conversation gives, turn after turn (the model's turns
are kept as it sampled them). As in `data pack` and `serve`, spaces that end the next assistant
header are left for the model to write (the rollout strips them before tokenizing).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from lmforge.shared.core.errors import BadInput
from lmforge.shared.data import templates
from lmforge.shared.data.aligned import ASSISTANT, TOOL, USER, call, message


def tool_style(renderer) -> str | None:
    """The tool-call format of a renderer: a named template's own; `auto` (the model's Jinja
    template) reads Hermes-style <tool_call> blocks, as `serve` does."""
    tpl = getattr(renderer, "tpl", None)
    if tpl is not None:
        return tpl.tool_style
    return "qwen" if getattr(renderer, "supports_calls", False) else None


@dataclass
class Reply:
    text: str                 # the turn as written (without its end-of-turn token)
    reasoning: str | None
    content: str              # the text without its tool calls
    calls: list[dict]         # [{"name", "arguments"}]
    malformed: str | None = None   # why an attempted tool call could not be read


_EXAMPLE = {"qwen": '<tool_call>\n{"name": NAME, "arguments": {...}}\n</tool_call>',
            "llama3": '{"name": NAME, "parameters": {...}}',
            "mistral": '[TOOL_CALLS] [{"name": NAME, "arguments": {...}}]',
            "default": '{"name": NAME, "arguments": {...}}'}


def _json_problem(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"not valid JSON ({str(exc).split(':')[0]})"
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return 'a call is a JSON object with a "name" and its "arguments"'
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                json.loads(args)
            except ValueError:
                return "its arguments are text that is not JSON"
    return "it could not be read as a call"


def attempted(style: str | None, answer: str) -> str | None:
    """Why `answer`, which holds no well-formed call, looks like a failed attempt at one; None when
    it is plain text."""
    if style == "qwen":
        if "<tool_call>" not in answer:
            return None
        blocks = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", answer, re.S)
        if answer.count("<tool_call>") != answer.count("</tool_call>"):
            return "a <tool_call> block is not closed with </tool_call>"
        for block in blocks:
            problem = _json_problem(block.strip())
            if problem != "it could not be read as a call":
                return problem
        return "it could not be read as a call"
    if style == "mistral":
        if "[TOOL_CALLS]" not in answer:
            return None
        return _json_problem(answer.partition("[TOOL_CALLS]")[2].strip())
    if style in ("llama3", "default"):
        body = answer.strip()
        return _json_problem(body) if body.startswith("{") else None
    return None


def read_reply(renderer, text: str, *, opened: bool = False, tools: bool = True) -> Reply:
    """A turn's text -> Reply. `opened`: the context ended inside a think block; `tools`: the
    episode has tools (without any, nothing is read as a call)."""
    reasoning, answer = renderer.split_reasoning(text, opened) if getattr(renderer, "thinking", False) \
        else (None, text)
    if not tools:
        return Reply(text, reasoning, answer, [])
    style = tool_style(renderer)
    content, calls = templates.parse_calls(style, answer)
    if calls:
        return Reply(text, reasoning, content, calls)
    problem = attempted(style, answer)
    return Reply(text, reasoning, answer, [], problem)


def malformed_message(style: str | None, problem: str) -> str:
    return (f"error: the tool call could not be read: {problem}. "
            f"Write a call as {_EXAMPLE.get(style or 'default', _EXAMPLE['default'])}")


class Writer:
    """Token ids of what follows a model's turn: tool results, an observation; and of a prompt
    built from an environment's first observation."""

    def __init__(self, renderer, tokenizer):
        self.renderer, self.tokenizer = renderer, tokenizer
        self.jinja = getattr(renderer, "tpl", None) is None
        self.style = tool_style(renderer)

    def _assistant(self, reply: Reply) -> dict:
        calls = [call(c["name"], c["arguments"]) for c in reply.calls]
        return message(ASSISTANT, reply.content if reply.content.strip() or not calls else None,
                       tool_calls=calls or None)

    def _after(self, reply: Reply, following: list[dict], tools_json: str) -> str:
        """The text between the end of the model's turn and the model's next output."""
        messages = [message(USER, "x"), self._assistant(reply), *following]
        tools = tools_json if self.jinja else ""   # named templates: tools only shape the prompt's head
        try:
            whole = self.renderer.conversation(messages, "", tools)
            head = self.renderer.generation_prompt(messages, "", tools)
        except BadInput as exc:
            raise BadInput(f"the template cannot write this turn's follow-up: {exc.message}", exc.hint) from None
        end = whole.spans[-1][1] if whole.spans else -1
        if end < 0 or head[:end] != whole.text[:end]:
            raise BadInput(f"the template '{getattr(self.renderer, 'name', 'auto')}' writes a conversation "
                           "differently from its beginning, so turns cannot be appended",
                           "use a named template (--template NAME) when packing the prompts")
        return head[end:]

    def ids_after(self, text: str, end_token: str | None) -> list[int]:
        """Tokens of `text` as they come after the end-of-turn token `end_token` (tokenized
        together, so a tokenizer that treats the start of a text specially does not here)."""
        encode = self.tokenizer
        if end_token:
            marker = encode(end_token, add_special_tokens=False).input_ids
            both = encode(end_token + text, add_special_tokens=False).input_ids
            if marker and both[:len(marker)] == marker:
                return both[len(marker):]
        return encode(text, add_special_tokens=False).input_ids

    def results_text(self, reply: Reply, results: list[tuple[str, str]], tools_json: str = "") -> str:
        following = [message(TOOL, text, name=name) for name, text in results]
        return self._after(reply, following, tools_json)

    def error_text(self, reply: Reply, error: str, tools_json: str = "") -> str:
        """A malformed call's error, as a user turn: there is no call for a tool result to answer
        (lmforge's conversations, like most templates, have a tool turn only after a call)."""
        return self._after(reply, [message(USER, error)], tools_json)

    def observation_text(self, reply: Reply, observation: str, tools_json: str = "") -> str:
        return self._after(reply, [message(USER, observation)], tools_json)

    def prompt_ids(self, observation: str, system: str = "", tools_json: str = "") -> tuple[list[int], str]:
        """A prompt of one user turn (an environment's first observation) -> (ids, text)."""
        from lmforge.shared.model.generation import encode_chat_prompt

        try:
            text = self.renderer.generation_prompt([message(USER, observation)], system, tools_json)
        except BadInput as exc:
            raise BadInput(f"the template cannot write the environment's first observation: {exc.message}",
                           exc.hint) from None
        ids, spaces = encode_chat_prompt(self.tokenizer, text)
        return ids, text[:len(text) - len(spaces)]
