"""A training run as several processes (torchrun, one node or many): the process group, what
every process must agree on, how a failure is named, and how a restarted job carries on.

- `start`: torch.distributed is started before the model loads (gloo on CPUs, nccl on GPUs): for a
  torchrun launch, and for `--fsdp` in a single process (a group of one, so that the same
  sharded code and checkpoints serve every size). Only rank 0 prints progress and information.
- `check_same`: before training, every process compares what it is about to do with rank 0: the
  lmforge version, every option's value, the checkpoint it resumes, and that it sees the files
  rank 0 writes in the output directory (a directory local to each node would split the run's
  checkpoints between the nodes). A mismatch is refused by rank 0 in one line naming the rank.
- `as_process`: only rank 0 prints progress and information; an error in another process says
  which one it is; an error that only says a peer went away says so, rather than a library's
  words about sockets.
- `resume_flags`: torchrun restarts every worker of a job after one fails (`--max-restarts`);
  a restarted worker runs the same command again, without --resume. It continues the run from its
  last complete checkpoint (or starts afresh when there was none yet).
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from lmforge.shared.core import log, rundir
from lmforge.shared.core.errors import EXIT_BAD_INPUT, BadInput, LmforgeError, RunFailure

_own_group = False   # this module started a group of one process (ended by `stop`)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def restarted() -> bool:
    """Whether torchrun restarted this worker after a failure in the job (its elastic agent counts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def resume_flags(o) -> tuple[bool, bool]:
    """(resume, overwrite) for `rundir.prepare`. A worker torchrun restarted resumes the run that
    its earlier attempt left (never overwriting it, whatever the command says); when that attempt
    stopped before its first checkpoint, `prepare` starts afresh (lmforge's start mark is there)."""
    if not restarted():
        return bool(o.resume), bool(o.overwrite)
    out = Path(o.output)
    if rundir.last_checkpoint(out) is not None or (out / rundir.RECORD).exists():
        log.info(f"train: restarted by torchrun (attempt {int(os.environ['TORCHELASTIC_RESTART_COUNT']) + 1}); "
                 "resuming from the last checkpoint")
        return True, False
    return False, False


def start(o, device) -> None:
    """The process group, before the model loads (a torchrun launch, or --fsdp in one process)."""
    global _own_group
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if world_size() > 1:
        if device.kind == "cuda":
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))   # before NCCL starts
        dist.init_process_group("gloo" if device.kind == "cpu" else "nccl", **_attempt_store())
    elif getattr(o, "fsdp", None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo" if device.kind == "cpu" else "nccl", init_method=f"tcp://127.0.0.1:{port}",
                                rank=0, world_size=1)
        _own_group = True


def _attempt_store() -> dict:
    """The store of this attempt of the job. torchrun's workers share its agent's store, which
    outlives a restart; PyTorch adds no prefix for the attempt there, so the workers of a
    restarted job could read the addresses the dead attempt published and fail to connect.
    Keys under a prefix of the attempt's number cannot be stale (empty: torch's default)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not restarted():
        return {}
    from datetime import timedelta

    import torch.distributed as dist

    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size(),
                          is_master=False, timeout=timedelta(minutes=10))
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    return {"store": dist.PrefixStore(f"/lmforge/attempt_{attempt}", agent), "rank": rank(),
            "world_size": world_size()}


def stop() -> None:
    """End a group `start` made for one process (the group of a torchrun launch ends with it)."""
    global _own_group
    if _own_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        _own_group = False


def total(count: int, replicas: int = 1) -> int:
    """COUNT summed over the processes of the job (each counts what its own batches held);
    `replicas` processes that see the same rows (a context-parallel group) count them once."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return count
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    summed = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(summed)
    return int(summed.item()) // max(replicas, 1)


def _comparable(o) -> dict:
    """Every option's value, keyed by its flag as the user spells it (--lr, not learning_rate)."""
    from lmforge.shared.core.options import options_of

    return {opt.long: (str(v) if isinstance(v, Path) else v)
            for opt in options_of(type(o)) for v in [getattr(o, opt.name)]}


