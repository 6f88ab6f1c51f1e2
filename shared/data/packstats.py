"""`data stats`: what packed data holds, in tokens."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lmforge.shared.core.arrowio import ArrowSource
from lmforge.shared.core.meta import require
from lmforge.shared.data.truncation import NAMES

IGNORE = -100


def _dist(values: list[np.ndarray]) -> dict:
    data = np.concatenate(values) if values else np.zeros(0, dtype=np.int64)
    if not len(data):
        return {"count": 0}
    q = np.percentile(data, [50, 90, 99])
    return {"count": int(len(data)), "min": int(data.min()), "mean": round(float(data.mean()), 1),
            "p50": int(q[0]), "p90": int(q[1]), "p99": int(q[2]), "max": int(data.max()),
            "total": int(data.sum())}


def compute(source: ArrowSource) -> dict:
    meta = source.meta
    require(meta, source.name, kind="packed",
            hint="`data stats` reads packed data; for aligned data use `data show --stats`")
    list_columns = [f.name for f in source.schema if pa.types.is_list(f.type) and f.name not in ("lengths", "images")]
    image_token = (meta.get("vision") or {}).get("image_token_id")   # vision-language data
    images: list[np.ndarray] = []
    image_tokens: list[np.ndarray] = []
    lengths: dict[str, list[np.ndarray]] = {name: [] for name in list_columns}
    examples: list[np.ndarray] = []
    loss = tokens = rows = 0
    labels_true = 0
    for batch in source.batches():
        rows += batch.num_rows
        for name in list_columns:
            lengths[name].append(pc.list_value_length(batch.column(name)).to_numpy(zero_copy_only=False))
        if "lengths" in batch.schema.names:
            examples.append(pc.list_flatten(batch.column("lengths")).to_numpy(zero_copy_only=False))
        if "images" in batch.schema.names:
            images.append(pc.list_value_length(batch.column("images")).to_numpy(zero_copy_only=False))
            if image_token is not None:
                ids = batch.column("input_ids")
                hits = pc.equal(pc.list_flatten(ids), image_token).cast(pa.int64()).to_numpy(zero_copy_only=False)
                offsets = ids.offsets.to_numpy() - ids.offsets[0].as_py()
                image_tokens.append(np.add.reduceat(hits, offsets[:-1]) * (np.diff(offsets) > 0)
                                    if len(hits) else np.zeros(batch.num_rows, dtype=np.int64))
        if "labels" in batch.schema.names:
            flat = pc.list_flatten(batch.column("labels")).to_numpy(zero_copy_only=False)
            loss += int(np.count_nonzero(flat != IGNORE))
            tokens += len(flat)
        if "label" in batch.schema.names:
            labels_true += int(pc.sum(batch.column("label").cast(pa.int64())).as_py() or 0)
    info = {"source": source.name, "stage": meta.get("stage"), "template": (meta.get("template") or {}).get("name", "(none: pt)"),
            "tokenizer": (meta.get("tokenizer") or {}).get("name"), "cutoff": meta.get("cutoff"),
            "packing": meta.get("packing"), "rows": rows}
    info["lengths"] = {name: _dist(v) for name, v in lengths.items() if name != "labels"}
    if examples:
        info["examples"] = _dist(examples)
    if images:
        info["images"] = {"per_row": _dist(images), "image_tokens_per_row": _dist(image_tokens)}
    if tokens:
        info["loss_fraction"] = round(loss / tokens, 4)
    cutoff = meta.get("cutoff")
    if meta.get("packing") not in (None, "none") and cutoff and rows:
        total = info["lengths"].get("input_ids", {}).get("total", 0)
        info["packing_efficiency"] = round(total / (rows * cutoff), 4)
    if "label" in source.schema.names:
        info["labels"] = {"true": labels_true, "false": rows - labels_true}
    summary = source.summary() or {}
    for key in ("examples", "truncated", "dropped"):
        if key in summary:
            info.setdefault("pack", {})[key] = summary[key]
    # what the cuts took (data pack --truncation): by kind, with the first rows of the aligned input
    cuts = {key: summary[key] for key in ("truncation", "lost", "turns_removed", "dropped_by", "first_rows")
            if key in summary}
    if summary.get("cut_examples"):
        cuts["recorded_examples"] = len(summary["cut_examples"])
    if cuts:
        info["truncation"] = cuts
    return info


def print_table(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = Table(show_header=False, box=None)
    for key in ("source", "stage", "template", "tokenizer", "cutoff", "packing", "rows",
                "loss_fraction", "packing_efficiency"):
        if info.get(key) is not None:
            value = info[key]
            if key in ("loss_fraction", "packing_efficiency"):
                value = f"{value:.1%}"
            head.add_row(key.replace("_", " "), str(value))
    for key, value in (info.get("pack") or {}).items():
        head.add_row(f"{key} (at pack time)", f"{value:,}")
    for name, value in _truncation_rows(info.get("truncation") or {}):
        head.add_row(name, value)
    if "labels" in info:
        head.add_row("labels", f"{info['labels']['true']:,} desirable / {info['labels']['false']:,} not")
    console.print(head)
    table = Table(title="token lengths")
    for col in ("column", "count", "min", "mean", "p50", "p90", "p99", "max", "total"):
        table.add_column(col, justify="right" if col != "column" else "left")
    dists = dict(info["lengths"])
    if "examples" in info:
        dists["examples (in rows)"] = info["examples"]
    if "images" in info:
        dists["images per row"] = info["images"]["per_row"]
        dists["image tokens per row"] = info["images"]["image_tokens_per_row"]
    for name, d in dists.items():
        if d.get("count"):
            table.add_row(name, *(f"{d[k]:,}" if isinstance(d[k], int) else str(d[k])
                                  for k in ("count", "min", "mean", "p50", "p90", "p99", "max", "total")))
    console.print(table)


def _truncation_rows(cuts: dict) -> list[tuple[str, str]]:
    """What --truncation cut, as table rows: each kind's count and first rows."""
    def rows(kind: str, before: str = "") -> str:
        first = (cuts.get("first_rows") or {}).get(kind) or []
        named = f"rows {', '.join(map(str, first))}{', ...' if len(first) >= 5 else ''}" if first else ""
        inside = "; ".join(x for x in (before, named) if x)
        return f" ({inside})" if inside else ""

    out = [("truncation", cuts["truncation"])] if "truncation" in cuts else []
    names = {kind: f"{name} in" for kind, name in NAMES.items()}
    lost = cuts.get("lost") or {}
    for kind, n in sorted(lost.items(), key=lambda kv: list(names).index(kv[0]) if kv[0] in names else len(names)):
        turns = f"{cuts['turns_removed']:,} turns" if kind == "turns" and cuts.get("turns_removed") else ""
        out.append((names.get(kind, kind), f"{n:,}{rows(kind, turns)}"))
    for reason, n in (cuts.get("dropped_by") or {}).items():
        out.append((f"dropped: {reason.replace('_', ' ')}", f"{n:,}"))
    if cuts.get("dropped_by"):
        out[-1] = (out[-1][0], out[-1][1] + rows("dropped"))
    return out
