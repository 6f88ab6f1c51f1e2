"""Rendering: how a conversation becomes the text a model is trained on and served with, under a
named template (templates.py holds the table).

A `Template` says how the system prompt, user turns, assistant turns, tool definitions, tool calls
and tool results are written, which tokens stop generation, and how the end of a turn is marked (an
end-of-turn token or the tokenizer's EOS). Placeholders: {content} in turn formats; {bos} and {eos}
become the tokenizer's tokens.

`render()` returns the text plus the character spans a model should learn: each assistant
output (its content and its end-of-turn marker, not the header before it nor the newline after).
`data pack` tokenizes the whole text once and maps those spans to tokens, so the ids are exactly
those of tokenizing the rendered text; for the real Qwen3, Llama-3 and SmolLM2 tokenizers the
tests check them against `tokenizer.apply_chat_template`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lmforge.shared.core.errors import BadInput
from lmforge.shared.data.roles import FUNCTION, OBSERVATION, USER
from lmforge.shared.data.reasoning import EMPTY_THINK, Reasoning, split_generated, split_think
from lmforge.shared.data.tool_calls import calls_text, mistral_result, results_text, tools_block


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    prefix: str = ""                # text before everything ({bos} for most base-model formats)
    system: str = "{content}"       # a system turn, or (with system_in_user) how it prefixes the user turn
    system_in_user: bool = False    # no system role: fold it into the first user turn
    system_in_last_user: bool = False   # ... into the last one instead (Mistral's encoder)
    user: str = "{content}"
    assistant_prefix: str = ""      # the assistant header: also the generation prompt
    assistant_suffix: str = ""      # end of an assistant turn, trained (e.g. "<|im_end|>", "{eos}")
    after: str = ""                 # glue after the end of turn, not trained (e.g. "\n")
    observation: str | None = None  # a tool result turn; None = the template has no tool support
    tool_style: str | None = None   # qwen | llama3 | mistral | default
    default_system: str = ""
    special_tokens: tuple[str, ...] = ()   # markers that must be single tokens
    stop_words: tuple[str, ...] = ("{eos}",)
    trim: bool = False              # content is stripped of surrounding whitespace (Llama-3, Gemma)
    trim_system: bool = True        # ... and the system prompt too (Gemma keeps it as it is)
    answer_rstrip: str = ""         # characters stripped from the end of an answer (Mistral: spaces)
    trim_folded: bool = False       # a folded system prompt and its user turn are stripped as one
                                    # text (Llama-2: `('<<SYS>>...' + content).strip()`)
    thinking: bool = False          # Qwen3's <think> rules
    generation_suffix: str = ""     # appended to the generation prompt (qwen3-nothink)

    @property
    def supports_tools(self) -> bool:
        return self.tool_style is not None


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)  # trainable (start, end) per assistant turn
    turn_of_span: list[int] = field(default_factory=list)        # index of the message each span belongs to


def messages_of(turns) -> list[dict]:
    """Aligned messages (version-2 dicts) or version-1 (role, content) pairs -> version-2 dicts."""
    from lmforge.shared.data.aligned import from_v1, full

    if not turns:
        return []
    if isinstance(turns[0], dict):
        if any(m.get("role") in (FUNCTION, OBSERVATION) for m in turns):  # version-1 rows read raw
            return from_v1([(m["role"], m["content"]) for m in turns])
        return [full(m) for m in turns]
    return from_v1([tuple(t) for t in turns])


def refuse_images(messages: list[dict], what: str) -> None:
    from lmforge.shared.data.aligned import has_images

    if any(has_images(m) for m in messages):
        raise BadInput(f"the conversation has images and {what} renders text only",
                       "use a vision-language model's template, or align text-only data")


def _calls(m: dict) -> list[dict]:
    return [{"name": c["name"], "arguments": json.loads(c["arguments"]) if c["arguments"] else {},
             **({"id": c["id"]} if c.get("id") else {})} for c in m.get("tool_calls") or []]


def render(tpl: Template, turns, system: str = "", tools: str = "", *,
           bos: str = "", eos: str = "", add_generation_prompt: bool = False,
           reasoning: "Reasoning | None" = None) -> Rendered:
    """Write a conversation (aligned messages) as text, with its trainable spans."""
    from lmforge.shared.data.aligned import ASSISTANT as A, TOOL

    reasoning = reasoning or Reasoning()
    messages = messages_of(turns)
    refuse_images(messages, f"template '{tpl.name}'")
    sub = lambda s: s.replace("{bos}", bos or "").replace("{eos}", eos or "")  # noqa: E731
    tool_list = json.loads(tools) if tools else []
    if (tool_list or any(m["role"] == TOOL or m.get("tool_calls") for m in messages)) and not tpl.supports_tools:
        raise BadInput(f"template '{tpl.name}' cannot express tool definitions, calls or results",
                       "pick a template with tools (qwen, qwen3, chatml, llama3, mistral, default)")
    if not tpl.thinking and any((m.get("reasoning") or "").strip() for m in messages if m["role"] == A) \
            and reasoning.keep != "drop":
        raise BadInput(f"template '{tpl.name}' cannot express reasoning (thinking) in assistant messages",
                       "use a thinking template (qwen3, or auto for the model's own), or pack with "
                       "--reasoning drop")
    clean = (lambda s: s.strip()) if tpl.trim else (lambda s: s)
    system = system or tpl.default_system
    out: list[str] = [sub(tpl.prefix)]
    pos = len(out[0])
    spans: list[tuple[int, int]] = []
    span_turns: list[int] = []

    def emit(text: str, trained: bool = False, turn: int = -1) -> None:
        nonlocal pos
        if trained and text:
            spans.append((pos, pos + len(text)))
            span_turns.append(turn)
        out.append(text)
        pos += len(text)

    folded = ""
    if tool_list and tpl.tool_style in ("qwen", "llama3", "default"):
        block = tools_block(tpl.tool_style, tool_list)
        system = f"{system}\n\n{block}" if system else block
    if system:
        system_text = clean(system) if tpl.trim_system else system
        if tpl.system_in_user:
            folded = tpl.system.replace("{content}", system_text)
        else:
            emit(sub(tpl.system.replace("{content}", system_text)))

    last_user = max((i for i, m in enumerate(messages) if m["role"] == USER), default=len(messages) - 1)
    first_user = next((i for i, m in enumerate(messages) if m["role"] == USER), -1)
    results: list[str] = []
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content") or ""
        if role == USER:
            text = clean(content)
            if i == (last_user if tpl.system_in_last_user else first_user) and folded:
                text = clean(folded + content) if tpl.trim_folded else folded + text
            if tpl.tool_style == "mistral" and tool_list and i == last_user:
                emit(tools_block("mistral", tool_list))
            emit(sub(tpl.user.replace("{content}", text)))
        elif role == TOOL and tpl.tool_style == "mistral":  # one block per result, tied to its call
            assert tpl.observation is not None
            emit(sub(tpl.observation.replace("{content}", mistral_result(content, m.get("tool_call_id")))))
        elif role == TOOL:
            results.append(content)
            if i + 1 == len(messages) or messages[i + 1]["role"] != TOOL:
                assert tpl.observation is not None  # every template with a tool style has one
                emit(sub(tpl.observation.replace("{content}", results_text(tpl.tool_style, results))))
                results = []
        else:  # assistant: header, trained output, glue
            calls_only = bool(m.get("tool_calls")) and not content.strip()
            # Mistral: [TOOL_CALLS] follows [/INST] directly (no answer space)
            emit("" if calls_only and tpl.tool_style == "mistral" else sub(tpl.assistant_prefix))
            answer = clean(content).rstrip(tpl.answer_rstrip) if tpl.answer_rstrip else clean(content)
            if tpl.thinking:
                thought = m.get("reasoning")
                if thought is None:
                    thought, answer = split_think(answer)
                if reasoning.keep == "drop" or reasoning.thinking == "off":
                    thought = ""
                keep_history = reasoning.keep == "keep"
                final = i == len(messages) - 1
                if (i > last_user or keep_history) and (final or thought):
                    answer = f"<think>\n{thought.strip(chr(10))}\n</think>\n\n{answer.lstrip(chr(10))}"
            calls = _calls(m)
            if calls:
                answer += calls_text(tpl.tool_style, calls, content_before=clean(content))
            emit(answer + sub(tpl.assistant_suffix), trained=True, turn=i)
            emit(sub(tpl.after))
    if add_generation_prompt:
        suffix = tpl.generation_suffix
        if tpl.thinking and reasoning.thinking == "off":
            suffix = "<think>\n\n</think>\n\n"
        emit(sub(tpl.assistant_prefix) + suffix)
    return Rendered("".join(out), spans, span_turns)


def mask_empty_think(r: Rendered, header: str = "") -> Rendered:
    """Start each span after an empty think block that opens it."""
    spans = []
    for a, b in r.spans:
        if r.text.startswith(EMPTY_THINK, a):
            a = min(a + len(EMPTY_THINK), b)
        spans.append((a, b))
    return Rendered(r.text, spans, r.turn_of_span)


def prompt_and_response(tpl: Template, prompt, response, system: str = "", tools: str = "", *,
                        bos: str = "", eos: str = "", reasoning: "Reasoning | None" = None) -> tuple[str, str]:
    """(generation prompt, final assistant output) as two strings that concatenate to the rendering
    of the whole conversation (minus the glue after the last turn). Used for pairwise, KTO and PPO
    data, whose prompt and responses are tokenized separately."""
    prompt = messages_of(prompt)
    head = render(tpl, prompt, system, tools, bos=bos, eos=eos, add_generation_prompt=True,
                  reasoning=reasoning).text
    full = render(tpl, prompt + messages_of([response]), system, tools, bos=bos, eos=eos, reasoning=reasoning)
    start, end = full.spans[-1]
    if not full.text.startswith(head) or start < len(head) - len(tpl.generation_suffix):
        raise BadInput(f"template '{tpl.name}' renders the prompt differently with and without the answer",
                       "use another template for pairwise/KTO/PPO data")
    return head, full.text[len(head):end]


def stop_words(tpl: Template, eos: str | None) -> list[str]:
    words = [eos if w == "{eos}" else w for w in tpl.stop_words]
    return [w for w in dict.fromkeys(words + ([eos] if eos else [])) if w]


class Renderer:
    """A named template bound to a tokenizer's BOS/EOS: what pack, eval and serve call."""

    def __init__(self, tpl: Template, bos: str = "", eos: str = "", reasoning: Reasoning | None = None):
        self.tpl, self.bos, self.eos = tpl, bos or "", eos or ""
        self.reasoning = reasoning or Reasoning()
        self.name = tpl.name
        self.special_tokens = tpl.special_tokens
        self.supports_tools = tpl.supports_tools
        self.thinking = tpl.thinking
        suffix = EMPTY_THINK if tpl.thinking and self.reasoning.thinking == "off" else tpl.generation_suffix
        # the assistant header that opens the answer (kept when a long prompt is cut)
        self.header = tpl.assistant_prefix.replace("{bos}", self.bos).replace("{eos}", self.eos) + suffix

    def with_reasoning(self, reasoning: Reasoning) -> "Renderer":
        return Renderer(self.tpl, self.bos, self.eos, reasoning)

    def conversation(self, turns, system: str = "", tools: str = "") -> Rendered:
        r = render(self.tpl, turns, system, tools, bos=self.bos, eos=self.eos, reasoning=self.reasoning)
        return mask_empty_think(r) if self.reasoning.mask_empty_think else r

    def prompt_response(self, prompt, response, system: str = "", tools: str = "") -> tuple[str, str]:
        return prompt_and_response(self.tpl, prompt, response, system, tools, bos=self.bos, eos=self.eos,
                                   reasoning=self.reasoning)

    def generation_prompt(self, turns, system: str = "", tools: str = "") -> str:
        return render(self.tpl, turns, system, tools, bos=self.bos, eos=self.eos, add_generation_prompt=True,
                      reasoning=self.reasoning).text

    def stop_words(self) -> list[str]:
        return stop_words(self.tpl, self.eos)

    def split_reasoning(self, text: str, opened: bool = False) -> tuple[str | None, str]:
        """Generated text -> (reasoning, answer) for thinking templates; `opened`: the prompt
        ended inside a think block (prompt_opens_think)."""
        return split_generated(text, opened) if self.thinking else (None, text)
