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
from lmforge.shared.core.errors import BadInput, LmforgeError, RunFailure, no_space

RECORD = "lmforge.json"
LOG = "trainer_log.jsonl"
PLOT = "loss.png"
CHECKPOINTS = "checkpoints"


def temp_sibling(path: Path) -> Path:
    """The hidden name an atomic write goes through before it is renamed to PATH. It carries the
    writer's process id, so leftovers of a killed writer are known as such: they are removed
    here, the next time anything is written in that directory."""
    clean_stale(path.parent, ".*.tmp-*")
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # someone else's process
    except OSError:
        return True
    return True


def clean_stale(directory: Path, pattern: str) -> None:
    """Remove entries of `directory` matching `pattern` whose name holds the id of a process that
    no longer exists: the temporaries of writers killed before they could clean up (kill -9)."""
    import re

    try:
        entries = list(directory.glob(pattern))
    except OSError:
        return
    for entry in entries:
        found = re.search(r"(?:tmp-|stdin-)(\d+)", entry.name)
        if not found or pid_alive(int(found.group(1))):
            continue
        try:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        except OSError:
            pass


def written_as(name: str) -> str:
    """The final path behind a temporary sibling's or lock file's name (for error messages)."""
    import re

    return re.sub(r"(^|/)\.([^/]+)\.(tmp-\d+|lock)$", r"\1\2", name)


LOCK = ".lmforge.lock"
_held: dict[str, int] = {}   # lock files this process holds (path -> fd), for its lifetime


def lock(path: Path, what: str) -> None:
    """Hold an exclusive lock on `path` (created if needed) until this process ends or
    `unlock(path)`: a second lmforge process writing the same output is refused, naming the first.
    An flock is released by the kernel when its holder dies, so a killed run never leaves a lock
    that blocks the next one."""
    import fcntl

    key = str(path.resolve())
    if key in _held:
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BadInput(f"{what}: another lmforge process (pid {holder}) is writing it",
                           "wait for it to finish (or stop it), or choose another output") from None
        if _same_file(fd, path):
            break
        os.close(fd)   # its holder removed the file while we waited for it: lock the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd
    _remove_stale_locks(path.parent)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _remove_stale_locks(directory: Path) -> None:
    """Remove the lock files in `directory` that nobody holds: those of processes killed before
    they could remove theirs (kill -9). Whoever opened one of them just before it goes sees, once
    it has the lock, that the file is no longer there (`_same_file`) and takes a new one."""
    import fcntl

    try:
        entries = [e for e in directory.glob(".*.lock") if str(e.resolve()) not in _held]
    except OSError:
        return
    for entry in entries:
        try:
            fd = os.open(entry, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, entry):
                entry.unlink()
        except OSError:   # held by a live writer (or not ours to remove): leave it
            pass
        finally:
            os.close(fd)


def unlock(path: Path) -> None:
    """Release a lock taken by `lock` and remove its file."""
    fd = _held.pop(str(path.resolve()), None)
    if fd is not None:
        path.unlink(missing_ok=True)
        os.close(fd)


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


BEGUN = ".lmforge-run"   # written first into a run directory: "lmforge started a run here"


