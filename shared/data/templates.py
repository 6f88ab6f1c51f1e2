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
from lmforge.shared.data.aligned import ASSISTANT, FUNCTION, OBSERVATION, USER


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    prefix: str = ""                # text before everything ({bos} for most base-model formats)
    system: str = "{content}"       # a system turn, or (with system_in_user) how it prefixes the user turn
    system_in_user: bool = False    # no system role: fold it into the first user turn
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
             trim=True),
    Template("llama3", "Llama-3 instruct headers; JSON tool calls and ipython results (3.1 style)",
             prefix="{bos}", system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
             user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
             assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant_suffix="<|eot_id|>",
             observation="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>", tool_style="llama3",
             special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
             stop_words=("<|eot_id|>", "<|eom_id|>"), trim=True),
    Template("mistral", "Mistral instruct (v3 tokenizer): [INST] ... [/INST], [TOOL_CALLS]",
             prefix="{bos}", system="{content}\n\n", system_in_user=True, user="[INST] {content}[/INST]",
             assistant_prefix=" ", assistant_suffix="{eos}",
             observation="[TOOL_RESULTS] {content}[/TOOL_RESULTS]", tool_style="mistral"),
    Template("gemma", "Gemma: <start_of_turn>user/model, system folded into the first turn",
             prefix="{bos}", system="{content}\n\n", system_in_user=True,
             user="<start_of_turn>user\n{content}<end_of_turn>\n", assistant_prefix="<start_of_turn>model\n",
             assistant_suffix="<end_of_turn>", after="\n",
             special_tokens=("<start_of_turn>", "<end_of_turn>"), stop_words=("<end_of_turn>",), trim=True),
    Template("phi", "Phi-3: <|user|> / <|assistant|> ... <|end|>",
             system="<|system|>\n{content}<|end|>\n", user="<|user|>\n{content}<|end|>\n",
             assistant_prefix="<|assistant|>\n", assistant_suffix="<|end|>", after="\n",
             special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), stop_words=("<|end|>",)),
]}
ALIASES = {"smollm2": "smollm", "qwen2.5": "qwen", "qwen2": "qwen", "llama-3": "llama3", "llama-2": "llama2"}


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
        return "[TOOL_CALLS] " + tojson([{"name": c["name"], "arguments": c["arguments"]} for c in calls])
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
    turn_of_span: list[int] = field(default_factory=list)        # index of the turn each span belongs to


def _split_think(content: str) -> tuple[str, str]:
    """Qwen3: (reasoning, answer) of an assistant message, as its template splits them."""
    if "</think>" not in content:
        return "", content
    answer = content.split("</think>")[-1].lstrip("\n")
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, answer


def render(tpl: Template, turns: list[tuple[str, str]], system: str = "", tools: str = "", *,
           bos: str = "", eos: str = "", add_generation_prompt: bool = False) -> Rendered:
    """Write a conversation (aligned (role, content) turns) as text, with its trainable spans."""
    sub = lambda s: s.replace("{bos}", bos or "").replace("{eos}", eos or "")  # noqa: E731
    tool_list = json.loads(tools) if tools else []
    if (tool_list or any(r in (FUNCTION, OBSERVATION) for r, _ in turns)) and not tpl.supports_tools:
        raise BadInput(f"template '{tpl.name}' cannot express tool definitions, calls or results",
                       "pick a template with tools (qwen, qwen3, chatml, llama3, mistral, default)")
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
        if tpl.system_in_user:
            folded = tpl.system.replace("{content}", clean(system))
        else:
            emit(sub(tpl.system.replace("{content}", clean(system))))

    last_user = max((i for i, (r, _) in enumerate(turns) if r == USER), default=len(turns) - 1)
    first_user = next((i for i, (r, _) in enumerate(turns) if r == USER), -1)
    for i, (role, content) in enumerate(turns):
        if role == USER:
            text = clean(content)
            if i == first_user and folded:
                text = folded + text
            if tpl.tool_style == "mistral" and tool_list and i == last_user:
                emit(_tools_block("mistral", tool_list))
            emit(sub(tpl.user.replace("{content}", text)))
        elif role == OBSERVATION:
            assert tpl.observation is not None  # every template with a tool style has one
            emit(sub(tpl.observation.replace("{content}", _results_text(tpl.tool_style, results_of(content)))))
        else:  # assistant or function call: header, trained output, glue
            emit(sub(tpl.assistant_prefix))
            if role == FUNCTION:
                body, answer = "", ""
            else:
                body = answer = clean(content)
            if tpl.thinking:
                reasoning, answer = _split_think(body)
                if i > last_user and (i == len(turns) - 1 or reasoning):
                    answer = f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{answer.lstrip(chr(10))}"
            if role == FUNCTION:
                answer += _calls_text(tpl.tool_style, calls_of(content), content_before=body)
            emit(answer + sub(tpl.assistant_suffix), trained=True, turn=i)
            emit(sub(tpl.after))
    if add_generation_prompt:
        emit(sub(tpl.assistant_prefix) + tpl.generation_suffix)
    return Rendered("".join(out), spans, span_turns)


