"""`--template auto`: the tokenizer's own Jinja chat template, and conversations as the Hugging
Face chat messages such templates read."""

from __future__ import annotations

import json
from typing import Any

from lmforge.shared.core.errors import BadInput
from lmforge.shared.data.roles import ASSISTANT, USER
from lmforge.shared.data.reasoning import Reasoning, split_generated
from lmforge.shared.data.rendering import Rendered, mask_empty_think, messages_of, refuse_images


def to_messages(turns, system: str = "", null_content: str | None = None,
                reasoning: "Reasoning | None" = None, args_as_text: bool = False) -> list[dict]:
    """Aligned messages -> OpenAI / Hugging Face chat messages, as chat templates read them:
    reasoning as `reasoning_content`, tool calls as {id, type, function: {name, arguments}} with
    arguments as objects, tool results as `tool` messages with their `tool_call_id`. A message
    without content keeps content None (`null_content` replaces it for templates that need text)."""
    from lmforge.shared.data.roles import TOOL

    keep = (reasoning or Reasoning()).keep
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    for m in messages_of(turns):
        content = m.get("content")
        out: dict = {"role": m["role"], "content": null_content if content is None else content}
        if m.get("parts"):
            out["content"] = [{"type": "text", "text": p["text"]} if p["type"] == "text" else {"type": "image"}
                              for p in m["parts"]]
        if m["role"] == ASSISTANT:
            if m.get("reasoning") is not None and keep != "drop" and (reasoning or Reasoning()).thinking != "off":
                out["reasoning_content"] = m["reasoning"]
            if m.get("tool_calls"):
                out["tool_calls"] = []
                for c in m["tool_calls"]:
                    args = c["arguments"] or "{}"
                    entry: dict = {"type": "function",
                                   "function": {"name": c["name"],
                                                "arguments": args if args_as_text else json.loads(args)}}
                    if c.get("id"):
                        entry["id"] = c["id"]
                    out["tool_calls"].append(entry)
        elif m["role"] == TOOL:
            if m.get("tool_call_id"):
                out["tool_call_id"] = m["tool_call_id"]
            if m.get("name"):
                out["name"] = m["name"]
        messages.append(out)
    return messages


_PROBE_CALL = {"id": "call_lmforge_probe", "name": "lmforge_probe_fn", "arguments": '{"lmforge_probe_arg": 1}'}
_PROBE_TOOLS = json.dumps([{"type": "function", "function": {
    "name": "lmforge_probe_tool", "description": "probe", "parameters": {"type": "object", "properties": {}}}}])


