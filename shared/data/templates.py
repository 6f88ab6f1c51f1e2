"""Named chat templates: the table behind `--template NAME` (`lmforge data templates` lists it),
and the renderer for `--template NAME|auto`.

One table serves `data pack` (training), `eval` and `serve` (inference), so what a model was
trained on is what it is served with. How a template is rendered is in rendering.py; `auto` (the
tokenizer's own template) in jinja_template.py.
"""

from __future__ import annotations

from typing import Any

from lmforge.shared.core.errors import BadInput, close_names
from lmforge.shared.data.jinja_template import JinjaRenderer
from lmforge.shared.data.reasoning import Reasoning
from lmforge.shared.data.rendering import Renderer, Template

# Imported from here by the agent code (shared/train/agent/, tests/test_agent.py):
from lmforge.shared.data.reasoning import prompt_opens_think  # noqa: F401
from lmforge.shared.data.rendering import stop_words  # noqa: F401
from lmforge.shared.data.tool_calls import parse_calls  # noqa: F401

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
