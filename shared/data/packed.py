"""Packed data as the trainers and evaluators read it: the checked, memory-mapped dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.shared.core.errors import BadInput


@dataclass
class PackedData:
    path: Path
    meta: dict
    rows: int
    dataset: Any   # datasets.Dataset (an untyped library), memory-mapped


def open_packed(source: str, stages: tuple[str, ...], what: str = "--data") -> PackedData:
    from lmforge.shared.core.arrowio import open_arrow, spool_stdin
    from lmforge.shared.core.meta import require

    opened = spool_stdin(open_arrow(source))
    require(opened.meta, opened.name, kind="packed", stages=stages,
            hint=f"pack it with `lmforge data pack --stage {stages[0]}`")
    opened.check_complete()   # a cut file must not pass for whole (datasets would read it as it is)
    import datasets

    datasets.disable_progress_bars()
    assert opened.path is not None  # spool_stdin() put a piped input in a file
    path = Path(opened.path)
    if path.is_dir():
        dataset = datasets.load_from_disk(str(path))
    else:
        dataset = datasets.Dataset.from_file(str(path))
    if len(dataset) == 0:
        raise BadInput(f"{what} {source}: has no rows")
    return PackedData(path, opened.meta, len(dataset), dataset)


def check_tokenizer(data: PackedData, tokenizer, model: str, what: str = "--data") -> None:
    """Refuse data packed with another tokenizer, naming both."""
    from lmforge.shared.modeldir.tokenizers import fingerprint

    packed = data.meta.get("tokenizer") or {}
    mine = fingerprint(tokenizer)
    if packed.get("fingerprint") and packed["fingerprint"] != mine:
        raise BadInput(f"{what} {data.path}: packed with tokenizer {packed.get('name')} "
                       f"(fingerprint {packed['fingerprint']}), but --model {model} has tokenizer {mine}",
                       f"pack it again with `lmforge data pack --model {model}`")


def longest_sequence(data: PackedData, generated: int = 0) -> tuple[int, int]:
    """(tokens, row number from 1) of the longest sequence the model reads from packed data: a row,
    an example of a neat-packed row (its positions start again), a prompt with its longest answer,
    or a prompt plus `generated` sampled tokens (ppo data)."""
    import numpy as np
    import pyarrow.compute as pc

    table = data.dataset.data

    def per_row(name: str) -> np.ndarray:
        return pc.list_value_length(table.column(name)).to_numpy().astype(np.int64)

    names = table.column_names
    if data.meta.get("packing") == "neat" and "lengths" in names:
        longest = np.zeros(data.rows, dtype=np.int64)
        start = 0
        for chunk in table.column("lengths").chunks:
            if len(chunk.flatten()):
                np.maximum.at(longest, start + pc.list_parent_indices(chunk).to_numpy(),
                              chunk.flatten().to_numpy())
            start += len(chunk)
    elif "input_ids" in names:
        longest = per_row("input_ids")
    elif data.meta.get("stage") == "ppo":
        longest = per_row("prompt_ids") + generated
    else:
        answers = [per_row(n) for n in ("chosen_ids", "rejected_ids", "response_ids") if n in names]
        longest = per_row("prompt_ids") + (np.maximum.reduce(answers) if answers else 0)
    row = int(np.argmax(longest))
    return int(longest[row]), row + 1
