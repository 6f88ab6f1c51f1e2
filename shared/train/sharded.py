"""Sharded checkpoints (`--fsdp`): every process writes its own shard of the weights that train and
of the optimizer state (torch.distributed.checkpoint), and a checkpoint resumes on any number of
processes, its tensors re-split to the new layout as they load.

    OUT/checkpoints/checkpoint-N/
      model/               the trainable weights (an adapter, or the whole model), one file per process
      optimizer/           the optimizer state, the same way
      scheduler.pt  trainer_state.json  rng_state_R.pth  lmforge_progress.json
      lmforge_sharded.json written last: how many processes wrote it, the sharding, the step

A checkpoint is written whole or not at all: every process writes into OUT/checkpoints/
.checkpoint-N.partial/, and rank 0 renames the finished directory to checkpoint-N once every
process is done and the marker is in. A run killed in the middle leaves a .partial directory,
which the next run removes; `rundir.last_checkpoint` takes only directories with the marker.

Frozen weights (a LoRA run's base model) are not written: a resumed run loads them from the base
model as the first run did. A DeepSpeed ZeRO checkpoint holds one optimizer partition per process
and resumes only on as many processes: another count is refused with one line (`check_resume`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lmforge.shared.core import rundir
from lmforge.shared.core.errors import BadInput

MARK = rundir.SHARDED_MARK
MODEL, OPTIMIZER, SCHEDULER = "model", "optimizer", "scheduler.pt"


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def marker(checkpoint: Path) -> dict | None:
    """What a sharded checkpoint says about itself (None: not a sharded checkpoint)."""
    try:
        return json.loads((checkpoint / MARK).read_text())
    except (OSError, ValueError):
        return None


def zero_partitions(checkpoint: Path) -> int:
    """The processes a DeepSpeed ZeRO checkpoint was written by (0: not one): one optimizer
    partition file each."""
    return len(list(checkpoint.glob("global_step*/*zero_pp_rank_*_optim_states.pt")))


def check_resume(o, checkpoint: Path | None, world: int) -> None:
    """Refuse a checkpoint this run cannot continue, in one line, before the model loads."""
    if checkpoint is None:
        return
    sharded = marker(checkpoint)
    fsdp = getattr(o, "fsdp", None)
    if sharded is not None and not fsdp:
        raise BadInput(f"{checkpoint} holds FSDP shards (--fsdp {sharded.get('fsdp')})",
                       "resume with --fsdp (on any number of processes)")
    partitions = zero_partitions(checkpoint)
    if fsdp and sharded is None:
        raise BadInput(f"{checkpoint} was written without --fsdp",
                       "resume it as it was written (without --fsdp), or start afresh with --overwrite")
    if partitions and not getattr(o, "deepspeed", None):
        raise BadInput(f"{checkpoint} was written by DeepSpeed ZeRO", "resume it with the same --deepspeed")
    if partitions and partitions != world:
        raise BadInput(f"{checkpoint}: DeepSpeed ZeRO wrote it from {partitions} processes and resumes it on "
                       f"{partitions} only, not {world}",
                       f"resume with {partitions} processes (DeepSpeed's ds_to_universal.py converts a checkpoint "
                       "for another count, which lmforge does not load), or use --fsdp, whose checkpoints resume "
                       "on any number")


def clean_partial(out: Path) -> None:
    """Remove what killed runs left half-written (rank 0, with the run's lock held)."""
    if _rank() != 0:
        return
    for leftover in (out / rundir.CHECKPOINTS).glob(".checkpoint-*.partial"):
        shutil.rmtree(leftover, ignore_errors=True)


def _trainable_options(strict: bool = True):
    """The weights that train; loading them leaves the frozen ones (strict=False) as the base gave them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save_model(model, directory: Path) -> None:
    """This process's shards of the weights that train (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dcp.save(get_model_state_dict(model, options=_trainable_options()), checkpoint_id=str(directory / MODEL))


def load_model(model, checkpoint: Path) -> None:
    """The trainable weights from a sharded checkpoint, re-split to this run's processes (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = get_model_state_dict(model, options=_trainable_options())
    dcp.load(state, checkpoint_id=str(checkpoint / MODEL))   # every trainable weight must be there
    set_model_state_dict(model, state, options=_trainable_options(strict=False))


def save_optimizer(model, optimizer, scheduler, directory: Path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=str(directory / OPTIMIZER))
    if _rank() == 0 and scheduler is not None:
        torch.save(scheduler.state_dict(), directory / SCHEDULER)


def load_optimizer(model, optimizer, scheduler, checkpoint: Path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer)   # its layout, for the shards to load into
    dcp.load(state, checkpoint_id=str(checkpoint / OPTIMIZER))
    set_optimizer_state_dict(model, optimizer, state)
    if scheduler is not None and (checkpoint / SCHEDULER).exists():
        scheduler.load_state_dict(torch.load(checkpoint / SCHEDULER, weights_only=True))


def save_checkpoint(trainer, write) -> None:
    """The Trainer's checkpoint of this step, written into a hidden directory by every process
    (`write(staging_root)` runs the Trainer's own sequence there) and renamed into place by rank 0
    once it is whole. Collective."""
    root = Path(trainer.args.output_dir)
    step = trainer.state.global_step
    staging = root / f".checkpoint-{step}.partial"
    final = root / f"checkpoint-{step}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".checkpoint-*.partial"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging.mkdir()
    _barrier()
    write(staging)
    _barrier()   # every process has written its shards and its random state
    _progress_into(trainer, staging)   # collective (the tokens of every process)
    if _rank() == 0:
        inner = staging / final.name
        rundir.write_json(inner / MARK, {"format": "torch.distributed.checkpoint", "world_size": _world(),
                                         "fsdp": getattr(trainer, "lmforge_fsdp", None), "step": step})
        if final.exists():
            shutil.rmtree(final)
        os.replace(inner, final)
        shutil.rmtree(staging, ignore_errors=True)
        _rotate(root, trainer.args.save_total_limit)
    _barrier()


def _progress_into(trainer, staging: Path) -> None:
    """lmforge's run totals (progress.py) go into the checkpoint before it takes its name, so that
    a complete checkpoint always carries them (the Trainer writes them again after the rename).
    Every process calls it: the totals count the tokens of every process's batches."""
    from types import SimpleNamespace

    from lmforge.shared.train import progress

    for callback in trainer.callback_handler.callbacks:
        if type(callback).__module__ == progress.__name__ and hasattr(callback, "on_save"):
            callback.on_save(SimpleNamespace(output_dir=str(staging)), trainer.state, trainer.control)


def _rotate(root: Path, keep: int | None) -> None:
    if not keep:
        return
    done = sorted((p for p in root.glob("checkpoint-*") if rundir.checkpoint_complete(p)),
                  key=lambda p: int(p.name.split("-")[-1]))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
