"""`eval mmlu | cmmlu | ceval | generate | perplexity | rm`, `serve`, `chat`, `board`, `completion`."""

from __future__ import annotations

from pathlib import Path

from lmforge.shared.core.commands.common import (ADAPTER, ATTENTION, BATCH_SIZE, JSON_OUT, MAX_NEW_TOKENS, MAX_SAMPLES,
                                                  MODEL, REWARD, SEED, STREAM_OUTPUT, TEMPERATURE, TEMPLATE, TOP_P)
from lmforge.shared.core.options import REQUIRED, Opt, Options, declaration


@declaration
class EvalModel(Options):
    model: str = MODEL
    adapter: str | None = ADAPTER
    attn: str = ATTENTION


@declaration
class EvalBenchmark(EvalModel):
    """mmlu, cmmlu and ceval: the seed's k-shot letter scoring."""

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
    data: str = Opt(default=REQUIRED, flags=("--data", "-d"), help="Aligned sft data (prompts with reference answers).")
    template: str = TEMPLATE.but(help="auto (what the model was trained with, else its chat template) or a name.")
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = TEMPERATURE.but(default=0.0, help="Sampling temperature (0: greedy, the default).")
    top_p: float = TOP_P
    seed: int = SEED.but(help="Sampling seed.")
    batch_size: int = BATCH_SIZE.but(default=8, help="Prompts generated together.", min=1)
    max_samples: int | None = MAX_SAMPLES
    output: Path | None = STREAM_OUTPUT.but(help="Save predictions: .jsonl (JSON lines) or .arrow.")
    json_out: bool = JSON_OUT


@declaration
class EvalPerplexity(EvalModel):
    data: str = Opt(default=REQUIRED, flags=("--data", "-d"), help="Packed pt or sft data.")
    batch_size: int = BATCH_SIZE.but(default=4, help="Rows per forward pass.", min=1)
    json_out: bool = JSON_OUT


@declaration
class EvalRM(Options):
    model: str = MODEL.but(help="The base model the reward model was trained on.")
    reward: str = REWARD
    data: str = Opt(default=REQUIRED, flags=("--data", "-d"), help="Pairs packed with `data pack --stage rm`.")
    batch_size: int = BATCH_SIZE.but(default=8, help="Pairs per forward pass.", min=1)
    attn: str = ATTENTION
    json_out: bool = JSON_OUT


@declaration
class Serve(Options):
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
    model: str = MODEL
    adapter: str | None = ADAPTER.but(help="A PEFT adapter to use.")
    template: str = TEMPLATE.but(help="auto or a template name.")
    system: str = Opt(default="", help="A system prompt.")
    max_tokens: int = Opt(default=512, min=1, help="Longest answer.")
    temperature: float = TEMPERATURE
    attn: str = ATTENTION


@declaration
class Board(Options):
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
    shell: str = Opt(choices=("bash", "zsh", "fish"), default=REQUIRED, argument=True, help="The shell.")
