"""Chat templates: how a conversation becomes the text a model is trained on and served with.

One registry serves `data pack` (training), `eval` and `serve` (inference), so what a model was
trained on is what it is served with. Each template says how the system prompt, user turns,
assistant turns, tool definitions, tool calls and tool results are written, which tokens stop
generation, and how the end of a turn is marked (an end-of-turn token or the tokenizer's EOS).

`render()` returns the text plus the character spans a model should learn: each assistant
output (its content and its end-of-turn marker, not the header before it nor the newline after).
`data pack` tokenizes the whole text once and maps those spans to tokens, so the ids are exactly
those of tokenizing the rendered text; for the real Qwen3, Llama-3 and SmolLM2 tokenizers the
tests check them against `tokenizer.apply_chat_template`.

Placeholders: {content} in turn formats; {bos} and {eos} become the tokenizer's tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lmforge.shared.core.errors import BadInput, close_names
from lmforge.shared.data.aligned import ASSISTANT, FUNCTION, OBSERVATION, USER  # noqa: F401


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


_CHATML: dict[str, Any] = dict(system="<|im_start|>system\n{content}<|im_end|>\n",
                               user="<|im_start|>user\n{content}<|im_end|>\n",
                               assistant_prefix="<|im_start|>assistant\n", assistant_suffix="<|im_end|>", after="\n",
                               observation="<|im_start|>user{content}<|im_end|>\n", tool_style="qwen",
                               special_tokens=("<|im_start|>", "<|im_end|>"), stop_words=("<|im_end|>",))

TEMPLATES: dict[str, Template] = {t.name: t for t in [
    Template("default", "plain 'Human:/Assistant:' turns ending in EOS, for base models",
             system="System: {content}\n", user="Human: {content}\n", assistant_prefix="Assistant: ",
             assistant_suffix="{eos}", after="\n", observation="Observation: {content}\n",
             tool_style="default"),
    Template("alpaca", "Stanford Alpaca's instruction format",
             default_system=("Below is an instruction that describes a task. "
                             "Write a response that appropriately completes the request.\n\n"),
             user="### Instruction:\n{content}\n\n", assistant_prefix="### Response:\n",
             assistant_suffix="{eos}", after="\n\n"),
    Template("chatml", "ChatML (<|im_start|>role ... <|im_end|>), Hermes-style tool calls", **_CHATML),
    Template("smollm", "SmolLM2-Instruct: ChatML with SmolLM's default system prompt",
             **{**_CHATML, "default_system": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}),
    Template("qwen", "Qwen2.5: ChatML with Qwen's default system prompt and <tool_call> tools",
             **{**_CHATML, "default_system": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}),
    Template("qwen3", "Qwen3 (thinking): ChatML with <think> blocks, as Qwen3's own template",
             **_CHATML, thinking=True),
    Template("qwen3-nothink", "Qwen3 with thinking switched off at generation (empty <think> block)",
             **_CHATML, thinking=True, generation_suffix="<think>\n\n</think>\n\n"),
    Template("llama2", "Llama-2-chat: [INST] ... [/INST] with <<SYS>> in the first turn",
             system="<<SYS>>\n{content}\n<</SYS>>\n\n", system_in_user=True,
             user="{bos}[INST] {content} [/INST]", assistant_prefix=" ", assistant_suffix=" {eos}",
             trim=True, trim_system=False, trim_folded=True),
    Template("llama3", "Llama-3 instruct headers; JSON tool calls and ipython results (3.1 style)",
             prefix="{bos}", system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
             user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
             assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant_suffix="<|eot_id|>",
             observation="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>", tool_style="llama3",
             special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
             stop_words=("<|eot_id|>", "<|eom_id|>"), trim=True),
    Template("mistral", "Mistral instruct (v3 tokenizer): [INST] ... [/INST], [TOOL_CALLS]",
             prefix="{bos}", system="{content}\n\n", system_in_user=True, system_in_last_user=True,
             user="[INST] {content}[/INST]",
             assistant_prefix=" ", assistant_suffix="{eos}", answer_rstrip=" ",
             observation="[TOOL_RESULTS] {content}[/TOOL_RESULTS]", tool_style="mistral"),
    Template("gemma", "Gemma: <start_of_turn>user/model, system folded into the first turn",
             prefix="{bos}", system="{content}\n\n", system_in_user=True,
             user="<start_of_turn>user\n{content}<end_of_turn>\n", assistant_prefix="<start_of_turn>model\n",
             assistant_suffix="<end_of_turn>", after="\n",
             special_tokens=("<start_of_turn>", "<end_of_turn>"), stop_words=("<end_of_turn>",), trim=True,
             trim_system=False),
    Template("phi", "Phi-3: <|user|> / <|assistant|> ... <|end|>",
             system="<|system|>\n{content}<|end|>\n", user="<|user|>\n{content}<|end|>\n",
             assistant_prefix="<|assistant|>\n", assistant_suffix="<|end|>", after="\n",
             special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), stop_words=("<|end|>",)),
]}
ALIASES = {"smollm2": "smollm", "qwen2.5": "qwen", "qwen2": "qwen", "llama-3": "llama3", "llama-2": "llama2"}


def catalogue() -> dict[str, dict]:
    """Every named template: its description, whether it renders tools, its stop words."""
    return {name: {"description": t.description, "tools": t.supports_tools, "stop_words": list(t.stop_words)}
            for name, t in TEMPLATES.items()}


def get(name: str) -> Template:
    key = ALIASES.get(name, name)
    if key not in TEMPLATES:
        raise BadInput(f"unknown template '{name}'", close_names(name, [*TEMPLATES, "auto"]) +
                       " (or `auto` for the tokenizer's own chat template)")
    return TEMPLATES[key]


def tojson(value: object, indent: int | None = None) -> str:
    """JSON as chat templates write it (transformers' `tojson`: no ASCII escaping)."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def calls_of(content: str) -> list[dict]:
    """A function_call turn's content (canonical JSON) as a list of {"name", "arguments"}."""
    value = json.loads(content)
    return value if isinstance(value, list) else [value]


def results_of(content: str) -> list[str]:
    """An observation turn's content: one result, or a JSON list of parallel results."""
    if content.startswith("["):
        try:
            value = json.loads(content)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
        except ValueError:
            pass
    return [content]


# ----------------------------------------------------------------------------- tool formats

def _tools_block(style: str, tools: list[dict]) -> str:
    if style == "qwen":
        listing = "".join("\n" + tojson(t) for t in tools)
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
                f"{listing}\n</tools>\n\nFor each function call, return a json object with function name "
                "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    if style == "llama3":
        return ("You have access to the following functions. To call a function, respond with JSON of the "
                'form {"name": function name, "parameters": dictionary of argument name and its value}.\n\n'
                + "\n\n".join(tojson(t, indent=4) for t in tools))
    if style == "mistral":
        return "[AVAILABLE_TOOLS] " + tojson(tools) + "[/AVAILABLE_TOOLS]"
    return ("You have access to the following tools. To use one, answer with JSON of the form "
            '{"name": tool name, "arguments": {...}}.\n' + "\n".join(tojson(t) for t in tools))


def _calls_text(style: str | None, calls: list[dict], content_before: str = "") -> str:
    if style == "qwen":
        parts = []
        for i, call in enumerate(calls):
            args = call["arguments"] if isinstance(call["arguments"], str) else tojson(call["arguments"])
            sep = "\n" if (i == 0 and content_before) or i > 0 else ""
            parts.append(f'{sep}<tool_call>\n{{"name": "{call["name"]}", "arguments": {args}}}\n</tool_call>')
        return "".join(parts)
    if style == "llama3":
        return "".join(tojson({"name": c["name"], "parameters": c["arguments"]}) for c in calls)
    if style == "mistral":
        return "[TOOL_CALLS] " + tojson([{"name": c["name"], "arguments": c["arguments"],
                                          **({"id": c["id"]} if c.get("id") else {})} for c in calls])
    return "\n".join(tojson({"name": c["name"], "arguments": c["arguments"]}) for c in calls)


def _results_text(style: str | None, results: list[str]) -> str:
    if style == "qwen":
        return "".join(f"\n<tool_response>\n{r}\n</tool_response>" for r in results)
    if style == "mistral":
        return tojson({"content": results[0] if len(results) == 1 else results})
    return results[0] if len(results) == 1 else tojson(results)


def parse_calls(style: str | None, text: str) -> tuple[str, list[dict]]:
    """Split generated text into (plain content, tool calls) for a template's tool style.

    The inverse of how calls are written; text that holds no well-formed call is all content."""
    import re

    if not style:
        return text, []
    if style == "qwen":
        found = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S)
        calls = [call for call in map(_as_call, found) if call is not None]
        if found and len(calls) == len(found):
            return text.split("<tool_call>", 1)[0].strip(), calls
        return text, []
    if style == "mistral":
        if "[TOOL_CALLS]" in text:
            head, _, body = text.partition("[TOOL_CALLS]")
            try:
                value = json.loads(body.strip())
            except ValueError:
                return text, []
            items = value if isinstance(value, list) else [value]
            calls = [call for call in map(_as_call, items) if call is not None]
            if calls and len(calls) == len(items):
                return head.strip(), calls
        return text, []
    # llama3 / default: the answer is one or more JSON objects
    decoder, pos, calls, body = json.JSONDecoder(), 0, [], text.strip()
    while pos < len(body):
        try:
            value, end = decoder.raw_decode(body, pos)
        except ValueError:
            return text, []
        call = _as_call(value)
        if call is None:
            return text, []
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \n\r\t;":
            pos += 1
    return ("", calls) if calls else (text, [])


