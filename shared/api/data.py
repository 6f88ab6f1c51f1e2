"""`lmforge data ...` as functions: align, merge, split, pack, stats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.shared.api._options import options
from lmforge.shared.core.commands.data import DataAlign, DataMerge, DataPack, DataSplit, DataStats


def align(o: DataAlign | None = None, **values: Any) -> Path:
    """Source files -> one aligned Arrow dataset at `output`; returns its path."""
    from lmforge.shared.data.align import align_dataset

    o = options(DataAlign, o, values, output_required=True)
    align_dataset(o)
    return Path(o.output)   # type: ignore[arg-type]


def merge(o: DataMerge | None = None, **values: Any) -> Path:
    """Datasets of one kind and stage -> one, at `output`; returns its path."""
    from lmforge.shared.data.mixing import merge_datasets

    o = options(DataMerge, o, values, output_required=True)
    merge_datasets(o)
    return Path(o.output)   # type: ignore[arg-type]


def split(o: DataSplit | None = None, **values: Any) -> tuple[Path, Path]:
    """A dataset -> `output`/train.arrow and `output`/val.arrow; returns both paths."""
    from lmforge.shared.data.mixing import split_dataset

    o = options(DataSplit, o, values)
    split_dataset(o)
    return o.output / "train.arrow", o.output / "val.arrow"


def pack(o: DataPack | None = None, **values: Any) -> Path:
    """Aligned data tokenized for a training stage, at `output`; returns its path (the figures —
    examples, rows, truncation — are in the file's metadata and `stats()`)."""
    from lmforge.shared.data.packing import pack_dataset

    o = options(DataPack, o, values, output_required=True)
    pack_dataset(o)
    return Path(o.output)   # type: ignore[arg-type]


def stats(o: DataStats | None = None, **values: Any) -> dict:
    """Token statistics of packed data: lengths, truncation, packing efficiency, loss share."""
    from lmforge.shared.core.arrowio import open_arrow
    from lmforge.shared.data import packstats

    o = options(DataStats, o, values)
    return packstats.compute(open_arrow(o.input))
