"""Checkpoint directories: what a training run leaves behind, and when it counts as finished.

    OUT/
      adapter_model.safetensors + adapter_config.json   (adapter methods)  or
      model*.safetensors + config.json                  (full, freeze, llama-pro, ...)
      tokenizer files, generation_config.json
      lmforge.json          base model, method, stage, data fingerprint, hyper-parameters, metrics
      trainer_log.jsonl     one JSON object per logged step
      loss.png              training (and eval) loss
      checkpoints/          resumable states (removed at the end unless --keep-checkpoints)

lmforge.json is written last, atomically: a directory without it is an unfinished run, which
`--resume` continues and other tools refuse.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from lmforge.shared import __version__
from lmforge.shared.core.errors import BadInput

RECORD = "lmforge.json"
LOG = "trainer_log.jsonl"
PLOT = "loss.png"
CHECKPOINTS = "checkpoints"


def temp_sibling(path: Path) -> Path:
    """The hidden name an atomic write goes through before it is renamed to PATH."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def written_as(name: str) -> str:
    """The final path behind a temporary sibling's name (for error messages); others unchanged."""
    import re

    return re.sub(r"(^|/)\.([^/]+)\.tmp-\d+$", r"\1\2", name)


def prepare(out: Path, *, overwrite: bool, resume: bool) -> Path | None:
    """Make OUT ready; returns the checkpoint to resume from (None for a fresh start)."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: exists and is not a directory", "give a directory to -o")
    busy = out.exists() and any(out.iterdir())
    if resume:
        if not busy:
            return None  # nothing to resume: a fresh start
        last = last_checkpoint(out)
        if last is None and not (out / RECORD).exists():
            raise BadInput(f"{out}: has no checkpoint to resume from", "use --overwrite to start again")
        return last
    if busy:
        if not overwrite:
            raise BadInput(f"{out}: exists and is not empty",
                           "pass --overwrite to replace it, or --resume to continue an interrupted run")
        _empty(out)
    out.mkdir(parents=True, exist_ok=True)
    return None


def _empty(directory: Path) -> None:
    for child in directory.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


@contextmanager
def removed_on_failure(out: Path, *, fresh: bool, created: bool):
    """A fresh run that fails before its first checkpoint leaves OUT as it found it (absent, or
    empty), so running the same command again just works. Once a checkpoint exists the
    directory stays, for --resume."""
    try:
        yield
    except BaseException:
        if fresh and last_checkpoint(out) is None and not (out / RECORD).exists() \
                and int(os.environ.get("RANK", "0")) == 0 and out.is_dir():
            shutil.rmtree(out, ignore_errors=True) if created else _empty(out)
        raise


@contextmanager
def staged(out: Path):
    """Build a directory beside OUT and move it into place only once the block completes: a failed
    or interrupted run leaves OUT as it was (or absent), never half-written."""
    tmp = temp_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (trainer_state.json is written last)."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return None
    done = [p for p in root.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def write_json(path: Path, obj: dict) -> None:
    tmp = temp_sibling(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def record(kind: str, **fields) -> dict:
    """A run record (lmforge.json): what made a model or adapter directory (`fields`), after what
    every record carries: the lmforge version and the kind ("model" or "adapter")."""
    return {"lmforge_version": __version__, "kind": kind, **fields}


def model_ref(model: str | Path) -> str:
    """A model as a record names it: a local directory as an absolute path, a Hub id as given."""
    return str(Path(model).resolve()) if Path(model).exists() else str(model)


def write_record(directory: str | Path, record: dict) -> None:
    """Write DIRECTORY/lmforge.json atomically (last, so that its presence means finished)."""
    write_json(Path(directory) / RECORD, record)


def read_record(directory: str | Path) -> dict:
    path = Path(directory) / RECORD
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise BadInput(f"{path}: not valid JSON") from None


def require_finished(directory: str | Path, what: str = "checkpoint") -> None:
    """Refuse a run directory that has checkpoints but no final record (an interrupted run)."""
    d = Path(directory)
    if d.is_dir() and (d / CHECKPOINTS).is_dir() and not (d / RECORD).exists():
        raise BadInput(f"{d}: an unfinished training run (no {RECORD})",
                       "finish it with the same `lmforge train` command and --resume")


class JsonlLog:
    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        """On resume: forget entries the interrupted run logged after its last checkpoint."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, entry: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss(out: Path) -> Path | None:
    entries = JsonlLog(out / LOG).entries()
    train = [(e["step"], e["loss"]) for e in entries if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in entries if "eval_loss" in e]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    target = out / PLOT
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