def prepare(out: Path, *, overwrite: bool, resume: bool) -> Path | None:
    """Make OUT ready and lock it for this run; returns the checkpoint to resume from (None for a
    fresh start). A directory left by a run that died before its first checkpoint (lmforge's
    mark, no checkpoint, no record) starts afresh, with a note, with or without --resume."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: exists and is not a directory", "give a directory to -o")
    if resume and not overwrite and not out.exists():
        raise BadInput(f"{out} has no checkpoint to resume", "drop --resume to start afresh")
    out.mkdir(parents=True, exist_ok=True)
    if _is_main_rank():   # before anything in OUT is touched: --overwrite of a running run is refused
        lock(out / LOCK, str(out))
    try:
        return _prepare_locked(out, overwrite=overwrite, resume=resume)
    except BaseException:   # refused: OUT is left as it was, without our lock file
        unlock(out / LOCK)
        raise


def _prepare_locked(out: Path, *, overwrite: bool, resume: bool) -> Path | None:
    from lmforge.shared.core import log

    if _is_main_rank():
        clean_stale(out, ".*.tmp-*")   # the temporaries of a killed run are not what it left to resume
    contents = [c for c in out.iterdir() if c.name != LOCK]
    last = last_checkpoint(out)
    finished = (out / RECORD).exists()
    if contents and last is None and not finished and (out / BEGUN).exists():
        log.info(f"{out}: an earlier run stopped before its first checkpoint; starting afresh")
        if _is_main_rank():
            _empty(out)
        return None
    if resume and (last is not None or finished):
        return last
    if resume and not overwrite:   # starting afresh is what --overwrite asks for, not --resume
        raise BadInput(f"{out} has no checkpoint to resume", "drop --resume to start afresh" if not contents
                       else "pass --overwrite to replace what is there, or drop --resume")
    if contents:
        if not overwrite:
            raise BadInput(f"{out}: exists and is not empty",
                           "pass --overwrite to replace it, or --resume to continue an interrupted run")
        if _is_main_rank():
            _empty(out)
    return None


def begin(out: Path) -> None:
    """Mark OUT as a run lmforge has started (see `prepare`); removed when the run finishes."""
    if _is_main_rank():
        (out / BEGUN).write_text(f"{os.getpid()}\n")


def finish(out: Path) -> None:
    """The run is complete: drop the start mark and the lock."""
    usual_permissions(out)
    if _is_main_rank():
        (out / BEGUN).unlink(missing_ok=True)
        unlock(out / LOCK)


def _empty(directory: Path) -> None:
    for child in directory.iterdir():
        if child.name == LOCK:
            continue
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


@contextmanager
def removed_on_failure(out: Path, *, fresh: bool, created: bool):
    """A fresh run that fails before its first checkpoint leaves OUT as it found it (absent, or
    empty), so running the same command again just works. Once a checkpoint exists the
    directory stays, for --resume."""
    try:
        yield
    except BaseException as exc:
        if fresh and last_checkpoint(out) is None and not (out / RECORD).exists() \
                and int(os.environ.get("RANK", "0")) == 0 and out.is_dir():
            shutil.rmtree(out, ignore_errors=True) if created else _empty(out)
        if isinstance(exc, Exception) and not isinstance(exc, LmforgeError) and no_space(exc):
            # whatever the library made of it (safetensors: "error while serializing"), say where
            again = "run again with --resume" if last_checkpoint(out) is not None else "run again"
            raise RunFailure(f"{out}: no space left on device", f"free some space and {again}") from exc
        raise


def output_lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


@contextmanager
def output_lock(path: Path):
    """One writer per output file or directory: a second lmforge process writing PATH is refused."""
    lockfile = output_lock_path(path)
    lock(lockfile, str(path))
    try:
        yield
    finally:
        unlock(lockfile)


def usual_permissions(directory: Path) -> None:
    """Files the libraries wrote through private temporary files (safetensors: mode 0600) get the
    mode any file gets here (0666 less the umask), so the people who share the machine can read
    a model as they can read its config."""
    umask = os.umask(0)
    os.umask(umask)
    wanted = 0o666 & ~umask
    for path in directory.rglob("*") if directory.is_dir() else ():
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) == 0o600 and wanted != 0o600:
            path.chmod(wanted)


@contextmanager
def staged(out: Path):
    """Build a directory beside OUT and move it into place only once the block completes: a failed
    or interrupted run leaves OUT as it was (or absent), never half-written."""
    from lmforge.shared.core.arrowio import make_parent

    make_parent(out)
    with output_lock(out):
        tmp = temp_sibling(out)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            yield tmp
            usual_permissions(tmp)
            if out.exists():
                shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


SHARDED_MARK = "lmforge_sharded.json"   # written last into a sharded (--fsdp) checkpoint (train/sharded.py)


def checkpoint_complete(checkpoint: Path) -> bool:
    """Whether a checkpoint directory is whole: the Trainer writes trainer_state.json last; a
    sharded checkpoint (its shards under model/) also needs its marker, written after every
    process finished its shards."""
    if not (checkpoint / "trainer_state.json").exists():
        return False
    return not (checkpoint / "model").is_dir() or (checkpoint / SHARDED_MARK).exists()


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return None
    done = [p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and checkpoint_complete(p)]
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