class JinjaRenderer:
    """`--template auto`: the tokenizer's own Jinja chat template.

    Messages are given in the shape chat templates read (`to_messages`). Trainable spans are
    exact: an assistant output starts where the rendering of the conversation before it with the
    generation prompt ends (checked to be a prefix of the whole rendering), and runs to the last
    end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, `<|call|>`, EOS, ...) before the next message
    begins. Where the next message begins is found by rendering the conversation again with that
    message's content changed: the first character that differs. So the loss covers the
    reasoning, text, tool calls and end-of-turn marker of each assistant turn, and never a tool's
    output, a header or a generation prompt. What the template cannot render (tool definitions,
    tool calls, reasoning of a trained turn, images) is refused, never silently dropped."""

    name = "auto"
    special_tokens: tuple[str, ...] = ()
    _MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
                "<|call|>", "<|return|>", "<｜end▁of▁sentence｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁end｜>",
                "</s>", "<|end_of_text|>", "<turn|>")
    _SENTINEL = "\u2063lmforge\u2063"

    def __init__(self, tokenizer, reasoning: Reasoning | None = None):
        if not getattr(tokenizer, "chat_template", None):
            from lmforge.shared.data.templates import TEMPLATES   # imported here: templates.py imports this module

            raise BadInput("--template auto: this tokenizer has no chat template",
                           f"pass a named template: {', '.join(TEMPLATES)}")
        self.tokenizer = tokenizer
        self.reasoning = reasoning or Reasoning()
        if self.reasoning.keep == "keep":
            raise BadInput("--reasoning keep: the model's own template decides which turns keep their "
                           "reasoning (auto) or none do (drop)", "use --reasoning auto or drop, or a named template")
        vocab = tokenizer.get_vocab()
        self.markers = [m for m in dict.fromkeys([tokenizer.eos_token, *self._MARKERS]) if m and m in vocab]
        probe = [{"role": "user", "content": "x"}]
        with_header, without = self._apply(probe, "", True), self._apply(probe, "", False)
        self.header = with_header[len(without):] if with_header.startswith(without) else ""
        # the header of an assistant turn in the rendering (without the thinking switch's additions)
        bare = [tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=g) for g in (True, False)]
        self.turn_header = bare[0][len(bare[1]):] if bare[0].startswith(bare[1]) else ""
        self.implied_header = self._implied_header(probe, without)
        self._probe()

    def _implied_header(self, probe: list[dict], without: str) -> str:
        """A template with no generation marker (it ignores add_generation_prompt) whose assistant
        turns still open with a header (`<|im_start|>assistant\n` in some older ChatML templates):
        the header found by rendering an answer. It is then added to every generation prompt, so it
        is never trained and the model is prompted with it, as a template with the marker does.
        (Whitespace alone, Llama-2's " " after [/INST], is left to the answer: see
        generation.encode_chat_prompt.) archrules: the "no generation marker" row."""
        if self.header:
            return ""
        answered = self._try([*probe, {"role": "assistant", "content": self._SENTINEL}])
        if not answered or not answered.startswith(without) or self._SENTINEL not in answered:
            return ""
        between = answered[len(without):answered.index(self._SENTINEL)]
        return between if between.strip() else ""

    # -- what the template can render, found once by rendering probes
    def _try(self, messages: list[dict], tools: str = "") -> str | None:
        try:
            return self._apply(messages, tools, False)
        except BadInput:
            return None

    def _probe(self) -> None:
        user = {"role": "user", "content": "x"}
        plain = self._try([user]) or ""
        listed = self._try([user], _PROBE_TOOLS)
        self.supports_tools = listed is not None and "lmforge_probe_tool" in listed and listed != plain
        self.null_content: str | None = None
        self.args_as_text = False
        self.supports_calls = False
        # content None or "" beside tool calls, arguments as an object or JSON text: the first
        # shape the template renders the calls of (DeepSeek-V3 needs None and text, Qwen3 "")
        for null, as_text in ((None, False), ("", False), (None, True), ("", True)):
            m = to_messages([{"role": "user", "content": "x"},
                             {"role": "assistant", "content": None, "tool_calls": [_PROBE_CALL]},
                             {"role": "tool", "content": "y", "tool_call_id": _PROBE_CALL["id"]},
                             {"role": "assistant", "content": "z"}], null_content=null, args_as_text=as_text)
            text = self._try(m, _PROBE_TOOLS if self.supports_tools else "")
            if text and "lmforge_probe_fn" in text and "lmforge_probe_arg" in text:
                self.null_content, self.args_as_text, self.supports_calls = null, as_text, True
                break
        m = to_messages([{"role": "user", "content": "x"},
                         {"role": "assistant", "content": "z", "reasoning": "lmforge_probe_thought"}])
        self.thinking = "lmforge_probe_thought" in (self._try(m) or "")

    def with_reasoning(self, reasoning: Reasoning) -> "JinjaRenderer":
        return JinjaRenderer(self.tokenizer, reasoning)

    def _apply(self, messages, tools, generation: bool) -> str:
        try:
            return render_chat_template(self.tokenizer, messages, json.loads(tools) if tools else None,
                                        generation, **self.reasoning.template_kwargs())
        except Exception as exc:  # jinja's TemplateError, raise_exception(), a TypeError inside
            raise BadInput(f"the model's chat template cannot render this conversation "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'})",
                           "fix or skip the row, or use a named template (--template NAME)") from None

    def _check(self, messages: list[dict], tools: str) -> None:
        from lmforge.shared.data.roles import TOOL

        refuse_images(messages, "the model's chat template")
        if tools and not self.supports_tools:
            raise BadInput("the model's chat template does not render tool definitions",
                           "drop the tools column, or use a named template with tools")
        if any(m.get("tool_calls") or m["role"] == TOOL for m in messages) and not self.supports_calls:
            raise BadInput("the model's chat template does not render tool calls",
                           "use a named template with tools (e.g. qwen3, llama3)")

    def _messages(self, turns, system: str) -> list[dict]:
        return to_messages(turns, system, self.null_content, self.reasoning, self.args_as_text)

    def _end_of_turn(self, text: str, start: int, limit: int) -> int:
        """The end of the last end-of-turn marker in text[start:limit]."""
        best = -1
        for m in self.markers:
            i = text.rfind(m, start, limit)
            if i >= 0:
                best = max(best, i + len(m))
        return best

    def _start_by_diff(self, messages: list[dict], k: int, tools: str, text: str, i: int) -> int:
        """Where assistant message k's output starts when the rendering of the conversation before
        it is not a prefix of the whole (Qwen3 drops the reasoning of turns before the last user
        message): after the last assistant header between the previous message and this one."""
        at = self._next_start(messages, k, tools, text)
        low = self._next_start(messages, k - 1, tools, text) if k > 0 else 0
        h = text.rfind(self.turn_header, low, at) if self.turn_header else -1
        if h < 0:
            raise BadInput("the model's chat template renders a conversation differently from its "
                           f"prefixes (at message {i + 1})", "use a named template (--template NAME)")
        return h + len(self.turn_header)

    def _next_start(self, messages: list[dict], k: int, tools: str, text: str) -> int:
        """Where message k begins to show in the rendering (the first character that changes with it)."""
        changed = [dict(m) for m in messages]
        content = changed[k].get("content")
        changed[k]["content"] = self._SENTINEL + (content if isinstance(content, str) else "")
        other = self._apply(changed, tools, False)
        n = min(len(text), len(other))
        i = next((j for j in range(n) if text[j] != other[j]), n)
        return i

    def conversation(self, turns, system: str = "", tools: str = "") -> Rendered:
        aligned = messages_of(turns)
        self._check(aligned, tools)
        messages = self._messages(aligned, system)
        text = self._apply(messages, tools, False)
        offset = 1 if system else 0
        spans, span_turns = [], []
        last_user = max((i for i, m in enumerate(aligned) if m["role"] == USER), default=-1)
        for i, m in enumerate(aligned):
            if m["role"] != ASSISTANT:
                continue
            k = i + offset
            head = self._apply(messages[:k], tools, True) + self.implied_header
            start = len(head) if text.startswith(head) else self._start_by_diff(messages, k, tools, text, i)
            limit = self._next_start(messages, k + 1, tools, text) if k + 1 < len(messages) else len(text)
            end = self._end_of_turn(text, start, limit)
            if end < 0:
                raise BadInput(f"cannot find where assistant message {i + 1} ends in the model's chat template "
                               "(no end-of-turn marker)", "use a named template (--template NAME)")
            body = text[start:end]
            for c in m.get("tool_calls") or []:
                if c["name"] not in body:
                    raise BadInput(f"the model's chat template drops the tool call '{c['name']}' of message {i + 1}",
                                   "use a named template with tools (e.g. qwen3, llama3)")
            thought = (m.get("reasoning") or "").strip()
            if (thought and i > last_user and self.reasoning.keep != "drop" and self.reasoning.thinking != "off"
                    and thought not in body):
                raise BadInput(f"the model's chat template drops the reasoning of message {i + 1}",
                               "pack with --reasoning drop, or use a thinking model's template")
            spans.append((start, end))
            span_turns.append(i)
        r = Rendered(text, spans, span_turns)
        return mask_empty_think(r) if self.reasoning.mask_empty_think else r

    def prompt_response(self, prompt, response, system: str = "", tools: str = "") -> tuple[str, str]:
        prompt = messages_of(prompt)
        r = self.conversation(prompt + messages_of([response]), system, tools)
        head = self.generation_prompt(prompt, system, tools)
        start, end = r.spans[-1]
        if not r.text.startswith(head) or start < len(head):
            raise BadInput("--template auto: the chat template renders the prompt differently with the answer",
                           "use a named template (--template NAME)")
        return head, r.text[len(head):end]

    def generation_prompt(self, turns, system: str = "", tools: str = "") -> str:
        aligned = messages_of(turns)
        self._check(aligned, tools)
        return self._apply(self._messages(aligned, system), tools, True) + self.implied_header

    def stop_words(self) -> list[str]:
        return list(self.markers[:1]) + [m for m in self.markers[1:] if m != self.tokenizer.eos_token]

    def split_reasoning(self, text: str, opened: bool = False) -> tuple[str | None, str]:
        return split_generated(text, opened) if self.thinking else (None, text)


def render_chat_template(tokenizer, messages: list[dict], tools: list | None, generation: bool, **kwargs) -> str:
    """The tokenizer's chat template applied to messages as given. `apply_chat_template` (transformers
    5) drops keys whose value is None first, so a template that tests `content is none` (DeepSeek-V3
    renders tool calls only then) never sees it; this renders through the same function
    `apply_chat_template` uses, without that step."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:  # another transformers: its own entry point
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation, **kwargs)
    result: Any = render_jinja_template(conversations=[messages], tools=tools,
                                        chat_template=tokenizer.get_chat_template(None, tools),
                                        add_generation_prompt=generation,
                                        **{**tokenizer.special_tokens_map, **kwargs})
    return result[0][0]   # (rendered conversations, generation indices)

