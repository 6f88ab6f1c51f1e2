"""`data merge` and `data split`: combining and dividing Arrow datasets, batch by batch.

Merge strategies (the same ones as `datasets.interleave_datasets`):
- concat: the inputs one after the other;
- interleave-under: one row at a time, round robin or drawn with --probs, stopping as soon as
  one input runs out (undersampling: every input contributes at most its size);
- interleave-over: the same, but an input that runs out starts again from its beginning, until
  every input has been used up at least once (oversampling).
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import pyarrow as pa
from lmforge.shared.core.arrowio import BATCH_ROWS, ArrowSource, open_arrow, spool_stdin
from lmforge.shared.core.commands.data import DataMerge, DataSplit
from lmforge.shared.core.errors import BadInput


def check_compatible(inputs: list[ArrowSource]) -> dict:
    """All inputs must be the same kind and stage with the same columns; returns the shared meta."""
    first = inputs[0]
    base = first.meta
    if not base.get("kind"):
        raise BadInput(f"{first.name}: has no lmforge metadata", "make it with `lmforge data align` first")
    for other in inputs[1:]:
        meta = other.meta
        for key in ("kind", "stage"):
            if meta.get(key) != base.get(key):
                raise BadInput(f"cannot merge {first.name} ({key} {base.get(key)!r}) with "
                               f"{other.name} ({key} {meta.get(key)!r})",
                               "merge datasets of one kind and stage only")
        if base.get("kind") == "packed":
            for key in sorted(set(base) | set(meta)):
                if key not in ("provenance", "stats") and meta.get(key) != base.get(key):
                    raise BadInput(f"cannot merge packed data with different {key}: {first.name} has "
                                   f"{base.get(key)!r}, {other.name} has {meta.get(key)!r}",
                                   "pack them with the same settings")
        if other.schema.remove_metadata() != first.schema.remove_metadata():
            if base.get("kind") == "aligned":
                from lmforge.shared.data.aligned import version_of

                versions = version_of(base, first.schema), version_of(meta, other.schema)
                if versions[0] != versions[1]:
                    raise BadInput(f"cannot merge {first.name} (aligned schema v{versions[0]}) with {other.name} "
                                   f"(v{versions[1]})", "re-run `lmforge data align` on the older one")
            raise BadInput(f"cannot merge {first.name} and {other.name}: their columns differ",
                           "merge datasets made by the same lmforge commands")
    return {k: v for k, v in base.items() if k not in ("provenance", "stats")}


def parse_probs(text: str | None, n: int) -> list[float] | None:
    if not text:
        return None
    try:
        probs = [float(x) for x in text.split(",")]
    except ValueError:
        raise BadInput(f"--probs {text!r}: not a list of numbers", "write e.g. --probs 0.7,0.3") from None
    if len(probs) != n:
        raise BadInput(f"--probs has {len(probs)} values for {n} inputs", "give one probability per input")
    if not all(math.isfinite(p) and p >= 0 for p in probs) or sum(probs) <= 0:
        raise BadInput(f"--probs {text!r}: probabilities must be finite, >= 0 and not all 0")
    total = sum(probs)
    if abs(total - 1) > _PROBS_TOLERANCE:   # a typo (0.7,0.7) is not silently rescaled to 0.5,0.5
        raise BadInput(f"--probs {text!r}: probabilities must sum to 1 (these sum to {total:g})",
                       "e.g. --probs 0.7,0.3")
    return [p / total for p in probs]   # exactly 1 for numpy, whatever the rounding of the decimals


_PROBS_TOLERANCE = 1e-6


_DRAWS = 1000


class _Cursor:
    """Rows of one input, one at a time; knows at once when its last row has been taken."""

    def __init__(self, source: ArrowSource):
        self.source = source
        self.exhausted_once = False
        self.done = False
        self._start()

    def _start(self) -> None:
        reopened = self.source if self.source.path is None else open_arrow(self.source.path)
        self._batches = reopened.batches()
        self._batch = next(self._batches, None)
        self._row = 0
        self.done = False
        if self._batch is None:
            raise BadInput(f"{self.source.name}: has no rows", "remove empty inputs")

    def take(self) -> tuple[pa.RecordBatch, int]:
        if self.done:  # oversampling: start this input again
            self._start()
        assert self._batch is not None  # _start() refuses an input without rows
        taken = (self._batch, self._row)
        self._row += 1
        if self._row >= self._batch.num_rows:
            self._batch, self._row = next(self._batches, None), 0
            if self._batch is None:
                self.done = self.exhausted_once = True
        return taken


def merge(inputs: list[ArrowSource], mix: str, probs: list[float] | None, seed: int) -> Iterator[pa.RecordBatch]:
    """Rows in the order `datasets.interleave_datasets` gives (stopping_strategy first_exhausted
    for interleave-under, all_exhausted for interleave-over; the same draws for the same seed):
    round robin stops at the end of a round (the shortest input's length in rounds, or the
    longest's when oversampling); with probabilities, at the draw that exhausts the first input
    (or, oversampling, the last)."""
    if mix == "concat":
        for source in inputs:
            yield from source.batches()
        return
    over = mix == "interleave-over"
    if over:  # rereading needs files: spool a piped input first
        inputs = [spool_stdin(s) for s in inputs]
    cursors = [_Cursor(s) for s in inputs]
    rng = np.random.default_rng(seed)
    pending: list[pa.RecordBatch] = []
    draws: np.ndarray
    step, draws = 0, np.empty(0, dtype=np.int64)
    while True:
        if probs is None:
            index = step % len(cursors)
        else:
            if step % _DRAWS == 0:   # datasets draws its sources in blocks of 1000
                draws = rng.choice(len(cursors), size=_DRAWS, p=probs)
            index = int(draws[step % _DRAWS])
        step += 1
        cursor = cursors[index]
        batch, row = cursor.take()
        pending.append(batch.slice(row, 1))
        if len(pending) >= BATCH_ROWS:
            yield from _combine(pending)
            pending = []
        if probs is None:
            if step % len(cursors) == 0 and (all(c.exhausted_once for c in cursors) if over
                                             else any(c.exhausted_once for c in cursors)):
                break
        elif cursor.done and (not over or all(c.exhausted_once for c in cursors)):
            break
    if pending:
        yield from _combine(pending)


def _combine(pieces: list[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    table = pa.Table.from_batches(pieces).combine_chunks()
    yield from table.to_batches(max_chunksize=BATCH_ROWS)


def count_rows(source: ArrowSource) -> int:
    return sum(b.num_rows for b in open_arrow(source.path).batches())


def split_masks(n: int, val_size: float, seed: int) -> np.ndarray:
    """A boolean array, True for the rows that go to validation."""
    if not np.isfinite(val_size):
        raise BadInput(f"--val-size {val_size}: not a number", "give a fraction (0.1) or a row count (500)")
    if val_size <= 0:
        raise BadInput(f"--val-size {val_size}: must be > 0", "give a fraction (0.1) or a row count (500)")
    k = int(round(n * val_size)) if val_size < 1 else int(val_size)
    if val_size >= 1 and val_size != int(val_size):
        raise BadInput(f"--val-size {val_size}: a count must be a whole number")
    if k >= n:
        raise BadInput(f"--val-size {val_size}: asks for {k} validation rows of {n}",
                       "leave some rows for training")
    if k == 0:
        raise BadInput(f"--val-size {val_size}: gives no validation row for {n} rows", "use a larger size")
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    return mask


def merge_datasets(o: DataMerge) -> None:
    """`data merge`: datasets of one kind and stage as one, written to `o.output` or stdout."""
    from lmforge.shared.core import arrowio, meta

    arrowio.check_output(o.output)
    sources = [open_arrow(i) for i in o.inputs]
    shared_meta = check_compatible(sources)
    weights = parse_probs(o.probs, len(sources))
    metadata = {**shared_meta, "provenance": [meta.step(
        o.command, o.values(), inputs=[{"source": s.name, "provenance": s.meta.get("provenance", [])} for s in sources])]}
    with arrowio.ArrowOutput(o.output, sources[0].schema, metadata) as out:
        for batch in merge(sources, o.mix, weights, o.seed):
            out.write(batch)


def split_dataset(o: DataSplit) -> tuple[int, int]:
    """`data split`: OUT/train.arrow and OUT/val.arrow, random rows in their order; returns the
    row counts. A failed split leaves no directory it created behind."""
    import shutil

    from lmforge.shared.core import arrowio, meta

    output = o.output
    if output.exists() and not output.is_dir():
        raise BadInput(f"{output}: exists and is not a directory", "give a directory to -o")
    source = spool_stdin(open_arrow(o.input))
    if not source.meta.get("kind"):
        raise BadInput(f"{source.name}: has no lmforge metadata", "make it with `lmforge data align` first")
    mask = split_masks(count_rows(source), o.val_size, o.seed)
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in source.meta.items() if k != "provenance"}
    outputs = {}
    for part in ("train", "val"):
        metadata = {**base, "provenance": source.meta.get("provenance", []) + [meta.step(o.command, o.values(),
                                                                                            part=part)]}
        outputs[part] = arrowio.ArrowOutput(output / f"{part}.arrow", source.schema, metadata)
    try:
        with outputs["train"] as train, outputs["val"] as val:
            start = 0
            for batch in open_arrow(source.path).batches():
                chosen = pa.array(mask[start:start + batch.num_rows])
                start += batch.num_rows
                val.write(batch.filter(chosen))
                train.write(batch.filter(pa.compute.invert(chosen)))
    except BaseException:
        if created:   # a failed split (full disk, a cut input) leaves no empty directory behind
            shutil.rmtree(output, ignore_errors=True)
        raise
    return train.rows, val.rows
