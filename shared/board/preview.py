"""Dataset preview: the first rows as `data align` writes them, the rendered template with the
trained tokens marked (the labels `data pack` computes: the loss mask, shown as colour), and the
`data stats` figures. All three come from running the commands themselves on the first rows."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from lmforge.shared.board import pipeline
from lmforge.shared.board.runner import error_line, lmforge_command
from lmforge.shared.board.workspace import Workspace
from lmforge.shared.core.errors import BadInput

ROWS = 8          # examples aligned and packed for the preview
SHOWN = 3         # examples drawn token by token
MAX_TOKENS = 400  # tokens drawn per example


def _run(ws: Workspace, argv: list[str]) -> str:
    result = subprocess.run(lmforge_command() + argv[1:], cwd=ws.root, capture_output=True, timeout=600,
                            stdin=subprocess.DEVNULL, env=_env())
    if result.returncode != 0:
        err = result.stderr.decode(errors="replace")
        raise BadInput(error_line(err) or f"lmforge {' '.join(argv[1:3])} failed (exit {result.returncode})")
    return result.stdout.decode(errors="replace")


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.pop("LMFORGE_DEBUG", None)
    return env


def preview(ws: Workspace, config: dict[str, Any]) -> dict[str, Any]:
    work = ws.root / ".board" / "preview"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    options = json.loads(json.dumps(config.get("options") or {}))
    options.setdefault("data align", {})["max_samples"] = str(ROWS)
    options.setdefault("data align", {})["sample"] = "first"
    steps = pipeline.train_steps(ws, {**config, "options": options}, "PREVIEW")
    rel = ws.relative(work)
    ran = [[a.replace("runs/PREVIEW", rel) for a in s["argv"]] for s in steps[:-1]]
    for argv in ran:
        _run(ws, argv)
    train = [a.replace("runs/PREVIEW", rel) for a in steps[-1]["argv"]]
    packed = ws.root / next(a.split("=", 1)[1] for a in train if a.startswith("--data="))
    model = next(a.split("=", 1)[1] for a in train if a.startswith("--model="))
    # the aligned data: what `data pack` read (its one positional argument); none for packed input
    aligned = next((ws.root / a for s in ran if s[2] == "pack" for a in s[3:] if not a.startswith("-")), None)
    # what `data show -n 3` and `data stats --json` print, from their own code (two processes fewer)
    from lmforge.shared.core import arrowio
    from lmforge.shared.data import packstats

    rows = _first_rows(arrowio.open_arrow(str(aligned)), SHOWN) if aligned is not None else []
    stats = json.loads(json.dumps(packstats.compute(arrowio.open_arrow(str(packed))), default=str))
    return {"rows": rows, "tokens": _tokens(ws, packed, model), "stats": stats,
            "commands": [pipeline.shell([{"argv": argv}]) for argv in ran]}


def _first_rows(source, n: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for batch in source.batches():
        rows += batch.slice(0, n - len(rows)).to_pylist()
        if len(rows) >= n:
            break
    return json.loads(json.dumps(rows, default=lambda b: f"<{len(b)} bytes>" if isinstance(b, bytes) else str(b)))


def _tokens(ws: Workspace, packed: Path, model: str) -> list[list[dict[str, Any]]]:
    """Per example: its text cut at token boundaries, each piece marked trained (label != -100) or not."""
    from lmforge.shared.modeldir.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(ws.root / model if (ws.root / model).exists() else model)
    from lmforge.shared.core.arrowio import open_arrow

    out: list[list[dict[str, Any]]] = []
    for row in _first_rows(open_arrow(str(packed)), SHOWN):
        key = "input_ids" if "input_ids" in row else next((k for k in row if k.endswith("input_ids")), None)
        if key is None:
            break
        ids = row[key][:MAX_TOKENS]
        labels = (row.get(key.replace("input_ids", "labels")) or [0] * len(ids))[:MAX_TOKENS]
        pieces, before = [], ""
        for i, (token, label) in enumerate(zip(ids, labels)):
            text = tokenizer.decode(ids[: i + 1])
            piece = text[len(before):] if text.startswith(before) else tokenizer.decode([token])
            before = text
            pieces.append({"text": piece, "id": int(token), "trained": label != -100})
        out.append(pieces)
    return out