def prompt_and_response(tpl: Template, prompt: list[tuple[str, str]], response: tuple[str, str],
                        system: str = "", tools: str = "", *, bos: str = "", eos: str = "") -> tuple[str, str]:
    """(generation prompt, final assistant output) as two strings that concatenate to the rendering
    of the whole conversation (minus the glue after the last turn). Used for pairwise, KTO and PPO
    data, whose prompt and responses are tokenized separately."""
    head = render(tpl, prompt, system, tools, bos=bos, eos=eos, add_generation_prompt=True).text
    full = render(tpl, prompt + [response], system, tools, bos=bos, eos=eos)
    start, end = full.spans[-1]
    if not full.text.startswith(head) or start < len(head) - len(tpl.generation_suffix):
        raise BadInput(f"template '{tpl.name}' renders the prompt differently with and without the answer",
                       "use another template for pairwise/KTO/PPO data")
    return head, full.text[len(head):end]


def stop_words(tpl: Template, eos: str | None) -> list[str]:
    words = [eos if w == "{eos}" else w for w in tpl.stop_words]
    return [w for w in dict.fromkeys(words + ([eos] if eos else [])) if w]


# ----------------------------------------------------------------------------- HF message form

def to_messages(turns: list[tuple[str, str]], system: str = "") -> list[dict]:
    """Aligned turns -> OpenAI/Hugging Face chat messages (tool_calls, tool role)."""
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    for role, content in turns:
        if role == FUNCTION:
            calls = [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                     for c in calls_of(content)]
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        elif role == OBSERVATION:
            messages += [{"role": "tool", "content": r} for r in results_of(content)]
        else:
            messages.append({"role": role, "content": content})
    return messages


# ----------------------------------------------------------------------------- renderers

class Renderer:
    """A named template bound to a tokenizer's BOS/EOS: what pack, eval and serve call."""

    def __init__(self, tpl: Template, bos: str = "", eos: str = ""):
        self.tpl, self.bos, self.eos = tpl, bos or "", eos or ""
        self.name = tpl.name
        self.special_tokens = tpl.special_tokens
        self.supports_tools = tpl.supports_tools
        # the assistant header that opens the answer (kept when a long prompt is cut)
        self.header = tpl.assistant_prefix.replace("{bos}", self.bos).replace("{eos}", self.eos) + tpl.generation_suffix

    def conversation(self, turns, system: str = "", tools: str = "") -> Rendered:
        return render(self.tpl, turns, system, tools, bos=self.bos, eos=self.eos)

    def prompt_response(self, prompt, response, system: str = "", tools: str = "") -> tuple[str, str]:
        return prompt_and_response(self.tpl, prompt, response, system, tools, bos=self.bos, eos=self.eos)

    def generation_prompt(self, turns, system: str = "", tools: str = "") -> str:
        return render(self.tpl, turns, system, tools, bos=self.bos, eos=self.eos, add_generation_prompt=True).text

    def stop_words(self) -> list[str]:
        return stop_words(self.tpl, self.eos)