def _as_call(value: object) -> dict | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return {"name": value["name"], "arguments": args}


# ----------------------------------------------------------------------------- rendering

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


def _split_think(content: str) -> tuple[str, str]:
    """Qwen3: (reasoning, answer) of an assistant message, as its template splits them."""
    if "</think>" not in content:
        return "", content
    answer = content.split("</think>")[-1].lstrip("\n")
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, answer


def _calls(m: dict) -> list[dict]:
    return [{"name": c["name"], "arguments": json.loads(c["arguments"]) if c["arguments"] else {},
             **({"id": c["id"]} if c.get("id") else {})} for c in m.get("tool_calls") or []]


def _mistral_result(content: str, call_id: str | None) -> str:
    """A tool result as mistral-common writes it: {"content": JSON value or text, "call_id"}."""
    try:
        value: object = json.loads(content)
    except ValueError:
        value = content
    return tojson({"content": value, **({"call_id": call_id} if call_id else {})})


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
        block = _tools_block(tpl.tool_style, tool_list)
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
                emit(_tools_block("mistral", tool_list))
            emit(sub(tpl.user.replace("{content}", text)))
        elif role == TOOL and tpl.tool_style == "mistral":  # one block per result, tied to its call
            assert tpl.observation is not None
            emit(sub(tpl.observation.replace("{content}", _mistral_result(content, m.get("tool_call_id")))))
        elif role == TOOL:
            results.append(content)
            if i + 1 == len(messages) or messages[i + 1]["role"] != TOOL:
                assert tpl.observation is not None  # every template with a tool style has one
                emit(sub(tpl.observation.replace("{content}", _results_text(tpl.tool_style, results))))
                results = []
        else:  # assistant: header, trained output, glue
            calls_only = bool(m.get("tool_calls")) and not content.strip()
            # Mistral: [TOOL_CALLS] follows [/INST] directly (no answer space)
            emit("" if calls_only and tpl.tool_style == "mistral" else sub(tpl.assistant_prefix))
            answer = clean(content).rstrip(tpl.answer_rstrip) if tpl.answer_rstrip else clean(content)
            if tpl.thinking:
                thought = m.get("reasoning")
                if thought is None:
                    thought, answer = _split_think(answer)
                if reasoning.keep == "drop" or reasoning.thinking == "off":
                    thought = ""
                keep_history = reasoning.keep == "keep"
                final = i == len(messages) - 1
                if (i > last_user or keep_history) and (final or thought):
                    answer = f"<think>\n{thought.strip(chr(10))}\n</think>\n\n{answer.lstrip(chr(10))}"
            calls = _calls(m)
            if calls:
                answer += _calls_text(tpl.tool_style, calls, content_before=clean(content))
            emit(answer + sub(tpl.assistant_suffix), trained=True, turn=i)
            emit(sub(tpl.after))
    if add_generation_prompt:
        suffix = tpl.generation_suffix
        if tpl.thinking and reasoning.thinking == "off":
            suffix = "<think>\n\n</think>\n\n"
        emit(sub(tpl.assistant_prefix) + suffix)
    return Rendered("".join(out), spans, span_turns)


