"""`model quantize | init | export` and `adapter merge`."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from lmforge.shared.core.commands.common import ADAPTER, ATTENTION, MODEL, OUTPUT, OVERWRITE, SEED, TEMPLATE
from lmforge.shared.core.options import REQUIRED, Opt, Options, declaration

QUANT_METHODS = ("bnb-nf4", "bnb-int8", "gptq", "awq")
ARCHS = ("llama", "qwen2", "qwen3", "mistral")
EXPORT_QUANTS = ("f16", "bf16", "f32", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s",
                 "q4_0", "q4_1", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")
MERGE_DTYPES = ("auto", "fp32", "bf16", "fp16")


@declaration
class ModelQuantize(Options):
    summary: ClassVar[str] = "Quantize a model; prints perplexity before and after (stderr) and the directory (stdout)."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge model quantize ./merged -o merged-int8 --method bnb-int8 --eval-data heldout.arrow",
        "lmforge model quantize ./merged -o merged-gptq --method gptq --bits 4 --group-size 128 --calib calib.arrow",
    )

    model: str = MODEL.but(flags=(), argument=True)
    output: Path = OUTPUT.but(help="Directory for the quantized model (printed on stdout).")
    method: str = Opt(choices=QUANT_METHODS, default="bnb-int8",
                      help="bitsandbytes NF4/int8 (no calibration), GPTQ (GPTQModel; CPU or GPU), AWQ (GPTQModel; "
                           "CUDA).")
    bits: int | None = Opt(default=None, help="Bits per weight (gptq: 2, 3, 4, 8).")
    group_size: int = Opt(default=128, help="gptq/awq: weights per quantization group (-1: per column).")
    calib: str | None = Opt(default=None, help="Calibration data: an aligned or packed dataset.")
    calib_samples: int = Opt(default=128, help="Calibration rows to use.")
    eval_data: str | None = Opt(
        default=None, help="Held-out data for perplexity (default: the last rows of --calib, kept out of calibration).")
    eval_samples: int = Opt(default=32, help="Held-out rows for perplexity.")
    max_length: int = Opt(default=512, help="Tokens per calibration/evaluation row.")
    attn: str = ATTENTION
    overwrite: bool = OVERWRITE
    seed: int = SEED


@declaration
class ModelInit(Options):
    summary: ClassVar[str] = ("A randomly initialised model in Hugging Face format (with a tokenizer trained on data "
                              "when asked).")
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge model init -o tiny --arch llama --layers 4 --hidden 128 --heads 4 --train-tokenizer aligned.arrow",
        "lmforge model init -o small --arch qwen3 --layers 8 --hidden 256 --heads 8 --kv-heads 2 --tokenizer ./base",
    )

    output: Path = OUTPUT.but(help="Directory for the new model (printed on stdout).")
    arch: str = Opt(choices=ARCHS, default="llama", help="Architecture.")
    layers: int = Opt(default=4, help="Decoder layers.")
    hidden: int = Opt(default=128, help="Hidden size.")
    heads: int = Opt(default=4, help="Attention heads.")
    kv_heads: int | None = Opt(default=None, help="Key/value heads (default: --heads).")
    intermediate: int | None = Opt(default=None, help="MLP width (default 4 x hidden).")
    vocab_size: int = Opt(default=2048, help="With --train-tokenizer: the vocabulary size to learn.")
    max_position: int = Opt(default=1024, help="Context length.")
    tokenizer: str | None = Opt(default=None, help="Use this model's tokenizer (directory or Hub id).")
    train_tokenizer: str | None = Opt(
        default=None, help="Train a byte-level BPE tokenizer (ChatML chat template) on this aligned dataset.")
    seed: int = SEED.but(help="Random seed of the initial weights.")
    overwrite: bool = OVERWRITE


@declaration
class ModelExport(Options):
    summary: ClassVar[str] = ("A model (plus an adapter) as one GGUF file for llama.cpp / Ollama / LM Studio; prints "
                              "its path.")
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge model export ./base --adapter runs/sft -o tuned.gguf",
        "lmforge model export merged -o tuned-q4.gguf --quant q4_k_m --ollama",
        "lmforge model export ./base --adapter runs/sft -o tuned.gguf --template chatml --system \"Be brief.\" "
        "--ollama",
    )

    model: str = MODEL.but(flags=(), argument=True, help="Model directory (a base model, a merged or fully trained one).")
    adapter: str | None = ADAPTER.but(help="A PEFT adapter trained on MODEL: merged in on the way.")
    output: Path = OUTPUT.but(help="The GGUF file to write, e.g. model.gguf (printed on stdout).")
    format: str = Opt(choices=("gguf",), default="gguf", help="Output format: gguf (llama.cpp, Ollama, LM Studio).")
    quant: str = Opt(choices=EXPORT_QUANTS, default="f16",
                     help="Weights: f16/bf16/f32 as converted, or quantized by llama.cpp's quantizer (q8_0, q4_k_m, "
                          "...).")
    template: str = TEMPLATE.but(help="Chat template written into the file: auto (what the model was trained with, "
                                      "else its own), a template name, or none.")
    system: str | None = Opt(default=None,
                             help="--ollama: the Modelfile's SYSTEM prompt (default: the template's own, if any).")
    ollama: bool = Opt(default=False, help="Also write an Ollama Modelfile beside the file (OUT.Modelfile).")
    overwrite: bool = OVERWRITE.but(help="Replace existing output files.")


@declaration
class AdapterMerge(Options):
    summary: ClassVar[str] = "Merge adapters into the base model: a plain Hugging Face model directory."
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge adapter merge ./base runs/sft -o merged",
        "lmforge adapter merge ./base runs/sft runs/dpo -o merged --dtype bf16 --max-shard-size 2GB",
    )

    base: str = Opt(default=REQUIRED, argument=True,
                    help="The base model the adapters were trained on (directory or Hub id).")
    adapters: list[str] = Opt(default=REQUIRED, argument=True, help="Adapter directories, applied in order.")
    output: Path = OUTPUT.but(help="Directory for the merged model (printed on stdout).")
    dtype: str = Opt(choices=MERGE_DTYPES, default="auto",
                     help="Weights' dtype in the merged model (auto: as the base is stored).")
    max_shard_size: str = Opt(default="5GB", help="Largest safetensors shard, e.g. 2GB.")
    overwrite: bool = OVERWRITE
