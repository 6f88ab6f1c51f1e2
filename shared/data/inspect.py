"""What `data show --schema/--stats` reports about a dataset."""

from __future__ import annotations

import json
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
from lmforge.shared.core.arrowio import ArrowSource


def schema_info(source: ArrowSource) -> dict:
    return {"source": source.name,
            "columns": {f.name: str(f.type) for f in source.schema},
            "lmforge": source.meta}


def schema_text(info: dict) -> str:
    lines = [f"{name}: {kind}" for name, kind in info["columns"].items()]
    lines.append("lmforge: " + json.dumps(info["lmforge"], ensure_ascii=False, sort_keys=True))
    return "\n".join(lines) + "\n"


def _commands(provenance: list) -> list[str]:
    """Provenance as a flat list of 'command' strings, merges shown as (a + b)."""
    out = []
    for step in provenance or []:
        if step.get("command") == "data merge" and step.get("inputs"):
            parts = [" | ".join(_commands(i.get("provenance", []))) or i.get("source", "?")
                     for i in step["inputs"]]
            out.append("(" + " + ".join(parts) + ") | data merge")
        else:
            out.append(step.get("command", "?"))
    return out


def stats(source: ArrowSource) -> dict:
    meta = source.meta
    rows = 0
    prompt_turns = system = tools = 0
    labels = {"true": 0, "false": 0}
    aligned = meta.get("kind") == "aligned"
    for batch in source.batches():
        rows += batch.num_rows
        if aligned:
            prompt_turns += pc.sum(pc.list_value_length(batch.column("prompt"))).as_py() or 0
            system += pc.sum(pc.not_equal(batch.column("system"), "").cast(pa.int64())).as_py() or 0
            tools += pc.sum(pc.not_equal(batch.column("tools"), "").cast(pa.int64())).as_py() or 0
            if "label" in batch.schema.names:
                true = pc.sum(batch.column("label").cast(pa.int64())).as_py() or 0
                labels["true"] += true
                labels["false"] += batch.num_rows - true
    info = {"source": source.name, "rows": rows, "kind": meta.get("kind"), "stage": meta.get("stage"),
            "pipeline": _commands(meta.get("provenance", []))}
    if aligned and rows:
        info.update({"mean_prompt_turns": round(prompt_turns / rows, 3),
                     "with_system": system, "with_tools": tools})
        if "label" in source.schema.names:
            info["labels"] = labels
    for key in ("template", "tokenizer", "cutoff", "packing"):
        if key in meta:
            info[key] = meta[key]
    summary = source.summary()
    if summary:
        info["summary"] = summary
    info["provenance"] = meta.get("provenance", [])
    return info


def stats_text(info: dict) -> str:
    lines = []
    for key, value in info.items():
        if key == "provenance":
            continue
        if key == "pipeline":
            value = " | ".join(value) or "(unknown)"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False, sort_keys=True)
        lines.append(f"{key}: {value}")
    return "\n".join(lines) + "\n"


def rows(source: ArrowSource, limit: int) -> Iterator[dict]:
    """The first `limit` rows (0: all) as dicts, read batch by batch."""
    printed = 0
    for batch in source.batches():
        take = batch if limit == 0 else batch.slice(0, limit - printed)
        yield from take.to_pylist()
        printed += take.num_rows
        if limit and printed >= limit:
            return


def json_bytes(value: object) -> object:
    """Images stored in rows (bytes) print as base64, as JSON has no bytes."""
    if isinstance(value, (bytes, bytearray)):
        import base64

        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