@dataclass(frozen=True)
class Reasoning:
    """How reasoning is rendered (data pack --reasoning / --thinking, eval, serve).

    keep: `auto` = the template's own rule for earlier turns (Qwen3 drops the reasoning of turns
    before the last user message); `keep` = every turn keeps its reasoning; `drop` = no turn does.
    thinking: `auto` = the template's default; `on` / `off` = the enable_thinking switch.
    mask_empty_think: an empty think block (`<think>\\n\\n</think>\\n\\n`) gets no loss."""
    keep: str = "auto"
    thinking: str = "auto"
    mask_empty_think: bool = False

    def template_kwargs(self) -> dict:
        return {} if self.thinking == "auto" else {"enable_thinking": self.thinking == "on"}


EMPTY_THINK = "<think>\n\n</think>\n\n"


def _mask_empty_think(r: Rendered, header: str = "") -> Rendered:
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


# ----------------------------------------------------------------------------- HF message form

def to_messages(turns, system: str = "", null_content: str | None = None,
                reasoning: "Reasoning | None" = None, args_as_text: bool = False) -> list[dict]:
    """Aligned messages -> OpenAI / Hugging Face chat messages, as chat templates read them:
    reasoning as `reasoning_content`, tool calls as {id, type, function: {name, arguments}} with
    arguments as objects, tool results as `tool` messages with their `tool_call_id`. A message
    without content keeps content None (`null_content` replaces it for templates that need text)."""
    from lmforge.shared.data.aligned import TOOL

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


