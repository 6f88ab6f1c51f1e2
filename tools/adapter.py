"""`lmforge adapter merge`: fold adapters into their base model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from ._cli import command, group, print_path

app = group("Work with PEFT adapters (LoRA, DoRA, PiSSA) made by `lmforge train`.")


@command(app, "merge")
def merge(
    base: Annotated[str, typer.Argument(help="The base model the adapters were trained on (directory or Hub id).")],
    adapters: Annotated[list[str], typer.Argument(help="Adapter directories, applied in order.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the merged model (printed on stdout).")],
    dtype: Annotated[Literal["auto", "fp32", "bf16", "fp16"], typer.Option(
        help="Weights' dtype in the merged model (auto: as the base is stored).")] = "auto",
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 2GB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
) -> None:
    """Merge adapters into the base model: a plain Hugging Face model directory."""
    from lmforge.shared.core import log
    from lmforge.shared.model import merging

    log.quiet_libraries()
    with log.stdout_guard():
        out = merging.merge(base, adapters, output, dtype, max_shard_size, overwrite)
    print_path(out)
