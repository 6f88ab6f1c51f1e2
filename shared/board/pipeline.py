"""Form values -> the command lines a user would type: argument lists (run without a shell), the
same pipeline as shell text, and as a Makefile.

Every option comes from core/catalog.py: the board knows only which options it wires itself
(the files between steps, the model); the rest is passed through as the user set it, so an option
declared tomorrow is in the board tomorrow."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from lmforge.shared.board.workspace import Workspace
from lmforge.shared.core import catalog, recipes
from lmforge.shared.core.errors import BadInput
from lmforge.shared.core.options import REQUIRED, Opt

STAGES = ("pt", "sft", "rm", "dpo", "ppo", "grpo")
PACK_STAGE = {"pt": "pt", "sft": "sft", "rm": "rm", "dpo": "dpo", "ppo": "ppo", "grpo": "ppo"}
EVALS = ("generate", "perplexity", "mmlu")

# the options of each step that the board fills in (the rest are the user's)
WIRED = {
    "data align": ("inputs", "output", "dataset_info", "name"),
    "data pack": ("model", "input", "output", "stage"),
    "train": ("model", "data", "output", "overwrite", "resume"),
    "eval": ("model", "adapter", "json_out"),
}


class FieldError(BadInput):
    """A bad value of one form field: the answer names the field, so the page marks it."""

    def __init__(self, message: str, hint: str | None = None, field: dict[str, str] | None = None):
        super().__init__(message, hint)
        self.field = field


# a flag as error lines name it: quoted (click's usage errors) or leading (the workspace's refusals)
_FLAG = re.compile(r"(?:^|')(--[A-Za-z0-9][\w-]*)")


def field_of(command: str, text: str) -> dict[str, str] | None:
    """The option of COMMAND that an error line names first ({command, option, flag}), or None."""
    opts = catalog.COMMANDS.get(command, ())
    for flag in _FLAG.findall(text):
        for o in opts:
            spellings = {o.long, "--no-" + o.name.replace("_", "-")} | {f for fs in o.flags for f in fs.split("/")}
            if not o.argument and flag in spellings:
                return {"command": command, "option": o.name, "flag": o.long}
    return None


def wired(command: str) -> tuple[str, ...]:
    return WIRED.get(command) or WIRED.get(command.split()[0], ())


def catalog_json() -> dict[str, Any]:
    """Every command's options as the page builds its forms from them (read at each request, so a
    newly declared option is there without touching the board)."""
    return {"commands": {name: [opt_json(o) for o in opts] for name, opts in catalog.COMMANDS.items()},
            "wired": {name: list(wired(name)) for name in catalog.COMMANDS},
            "stages": list(STAGES), "evals": list(EVALS)}


def opt_json(o: Opt) -> dict[str, Any]:
    default = None if o.default is REQUIRED else o.default
    if isinstance(default, Path):
        default = str(default)
    return {"name": o.name, "flag": o.long, "type": o.type, "default": default, "required": o.required,
            "help": o.help, "panel": o.panel or "Options", "choices": list(o.choices), "many": o.many,
            "argument": o.argument, "min": o.min, "max": o.max}


# values that carry a path inside them: a reward function's file (FILE.py:function)
_FILE_IN_VALUE = re.compile(r"^(?P<path>.+\.py):(?P<name>[A-Za-z_]\w*)$")


def _checked(ws: Workspace, o: Opt, value: str) -> str:
    """Every value that names a path, whole or in part (absolute, with '..', an existing file, a
    reward's FILE.py), goes through the workspace's one confinement check (symbolic links
    resolved) and is written as the commands will read it."""
    inner = _FILE_IN_VALUE.match(value)
    if inner and not value.startswith(("cmd:", "regex:")):
        return f"{_checked(ws, o, inner.group('path'))}:{inner.group('name')}"
    if o.type == "path" or os.path.isabs(value) or ".." in Path(value).parts or value.startswith("~") \
            or (value and os.path.lexists(ws.root / value)):
        return ws.relative(ws.path(value, o.long))
    return value


def argv(ws: Workspace, command: str, values: dict[str, Any], fixed: dict[str, Any]) -> list[str]:
    """`lmforge COMMAND ...` as an argument list: the options in `fixed` (wired by the board) and
    the user's `values` that differ from their defaults, in declaration order."""
    known = {o.name for o in catalog.COMMANDS[command]}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BadInput(f"'{command}' has no option '--{unknown[0].replace('_', '-')}'", "reload the board")
    chosen = {k: v for k, v in values.items() if k not in wired(command)}
    try:
        return recipes.argv(command, {**chosen, **fixed}, always=set(fixed), path=lambda o, v: _checked(ws, o, v))
    except FieldError:
        raise
    except BadInput as exc:   # a value refused on its way (a path outside the workspace): name its field
        raise FieldError(exc.message, exc.hint, field_of(command, exc.message)) from None


def train_steps(ws: Workspace, config: dict[str, Any], run: str) -> list[dict[str, Any]]:
    """The pipeline of a training run: data align -> data pack -> train STAGE, into runs/RUN/ (one
    aligned Arrow file skips `data align`, one packed file skips `data pack` too)."""
    stage = config.get("stage") or "sft"
    if stage not in STAGES:
        raise BadInput(f"stage {stage!r}: not one of {', '.join(STAGES)}", "pick a stage")
    model = ws.model(str(config.get("model") or ""))
    data = config.get("data") or {}
    files = [ws.relative(ws.existing(f, "data file")) for f in data.get("files") or [] if str(f).strip()]
    info = str(data.get("dataset_info") or "").strip()
    names = [n for n in data.get("names") or [] if str(n).strip()]
    if not files and not (info and names):
        raise BadInput("data: no data chosen", "pick data files, or a dataset_info.json and its entries")
    options = config.get("options") or {}
    train = f"train {stage}"
    pack_stage = PACK_STAGE[stage]
    if stage == "dpo" and (options.get(train) or {}).get("loss") == "kto":
        pack_stage = "kto"
    out = Path("runs") / run
    kind = arrow_kind(ws, files[0]) if len(files) == 1 and not (info and names) else None
    aligned, packed = (files[0] if kind == "aligned" else str(out / "aligned.arrow"),
                       files[0] if kind == "packed" else str(out / "packed.arrow"))
    steps = []
    if kind not in ("aligned", "packed"):   # raw data: align it first
        align = argv(ws, "data align", options.get("data align") or {},
                     {"inputs": files, "output": aligned,
                      "dataset_info": ws.relative(ws.existing(info, "--dataset-info")) if info and names else None,
                      "name": names if info else []})
        steps.append({"name": "data align", "argv": align, "target": aligned})
    if kind != "packed":
        pack = argv(ws, "data pack", options.get("data pack") or {},
                    {"model": model, "input": aligned, "output": packed, "stage": pack_stage})
        steps.append({"name": "data pack", "argv": pack, "target": packed})
    fit = argv(ws, train, options.get(train) or {}, {"model": model, "data": packed, "output": str(out / "model")})
    steps.append({"name": train, "argv": fit, "target": str(out / "model" / "lmforge.json"), "stdout": "train.out"})
    return steps


def arrow_kind(ws: Workspace, name: str) -> str | None:
    """'aligned' or 'packed' for an lmforge Arrow file (its steps are then skipped), else None."""
    if not name.endswith(".arrow"):
        return None
    from lmforge.shared.core.arrowio import open_arrow

    try:
        return open_arrow(str(ws.root / name)).meta.get("kind")
    except Exception:  # noqa: BLE001 - not ours, or unreadable: `data align` will say what is wrong
        return None


def eval_steps(ws: Workspace, run_dir: Path, record: dict[str, Any], kind: str, values: dict[str, Any],
               name: str, run_steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`eval KIND` on a run's model (base + adapter for adapter runs), its JSON result kept."""
    if kind not in EVALS:
        raise BadInput(f"eval {kind!r}: not one of {', '.join(EVALS)}", "pick an evaluation")
    model_dir = ws.relative(run_dir / "model")
    if record.get("kind") == "adapter":
        base = str(record.get("base_model") or "")
        model = ws.relative(Path(base)) if Path(base).is_absolute() and Path(base).is_relative_to(ws.root) else base
        fixed: dict[str, Any] = {"model": model, "adapter": model_dir}
    else:
        fixed = {"model": model_dir, "adapter": None}
    fixed["json_out"] = True
    values = dict(values)
    if not str(values.get("data") or "").strip() and kind != "mmlu":   # default: the run's own data
        own = _run_data(run_steps, packed=kind == "perplexity")
        if own:
            values["data"] = own
    command = f"eval {kind}"
    return [{"name": command, "argv": argv(ws, command, values, fixed), "stdout": "result.json",
             "target": ws.relative(run_dir / "evals" / name / "result.json")}]


def _run_data(steps: list[dict[str, Any]], packed: bool) -> str | None:
    """The packed data a run trained on (train --data), or the aligned data it packed (pack's input)."""
    for step in steps:
        if packed and step["name"].startswith("train "):
            return next((a.split("=", 1)[1] for a in step["argv"] if a.startswith("--data=")), None)
        if not packed and step["name"] == "data pack":
            return next((a for a in step["argv"][3:] if not a.startswith("-")), None)
    return None


def shell(steps: list[dict[str, Any]]) -> str:
    """The pipeline as one shell line (run from the workspace)."""
    return recipes.shell(steps)


def makefile(steps: list[dict[str, Any]], run: str) -> str:
    """The pipeline as a Makefile: one target per step, each depending on the one before."""
    return recipes.makefile(steps, f"lmforge board: run {run} (run `make` in the workspace)")


# where LLaMA-Factory reads an entry from when it has no local file
HUBS = (("hf_hub_url", "hf"), ("ms_hub_url", "ms"), ("om_hub_url", "om"))
_SOURCE_ORDER = {"local": 0, "hub": 1, "missing": 2}


def dataset_entries(ws: Workspace, info_file: Path, entries: dict[str, Any]) -> list[dict[str, Any]]:
    """A dataset_info.json's entries for the picker, local ones first: each with its source, "local"
    (its file_name is there, under the file's directory, inside the workspace), "hub" (a Hub URL and
    no local file) or "missing" (neither), and the Hub it names (hf, ms, om)."""
    listed: list[dict[str, Any]] = []
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            listed.append({"name": name, "source": "missing", "hub": None})
            continue
        file = entry.get("file_name")
        local = False
        if isinstance(file, str) and file.strip():
            try:
                local = ws.path(info_file.parent / file, "file_name").exists()
            except BadInput:   # a file_name leading outside the workspace is not read
                local = False
        hub = next((short for key, short in HUBS if isinstance(entry.get(key), str) and entry[key].strip()), None)
        listed.append({"name": name, "file": file, "format": entry.get("formatting", "alpaca"),
                       "ranking": entry.get("ranking", False), "hub": hub,
                       "source": "local" if local else "hub" if hub else "missing"})
    return sorted(listed, key=lambda e: _SOURCE_ORDER[e["source"]])   # stable: the file's order within each
