"""`eval mmlu | cmmlu | ceval | generate | perplexity | rm`, `serve`, `chat`, `board`, `completion`."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from lmforge.shared.core.commands.common import (ADAPTER, ATTENTION, BATCH_SIZE, JSON_OUT, MAX_NEW_TOKENS, MAX_SAMPLES,
                                                  MODEL, REWARD, SEED, STREAM_OUTPUT, TEMPERATURE, TEMPLATE, TOP_P)
from lmforge.shared.core.errors import BadInput
from lmforge.shared.core.options import REQUIRED, Opt, Options, declaration


# sampling penalties (eval generate, chat; serve takes them per request, as OpenAI's fields)
REPETITION_PENALTY = Opt(default=1.0, min=0, min_open=True,
                         help="Penalise tokens already in the prompt or the answer: a seen token's logit is divided by "
                              "this when positive, multiplied when negative (transformers' and vLLM's "
                              "repetition_penalty; 1: off, 1.1-1.3: less repetition).")
FREQUENCY_PENALTY = Opt(default=0.0, min=-2, max=2,
                        help="Subtract this times a token's count in the answer so far from its logit (OpenAI's "
                             "frequency_penalty; 0: off; negative: encourage repeats).")
PRESENCE_PENALTY = Opt(default=0.0, min=-2, max=2,
                       help="Subtract this from the logit of every token already in the answer (OpenAI's "
                            "presence_penalty; 0: off).")


@declaration
class EvalModel(Options):
    model: str = MODEL
    adapter: str | None = ADAPTER
    attn: str = ATTENTION


@declaration
class EvalBenchmark(EvalModel):
    """mmlu, cmmlu and ceval: the seed's k-shot letter scoring."""

    summary: ClassVar[str] = ("A multiple-choice benchmark (MMLU, CMMLU, C-Eval): accuracy per subject and category, "
                              "k-shot (C-Eval's test split has no answers: use --split val).")
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge eval mmlu -m merged -d data/eval/mmlu/mmlu.zip --split val --shots 5 --json",
        "lmforge eval cmmlu -m ./base --adapter runs/sft -d data/eval/cmmlu/cmmlu.zip --split test",
        "lmforge eval ceval -m merged -d data/eval/ceval/ceval.zip --split val --subjects accountant,law",
    )

    data: str = Opt(default=REQUIRED, flags=("--data", "-d"),
                    help="The benchmark: a zip or directory of CSVs, with mapping.json beside it.")
    mapping: str | None = Opt(default=None, help="Subject mapping (default: mapping.json beside --data).")
    split: str = Opt(choices=("test", "val", "dev"), default="test", help="Which questions to answer.")
    shots: int = Opt(default=5, min=0, help="Solved examples from the dev split in each prompt.")
    subjects: str | None = Opt(default=None, help="Only these subjects (comma-separated).")
    batch_size: int = BATCH_SIZE.but(default=4, help="Questions per forward pass.", min=1)
    template: str = TEMPLATE
    cutoff: int | None = Opt(default=None,
                             help="Longest prompt (default: the model's context); shots are dropped to fit.")
    predictions: Path | None = Opt(default=None, help="Save every question's prediction as JSON lines here.")
    json_out: bool = JSON_OUT


@declaration
class EvalGenerate(EvalModel):
    summary: ClassVar[str] = ("Generate answers for aligned data; ROUGE-1/2/L, BLEU-4 and exact match against the "
                              "references.")
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge eval generate -m ./base --adapter runs/sft -d test.arrow -o predictions.jsonl",
        "lmforge eval generate -m merged -d test.arrow --max-samples 100 --max-new-tokens 64 --json",
    )

    data: str = Opt(default=REQUIRED, flags=("--data", "-d"), help="Aligned sft data (prompts with reference answers).")
    template: str = TEMPLATE.but(help="auto (what the model was trained with, else its chat template) or a name.")
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = TEMPERATURE.but(default=0.0, help="Sampling temperature (0: greedy, the default).")
    top_p: float = TOP_P
    repetition_penalty: float = REPETITION_PENALTY
    frequency_penalty: float = FREQUENCY_PENALTY
    presence_penalty: float = PRESENCE_PENALTY
    seed: int = SEED.but(help="Sampling seed.")
    batch_size: int = BATCH_SIZE.but(default=8, help="Prompts generated together.", min=1)
    max_samples: int | None = MAX_SAMPLES
    output: Path | None = STREAM_OUTPUT.but(help="Save predictions: .jsonl (JSON lines) or .arrow.")
    json_out: bool = JSON_OUT


@declaration
class EvalPerplexity(EvalModel):
    summary: ClassVar[str] = "Perplexity (exp of the mean token loss) on packed pt/sft data."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge eval perplexity -m merged -d heldout.packed",
        "lmforge eval perplexity -m ./base --adapter runs/sft -d heldout.packed --json",
    )

    data: str = Opt(default=REQUIRED, flags=("--data", "-d"), help="Packed pt or sft data.")
    batch_size: int = BATCH_SIZE.but(default=4, help="Rows per forward pass.", min=1)
    json_out: bool = JSON_OUT


@declaration
class EvalRM(Options):
    summary: ClassVar[str] = "A reward model's pairwise accuracy and mean margin on packed pairwise data."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge eval rm -m ./sft-model --reward runs/rm -d pairs.packed",
    )

    model: str = MODEL.but(help="The base model the reward model was trained on.")
    reward: str = REWARD
    data: str = Opt(default=REQUIRED, flags=("--data", "-d"), help="Pairs packed with `data pack --stage rm`.")
    batch_size: int = BATCH_SIZE.but(default=8, help="Pairs per forward pass.", min=1)
    attn: str = ATTENTION
    json_out: bool = JSON_OUT


