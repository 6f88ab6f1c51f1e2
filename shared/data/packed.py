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
    from lmforge.shared.data.tokenizing import fingerprint

    packed = data.meta.get("tokenizer") or {}
    mine = fingerprint(tokenizer)
    if packed.get("fingerprint") and packed["fingerprint"] != mine:
        raise BadInput(f"{what} {data.path}: packed with tokenizer {packed.get('name')} "
                       f"(fingerprint {packed['fingerprint']}), but --model {model} has tokenizer {mine}",
                       f"pack it again with `lmforge data pack --model {model}`")
