"""The `lmforge` schema-metadata entry every dataset we write carries.

    {"kind": "aligned" | "packed", "stage": ..., "provenance": [step, ...], ...}

A provenance step is {"command": "data align", "version": ..., "options": {...}}; merging
datasets records the inputs' provenance under the merge step's "inputs". Consumers call
`require()` to check what they need and fail early with both sides named.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path

import pyarrow as pa
from lmforge.shared import __version__
from lmforge.shared.core.arrowio import META_KEY
from lmforge.shared.core.errors import BadInput


def read_meta(schema: pa.Schema) -> dict:
    raw = (schema.metadata or {}).get(META_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def with_meta(schema: pa.Schema, meta: dict) -> pa.Schema:
    """The schema with exactly one metadata entry, ours (others, e.g. datasets' features, dropped)."""
    return schema.with_metadata({META_KEY: json.dumps(meta, sort_keys=True, default=_plain)})


def _plain(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


EXECUTION_ONLY = ("output", "num_proc")


def step(command: str, options: dict, **extra: object) -> dict:
    """One provenance entry: the command and the options it ran with (JSON-safe)."""
    # where the result is written, and how many processes wrote it, are not part of how it was
    # made (and would break byte-identity between runs)
    kept = {k: v for k, v in options.items() if k not in EXECUTION_ONLY}
    clean = json.loads(json.dumps(kept, sort_keys=True, default=_plain))
    return {"command": command, "version": __version__, "options": clean, **extra}


def require(meta: dict, source_name: str, *, kind: str | None = None,
            stages: tuple[str, ...] | None = None, hint: str | None = None) -> None:
    """Refuse data that is not of the kind/stage the caller needs, naming both."""
    have_kind = meta.get("kind")
    if kind is not None and have_kind != kind:
        made = f"{have_kind} data" if have_kind else "data without lmforge metadata"
        raise BadInput(f"{source_name}: is {made}, this command needs {kind} data",
                       hint or _kind_hint(kind))
    have_stage = meta.get("stage")
    if stages is not None and have_stage not in stages:
        raise BadInput(f"{source_name}: is {have_kind} data for stage '{have_stage}', "
                       f"this needs stage {' or '.join(repr(s) for s in stages)}",
                       hint or "align or pack data for the right stage")


def _kind_hint(kind: str) -> str:
    if kind == "aligned":
        return "make it with `lmforge data align`"
    if kind == "packed":
        return "make it with `lmforge data pack`"
    return "check the input"


def file_digest(path: Path) -> str:
    """A short content digest of a data file (or a datasets directory): the run record's data fingerprint."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted(path.rglob("*.arrow")) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