@declaration
class Serve(Options):
    summary: ClassVar[str] = "Serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming, tools)."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge serve -m merged --port 8000 --api-key \"$KEY\"",
        "lmforge serve -m HuggingFaceTB/SmolLM2-135M-Instruct --adapter runs/sft",
        "lmforge serve -m vl-merged --media-dir ./images --max-images 4",
    )

    model: str = MODEL.but(panel="Model")
    adapter: str | None = ADAPTER.but(help="A PEFT adapter to serve on the model.", panel="Model")
    template: str = TEMPLATE.but(help="auto (what the model was trained with, else its chat template) or a template "
                                      "name.", panel="Model")
    name: str | None = Opt(default=None, help="Model id clients use (default: the directory name).", panel="Model")
    host: str = Opt(default="127.0.0.1", help="Address to listen on (127.0.0.1: this machine only).")
    port: int = Opt(default=8000, help="Port to listen on.", min=1, max=65535)
    api_key: str | None = Opt(default=None, envvar="LMFORGE_API_KEY",
                              help="Require 'Authorization: Bearer KEY' (also LMFORGE_API_KEY).")
    backend: str = Opt(choices=("hf", "vllm"), default="hf", help="hf: transformers (CPU or GPU); vllm: vLLM (GPU).")
    max_concurrency: int = Opt(default=32, min=1, help="Requests generated at once; more wait their turn.")
    max_batch: int = Opt(default=32, min=1, help="hf backend: most sequences in one generation batch.")
    attn: str = ATTENTION.but(help="hf backend: attention kernel (auto: what transformers supports for the "
                                   "architecture).", panel="Model")
    max_request_bytes: int = Opt(default=8 << 20, min=1024,
                                 help="Largest request body accepted; a larger one gets HTTP 413.")
    media_dir: str | None = Opt(default=None,
                                help="Let requests name images by local path or file:// URL inside this directory "
                                     "(vision models); without it only data: URLs are read.")
    max_images: int = Opt(default=8, min=1, help="Most images one request may carry; more get HTTP 400.")
    max_image_bytes: int = Opt(default=20 << 20, min=1024,
                               help="Largest image file a request may carry; a larger one gets HTTP 413.")
    max_image_pixels: int = Opt(default=4096 * 4096, min=1,
                                help="Largest image (width x height) a request may carry, read from its header before "
                                     "anything is decoded; a larger one gets HTTP 413.")


@declaration
class Chat(Options):
    summary: ClassVar[str] = ("Talk to a model in the terminal (loaded here, or a running `lmforge serve` with --url): "
                              "answers stream as they are written; /help lists the commands.")
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge chat -m merged --system \"You are terse.\"",
        "lmforge chat -m ./base --adapter runs/sft --temperature 0 --repetition-penalty 1.1",
        "lmforge chat --url http://127.0.0.1:8000 --api-key \"$KEY\"",
    )

    model: str | None = MODEL.but(default=None, show_default=False,
                                  help="Model directory or Hub id to load; with --url, the served model to talk to "
                                       "(default: the first the server lists).")
    adapter: str | None = ADAPTER.but(help="A PEFT adapter to use.")
    template: str = TEMPLATE.but(help="auto or a template name.")
    system: str = Opt(default="", help="A system prompt (/system changes it during the chat).")
    max_tokens: int = Opt(default=512, min=1,
                          help="Longest answer (with --url and not given: the server's own limit).")
    temperature: float = TEMPERATURE
    repetition_penalty: float = REPETITION_PENALTY
    frequency_penalty: float = FREQUENCY_PENALTY
    presence_penalty: float = PRESENCE_PENALTY
    attn: str = ATTENTION
    url: str | None = Opt(default=None,
                          help="Talk to a running `lmforge serve` at this address (e.g. http://127.0.0.1:8000) "
                               "instead of loading a model.")
    api_key: str | None = Opt(default=None, envvar="LMFORGE_API_KEY",
                              help="With --url: the server's API key (its --api-key; also LMFORGE_API_KEY).")

    def check_own(self) -> None:
        if self.url is None and self.model is None:
            raise BadInput("chat needs a model: --model DIR (loaded here) or --url URL (a running lmforge serve)")
        if self.url is not None:
            local = sorted(name for name in ("adapter", "template", "attn") if name in self.chosen)
            if local:
                raise BadInput(f"--{local[0]} applies to a model chat loads; with --url the server has its own",
                               f"drop --{local[0]}, or set it on `lmforge serve`")


@declaration
class Board(Options):
    summary: ClassVar[str] = "Fine-tune from a web page: configure, preview data, run, monitor, evaluate and chat."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge board --workspace ~/work",
        "lmforge board --host 0.0.0.0 --port 8080 --workspace ~/work --token \"$TOKEN\"",
    )

    host: str = Opt(default="127.0.0.1",
                    help="Address to listen on (127.0.0.1: this machine only; any other address needs --token).")
    port: int = Opt(default=7860, help="Port to listen on.", min=1, max=65535)
    workspace: Path = Opt(default=Path("."),
                          help="Directory the board works in: data, models and runs/ live there; every path the page "
                               "names must stay inside it.")
    token: str | None = Opt(default=None, envvar="LMFORGE_BOARD_TOKEN",
                            help="Use this token (at least 16 characters; default: a new random one per start) "
                                 "instead of a random one; also LMFORGE_BOARD_TOKEN.")


@declaration
class Completion(Options):
    summary: ClassVar[str] = "Print the completion script for a shell (see completions/ for installed copies)."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge completion bash > ~/.local/share/bash-completion/completions/lmforge",
        "lmforge completion zsh > ~/.zfunc/_lmforge",
    )

    shell: str = Opt(choices=("bash", "zsh", "fish"), default=REQUIRED, argument=True, help="The shell.")