class JinjaRenderer:
    """`--template auto`: the tokenizer's own Jinja chat template.

    Trainable spans are found by rendering each conversation prefix with the generation prompt:
    an assistant output starts where `render(messages[:i], add_generation_prompt=True)` ends
    (checked to be a prefix of the whole rendering) and runs to the first end-of-turn marker."""

    name = "auto"
    special_tokens: tuple[str, ...] = ()
    supports_tools = True
    _MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise BadInput("--template auto: this tokenizer has no chat template",
                           f"pass a named template: {', '.join(TEMPLATES)}")
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.markers = [m for m in dict.fromkeys([tokenizer.eos_token, *self._MARKERS]) if m and m in vocab]
        probe = [{"role": "user", "content": "x"}]
        with_header, without = self._apply(probe, "", True), self._apply(probe, "", False)
        self.header = with_header[len(without):] if with_header.startswith(without) else ""

    def _apply(self, messages, tools, generation: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=json.loads(tools) if tools else None,
                                                  tokenize=False, add_generation_prompt=generation)

    def _end_of_turn(self, text: str, start: int) -> int:
        found = [(text.find(m, start), m) for m in self.markers]
        found = [(i, m) for i, m in found if i >= 0]
        if not found:
            return len(text)
        i, m = min(found)
        return i + len(m)

    def conversation(self, turns, system: str = "", tools: str = "") -> Rendered:
        messages = to_messages(turns, system)
        text = self._apply(messages, tools, False)
        offset = 1 if system else 0
        spans, span_turns, m = [], [], offset
        for i, (role, _) in enumerate(turns):
            if role in (ASSISTANT, FUNCTION):
                head = self._apply(messages[:m], tools, True)
                if not text.startswith(head):
                    raise BadInput("--template auto: the tokenizer's chat template renders a conversation "
                                   "differently from its prefixes", "use a named template (--template NAME)")
                spans.append((len(head), self._end_of_turn(text, len(head))))
                span_turns.append(i)
            m += len(results_of(turns[i][1])) if role == OBSERVATION else 1
        return Rendered(text, spans, span_turns)

    def prompt_response(self, prompt, response, system: str = "", tools: str = "") -> tuple[str, str]:
        head = self.generation_prompt(prompt, system, tools)
        full = self._apply(to_messages(prompt + [response], system), tools, False)
        if not full.startswith(head):
            raise BadInput("--template auto: the chat template renders the prompt differently with the answer",
                           "use a named template (--template NAME)")
        return head, full[len(head):self._end_of_turn(full, len(head))]

    def generation_prompt(self, turns, system: str = "", tools: str = "") -> str:
        return self._apply(to_messages(turns, system), tools, True)

    def stop_words(self) -> list[str]:
        return list(self.markers[:1]) + [m for m in self.markers[1:] if m != self.tokenizer.eos_token]


def renderer(name: str, tokenizer):
    """The renderer for `--template NAME|auto` and a loaded tokenizer."""
    if name == "auto":
        return JinjaRenderer(tokenizer)
    return Renderer(get(name), tokenizer.bos_token or "", tokenizer.eos_token or "")


def renderer_for(name: str, tokenizer, model_dir: str, adapter: str | None, allow_plain: bool = False):
    """The template: --template NAME, or `auto` = what the model was trained with (its lmforge.json),
    else the tokenizer's own chat template, else (where allowed) plain text."""
    from lmforge.shared.core import rundir

    if name == "none":
        if not allow_plain:
            raise BadInput("--template none: this evaluation needs a chat template")
        return None
    if name != "auto":
        return renderer(name, tokenizer)
    for source in (adapter, model_dir):
        if source:
            recorded = (rundir.read_record(source).get("template") or {}).get("name")
            if recorded in TEMPLATES:
                return renderer(recorded, tokenizer)
    if getattr(tokenizer, "chat_template", None):
        return renderer("auto", tokenizer)
    if allow_plain:
        return None
    raise BadInput("the model has no chat template and no recorded lmforge template",
                   "pass --template NAME (see `lmforge data templates`)")
