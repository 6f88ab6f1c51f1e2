"""`lmforge model ...`: make and transform model directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from ._cli import command, group, print_path

app = group("Make and transform model directories (quantize, init).")


@command(app, "quantize")
def quantize(
    model: Annotated[str, typer.Argument(help="Model directory or Hub id.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the quantized model (printed on stdout).")],
    method: Annotated[Literal["bnb-nf4", "bnb-int8", "gptq", "awq"], typer.Option(
        help="bitsandbytes NF4/int8 (no calibration), GPTQ (GPTQModel; CPU or GPU), AWQ (GPTQModel; CUDA).")] = "bnb-int8",
    bits: Annotated[Optional[int], typer.Option(help="Bits per weight (gptq: 2, 3, 4, 8).")] = None,
    group_size: Annotated[int, typer.Option(help="gptq/awq: weights per quantization group (-1: per column).")] = 128,
    calib: Annotated[Optional[str], typer.Option(help="Calibration data: an aligned or packed dataset.")] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration rows to use.")] = 128,
    eval_data: Annotated[Optional[str], typer.Option(
        help="Held-out data for perplexity (default: the last rows of --calib, kept out of calibration).")] = None,
    eval_samples: Annotated[int, typer.Option(help="Held-out rows for perplexity.")] = 32,
    max_length: Annotated[int, typer.Option(help="Tokens per calibration/evaluation row.")] = 512,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
) -> None:
    """Quantize a model; prints perplexity before and after (stderr) and the directory (stdout)."""
    from lmforge.shared.core import log
    from lmforge.shared.model import quantize as quantizing

    log.quiet_libraries()
    with log.stdout_guard():
        quantizing.quantize(model, output, method, bits, group_size, calib, calib_samples, eval_data, eval_samples,
                            max_length, overwrite, seed)
    print_path(output)


@command(app, "init")
def init(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the new model (printed on stdout).")],
    arch: Annotated[Literal["llama", "qwen2", "qwen3", "mistral"], typer.Option(help="Architecture.")] = "llama",
    layers: Annotated[int, typer.Option(help="Decoder layers.")] = 4,
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = 128,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    kv_heads: Annotated[Optional[int], typer.Option(help="Key/value heads (default: --heads).")] = None,
    intermediate: Annotated[Optional[int], typer.Option(help="MLP width (default 4 x hidden).")] = None,
    vocab_size: Annotated[int, typer.Option(help="With --train-tokenizer: the vocabulary size to learn.")] = 2048,
    max_position: Annotated[int, typer.Option(help="Context length.")] = 1024,
    tokenizer: Annotated[Optional[str], typer.Option(help="Use this model's tokenizer (directory or Hub id).")] = None,
    train_tokenizer: Annotated[Optional[str], typer.Option(
        help="Train a byte-level BPE tokenizer (ChatML chat template) on this aligned dataset.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the initial weights.")] = 42,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
) -> None:
    """A randomly initialised model in Hugging Face format (with a tokenizer trained on data when asked)."""
    from lmforge.shared.core import log
    from lmforge.shared.model import modelinit

    log.quiet_libraries()
    with log.stdout_guard():
        modelinit.init_model(output, arch, layers, hidden, heads, kv_heads, intermediate, vocab_size, max_position,
                             tokenizer, train_tokenizer, seed, overwrite)
    print_path(output)
