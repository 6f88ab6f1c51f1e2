"""One lifecycle for every training run, whatever the stage:

    check the options -> take the output directory (locked; resume from its last checkpoint, or
    refuse to overwrite) -> mark the run started -> train (the stage's own code) -> write the
    result and its record -> mark it finished and release the lock

A run that fails or is interrupted removes what it created (a fresh run), or keeps its last
checkpoint (a resumed run), and releases the lock, so the next run is never blocked by it.
`train(o)` picks the stage's code from the type of its options: pt/sft/rm/dpo/grpo run the
Hugging Face Trainer (hfstage.py, each stage building its own trainer), ppo its own loop (ppo.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from lmforge.shared.core import log, rundir
from lmforge.shared.core.commands.train import Training, TrainPPO


def train(o: Training | TrainPPO) -> Path:
    """Train with options `o` (a TrainSFT, TrainDPO, ...); returns the output directory."""
    if isinstance(o, TrainPPO):
        from lmforge.shared.train import ppo

        return run(o, ppo.validate, ppo.train)
    from lmforge.shared.train import hfstage

    return run(o, hfstage.validate, hfstage.train)


def run(o, validate: Callable[[Any], None], body: Callable[[Any, Path, Path | None], None]) -> Path:
    """The lifecycle around `body(o, out, resume_from)`, which trains and saves the result. In a
    job of several processes, an error says which process it is (distributed.py); a worker that
    torchrun restarted after a failure continues the run."""
    from lmforge.shared.train import distributed

    with distributed.as_process():
        o.check()
        validate(o)
        log.quiet_libraries()
        out = Path(o.output)
        created = not out.exists()
        resume, overwrite = distributed.resume_flags(o)
        resume_from = rundir.prepare(out, overwrite=overwrite, resume=resume)
        try:
            if resume and (out / rundir.RECORD).exists() and resume_from is None:
                log.info(f"train: {out} is already finished")
                return out
            rundir.begin(out)
            with rundir.removed_on_failure(out, fresh=resume_from is None, created=created):
                body(o, out, resume_from)
            rundir.finish(out)
        finally:
            rundir.unlock(out / rundir.LOCK)
            distributed.stop()
    return out


def save_common(out: Path, tokenizer, generation_source: str, stops: list[str], keep_checkpoints: bool) -> None:
    """What every finished run writes beside its weights: the tokenizer (checked to load back
    alike), a generation config that stops at the template's stop words, the loss plot; and
    the checkpoints go unless asked to stay."""
    from lmforge.shared.modeldir.tokenizers import save_tokenizer
    from lmforge.shared.modeldir.weights import write_generation_config

    save_tokenizer(tokenizer, str(out))
    write_generation_config(generation_source, out, tokenizer, stops)
    (out / "training_args.bin").unlink(missing_ok=True)
    if not keep_checkpoints:
        shutil.rmtree(out / rundir.CHECKPOINTS, ignore_errors=True)
    rundir.plot_loss(out)