def check_same(o, out: Path, resume_from: Path | None) -> None:
    """Refuse, before training, a job whose processes differ: lmforge version, options, the
    checkpoint they resume, or an output directory they do not share."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    from lmforge.shared import __version__

    token = os.urandom(8).hex() if dist.get_rank() == 0 else ""
    marker = out / f".lmforge-shared-{token}"
    if token:
        marker.write_text(token)
    mine = {"version": __version__, "options": _comparable(o), "host": socket.gethostname(),
            "resume": resume_from.name if resume_from is not None else None, "token": token}
    everyone: list = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(everyone, mine)   # rank 0 wrote its marker before this point
        token = everyone[0]["token"]
        path = out / f".lmforge-shared-{token}"
        try:
            sees = path.read_text() == token
        except OSError:
            sees = False
        seen: list = [None] * dist.get_world_size()
        dist.all_gather_object(seen, sees)
    finally:
        if dist.get_rank() == 0:
            marker.unlink(missing_ok=True)
    problem = _difference(everyone, seen, out)
    if problem is None:
        return
    if dist.get_rank() == 0:
        raise BadInput(*problem)
    # every process found the same problem: rank 0 says it (once); the others wait for it to be
    # said before they leave (torchrun stops the whole job when one process ends), and end
    # silently when torchrun stops them first
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(2)
    raise SystemExit(EXIT_BAD_INPUT)


def _difference(everyone: list[dict], seen: list[bool], out: Path) -> tuple[str, str] | None:
    first = everyone[0]
    where = [f"rank {r} ({e['host']})" for r, e in enumerate(everyone)]
    for r, e in enumerate(everyone[1:], start=1):
        if e["version"] != first["version"]:
            return (f"{where[r]} runs lmforge {e['version']}, rank 0 ({first['host']}) runs {first['version']}",
                    "install the same lmforge version on every node")
    for r, e in enumerate(everyone[1:], start=1):
        for name, value in first["options"].items():
            if e["options"].get(name) != value:
                flag = name if name.startswith("-") else "--" + name.replace("_", "-")
                return (f"{where[r]} runs with {flag} {e['options'].get(name)!r}, rank 0 with {value!r}",
                        "start every process with the same lmforge command")
    for r, sees in enumerate(seen):
        if not sees:
            return (f"{out}: not shared by every process: {where[r]} does not see what rank 0 "
                    f"({first['host']}) writes there",
                    "give -o a directory on a file system every node mounts (and the data too)")
    for r, e in enumerate(everyone[1:], start=1):
        if e["resume"] != first["resume"]:
            return (f"{where[r]} would resume from {e['resume'] or 'nothing'}, rank 0 from {first['resume'] or 'nothing'}",
                    "give -o a directory on a file system every node mounts")
    return None


_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket timeout",
         "communicator was aborted", "nccl error", "connection refused", "read error", "write error")


@contextmanager
def as_process():
    """A run as one process of several: progress and information from rank 0 only (warnings and
    errors from every process); a failure says which process it is (rank > 0), and a failure that
    only says another process went away is named as that."""
    if world_size() > 1 and rank() > 0:
        log.set_quiet(True)
    try:
        yield
    except LmforgeError as exc:
        if world_size() > 1 and rank() > 0:
            exc.message = f"rank {rank()} ({socket.gethostname()}): {exc.message}"
        raise
    except Exception as exc:
        if world_size() <= 1:
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        who = f"rank {rank()} ({socket.gethostname()})"
        if any(words in text.lower() for words in _LOST):
            raise RunFailure(f"{who}: lost contact with another process of the job ({text[:160]})",
                             "the process that failed first says why in its own error line") from exc
        if rank() > 0:
            raise RunFailure(f"{who}: {type(exc).__name__}: {text}") from exc
        raise
