"""`data align`: raw example files -> aligned record batches, streaming.

Each input is read row by row, converted with its format's converter (converters.py), validated,
and collected column-wise into record batches, so memory stays bounded whatever the input size.
A bad row stops the run naming the file and row/line, unless skipping is asked for; then the
skipped rows are counted by reason.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
from lmforge.shared.core import log
from lmforge.shared.core.arrowio import BATCH_ROWS
from lmforge.shared.core.commands.data import DataAlign
from lmforge.shared.core.errors import BadInput, close_names
from lmforge.shared.data import aligned, converters, dataset_info, format_detection, formats, sources


@dataclass
class Planned:
    source: sources.RawSource
    spec: formats.Spec
    rows: Iterator[tuple[dict, int]]


@dataclass
class Report:
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_skipped: dict = field(default_factory=dict)
    per_source: list = field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        key = re.sub(r"\d+", "N", reason)
        self.skipped[key] += 1
        self.first_skipped.setdefault(key, where)

    def as_dict(self) -> dict:
        return {"rows": self.rows, "skipped": dict(sorted(self.skipped.items())),
                "sources": self.per_source}


def plan(options: DataAlign) -> list[Planned]:
    """Open every input and decide its format (peeking at its first row)."""
    if options.format not in formats.FORMATS:
        raise BadInput(f"unknown format '{options.format}'", close_names(options.format, formats.FORMATS))
    columns = formats.user_columns(options.columns)
    tags = formats.user_tags(options.tags)
    if options.dataset_info is not None:
        return _plan_dataset_info(options, columns, tags)
    if options.name:
        raise BadInput("--name needs --dataset-info", "pass --dataset-info DIR/dataset_info.json")
    planned = []
    for source in sources.discover(options.inputs or ["-"]):
        rows = source.rows()
        first = next(rows, None)
        if first is None:
            what = "a header and no rows" if source.name.lower().endswith(".csv") else "no examples"
            raise BadInput(f"{source.name}: empty file, {what}", "check the file")
        meta_stage = source.meta.get("stage") if source.meta.get("kind") == "aligned" else None
        names = list(first[0].keys()) if isinstance(first[0], dict) else []
        spec = format_detection.detect(options.format, names, first[0], columns, tags, source.name, meta_stage)
        spec.media_dir = _media_dir(source)
        planned.append(Planned(source, spec, itertools.chain([first], rows)))
    return planned


def _plan_dataset_info(options: DataAlign, columns: dict, tags: dict) -> list[Planned]:
    assert options.dataset_info is not None  # the caller checked
    info_path = Path(options.dataset_info)
    if info_path.is_dir():
        info_path = info_path / "dataset_info.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{info_path}: no such file", "pass the path of dataset_info.json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"{info_path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise BadInput(f"{info_path}: expected a mapping of dataset names to entries")
    if not options.name:
        raise BadInput("--dataset-info needs --name", "name the entry (or entries) to align")
    if options.inputs:
        raise BadInput("give either input files or --dataset-info/--name, not both")
    planned = []
    for name in options.name:
        spec, location = dataset_info.from_dataset_info(info, name, str(info_path))
        spec.columns.update({k: v for k, v in columns.items() if k in spec.columns})
        spec.tags.update(tags)
        if "file" in location:
            found = sources.discover([str(info_path.parent / location["file"])])
        else:
            found = [sources.RawSource(name, "hub", hub_options=location["hub"])]
        for source in found:
            planned.append(Planned(source, spec, source.rows()))
        spec.media_dir = str(info_path.parent)  # LLaMA-Factory's media_dir: the dataset folder
    return planned


def _media_dir(source: sources.RawSource) -> str | None:
    """Relative image paths in a file are looked up next to the file (stdin: the working directory)."""
    if source.path is None:
        return None
    path = Path(source.path)
    return str(path if path.is_dir() else path.parent)


def stage_of(planned: list[Planned]) -> str:
    stages = {p.spec.stage for p in planned}
    if len(stages) > 1:
        described = ", ".join(f"{p.source.name} is {p.spec.stage}" for p in planned)
        raise BadInput(f"inputs are for different stages ({described})", "align them in separate calls")
    return stages.pop()


def run(planned: list[Planned], options: DataAlign, report: Report) -> Iterator[pa.RecordBatch]:
    """Yield aligned record batches for all inputs, in input order."""
    stage = stage_of(planned)
    builder = aligned.Builder(stage)
    hint = "fix the row, map columns with --columns, or pass --skip-invalid to drop such rows"
    with log.Progress("align", unit="rows") as progress:
        for item in planned:
            convert = converters.converter(item.spec)
            kept = 0
            reservoir: list = []
            rng = random.Random(options.seed)
            seen = 0
            for row, pos in item.rows:
                seen += 1
                try:
                    converted = convert(row)
                except aligned.RowError as exc:
                    reason = str(exc)
                    if reason.startswith("missing '") and isinstance(row, dict):
                        reason += f" (the row has: {', '.join(map(str, row)) or 'nothing'})"
                    if not options.skip_invalid:
                        raise BadInput(f"{item.source.where(pos)}: {reason}", hint) from None
                    report.skip(str(exc), item.source.where(pos))
                    continue
                if options.max_samples is not None and options.sample == "random":
                    # reservoir sampling: a uniform sample of max_samples rows, kept in input order
                    if len(reservoir) < options.max_samples:
                        reservoir.append((kept, converted))
                    else:
                        j = rng.randrange(kept + 1)
                        if j < options.max_samples:
                            reservoir[j] = (kept, converted)
                    kept += 1
                    continue
                builder.add(*converted)
                kept += 1
                if builder.n >= BATCH_ROWS:
                    report.rows += builder.n
                    progress.advance(builder.n)
                    yield builder.flush()
                if options.max_samples is not None and kept >= options.max_samples:
                    break
            if reservoir:
                for _, converted in sorted(reservoir, key=lambda pair: pair[0]):
                    builder.add(*converted)
                kept = len(reservoir)
            report.per_source.append({"source": item.source.name, "format": item.spec.describe(),
                                      "rows": kept})
            if builder.n:
                report.rows += builder.n
                progress.advance(builder.n)
                yield builder.flush()
    if report.skipped:
        total = sum(report.skipped.values())
        details = "; ".join(f"{n} x {reason} (first: {report.first_skipped[reason]})"
                            for reason, n in report.skipped.most_common())
        log.warn(f"skipped {total} invalid row(s): {details}")
    if report.rows == 0:
        raise BadInput("no valid examples in the input" + (" (all rows were skipped)" if report.skipped else ""),
                       "check the format and the columns")


def align_dataset(o: DataAlign) -> None:
    """`data align`: the inputs (or stdin) as one aligned Arrow dataset, written to `o.output`
    (atomically) or to stdout; what each input was read as is said on stderr."""
    from lmforge.shared.core import arrowio, meta

    arrowio.check_output(o.output)
    planned = plan(o)
    stage = stage_of(planned)
    for item in planned:
        how = "detected" if o.format == "auto" and o.dataset_info is None else "reading"
        log.info(f"align: {item.source.name}: {how} {item.spec.describe()}")
    metadata = {"kind": "aligned", "stage": stage, "schema_version": aligned.VERSION, "provenance": [meta.step(
        o.command, o.values(),
        inputs=[{"source": p.source.name, "format": p.spec.describe()} for p in planned])]}
    report = Report()
    with arrowio.ArrowOutput(o.output, aligned.schema(stage), metadata) as out:
        for batch in run(planned, o, report):
            out.write(batch)
        out.set_summary(report.as_dict())