# ----------------------------------------------------------------------------- renderers

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
        return _mask_empty_think(r) if self.reasoning.mask_empty_think else r

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


def split_generated(text: str, opened: bool = False) -> tuple[str | None, str]:
    """A generated answer that may open with a think block -> (reasoning, answer).

    `opened`: the prompt itself ended with `<think>` (the model continues inside the block). A
    block that never closes (the answer cut off by max_tokens) is all reasoning and no answer."""
    if not opened:
        head = text.lstrip()
        if not head.startswith("<think>"):
            return None, text
        text = head[len("<think>"):]
    reasoning, _, answer = text.partition("</think>")
    return reasoning.strip("\n"), answer.lstrip("\n")


def prompt_opens_think(prompt: str) -> bool:
    """Does the generation prompt leave a think block open (the model's output starts inside it)?"""
    return prompt.rstrip().endswith("<think>")


class ThinkStream:
    """`split_generated` for text that arrives in pieces (serve's streamed answers): `feed` returns
    ("reasoning" | "content", text) pieces as soon as they are certain, so that joining each kind
    gives exactly what `split_generated` gives for the whole text. Held back meanwhile: an opening
    that may still become `<think>`, a tail that may still become `</think>`, and newlines at the
    ends of the reasoning (split_generated strips them)."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, opened: bool = False):
        self.state = "reasoning" if opened else "start"
        self.lead = opened        # newlines at the start of the reasoning are dropped
        self.buf = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while self.buf:
            if self.state == "start":
                head = self.buf.lstrip()
                if self.OPEN.startswith(head):          # still undecided ("", "<", "<th", ...)
                    break
                if head.startswith(self.OPEN):
                    self.buf, self.state, self.lead = head[len(self.OPEN):], "reasoning", True
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                if self.lead:
                    self.buf = self.buf.lstrip("\n")
                    if not self.buf:
                        break
                    self.lead = False
                end = self.buf.find(self.CLOSE)
                if end >= 0:
                    piece = self.buf[:end].rstrip("\n")
                    if piece:
                        out.append(("reasoning", piece))
                    self.buf, self.state = self.buf[end + len(self.CLOSE):], "after"
                    continue
                # hold a tail that may begin `</think>`, and the newlines before it
                keep = next((k for k in range(min(len(self.CLOSE) - 1, len(self.buf)), 0, -1)
                             if self.buf.endswith(self.CLOSE[:k])), 0)
                ready = self.buf[:len(self.buf) - keep]
                sure = ready.rstrip("\n")
                if sure:
                    out.append(("reasoning", sure))
                self.buf = self.buf[len(sure):]
                break
            elif self.state == "after":
                self.buf = self.buf.lstrip("\n")
                if self.buf:
                    self.state = "content"
            else:
                out.append(("content", self.buf))
                self.buf = ""
        return out

    def finish(self) -> list[tuple[str, str]]:
        """What is still held when generation ends."""
        held, self.buf = self.buf, ""
        if self.state == "start":
            return [("content", held)] if held else []
        if self.state == "reasoning":
            held = held.lstrip("\n") if self.lead else held
            return [("reasoning", held.rstrip("\n"))] if held.strip("\n") else []
        return [("content", held)] if held and self.state == "content" else []


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
        from lmforge.shared.data.aligned import TOOL

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
        return _mask_empty_think(r) if self.reasoning.mask_empty_think else r

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


def renderer(name: str, tokenizer, reasoning: Reasoning | None = None):
    """The renderer for `--template NAME|auto` and a loaded tokenizer."""
    if name == "auto":
        return JinjaRenderer(tokenizer, reasoning)
    return Renderer(get(name), tokenizer.bos_token or "", tokenizer.eos_token or "", reasoning)


def renderer_for(name: str, tokenizer, model_dir: str, adapter: str | None, allow_plain: bool = False,
                 reasoning: Reasoning | None = None):
    """The template: --template NAME, or `auto` = what the model was trained with (its lmforge.json),
    else the tokenizer's own chat template, else (where allowed) plain text. The reasoning settings
    the model was trained with (recorded by `data pack`) apply unless `reasoning` is given."""
    from lmforge.shared.core import rundir

    if name == "none":
        if not allow_plain:
            raise BadInput("--template none: this evaluation needs a chat template")
        return None
    recorded: dict = {}
    for source in (adapter, model_dir):
        if source:
            recorded = rundir.read_record(source).get("template") or {}
            if recorded:
                break
    if reasoning is None and isinstance(recorded.get("reasoning"), dict):
        known = {k: v for k, v in recorded["reasoning"].items() if k in ("keep", "thinking", "mask_empty_think")}
        reasoning = Reasoning(**known)
    if name != "auto":
        return renderer(name, tokenizer, reasoning)
    if recorded.get("name") in TEMPLATES:
        return renderer(recorded["name"], tokenizer, reasoning)
    if getattr(tokenizer, "chat_template", None):
        return renderer("auto", tokenizer, reasoning)
    if allow_plain:
        return None
    raise BadInput("the model has no chat template and no recorded lmforge template",
                   "pass --template NAME (see `lmforge data templates`)")
