"""A training run's progress as the user sees it and as a resumed run continues it: the progress
line on stderr (loss, tokens/s, rewards), OUT/trainer_log.jsonl, and beside each checkpoint the
run's totals so far (summed loss, tokens, seconds), so a resumed run reports the whole run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lmforge.shared.core import log, rundir
from lmforge.shared.train.patches import trainer as trainer_seams

PROGRESS = "lmforge_progress.json"   # in each checkpoint: the run's totals so far (for --resume)
# what a log line holds that the progress line shows too, and how it is labelled there
SHOWN = {"reward": "reward", "kl": "kl", "rewards/accuracies": "acc", "rewards/margins": "margin", "accuracy": "acc",
         "agent/turns": "turns"}


def step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.split("-")[-1]) if checkpoint else 0


def progress_of(checkpoint: Path | None) -> dict:
    """What a run had done when `checkpoint` was saved: summed loss, tokens, seconds (zeros for a
    fresh start), so that a resumed run reports the whole run, not only its last part."""
    empty = {"loss_sum": 0.0, "tokens": 0, "runtime_seconds": 0.0}
    if checkpoint is None:
        return empty
    try:
        return {**empty, **json.loads((checkpoint / PROGRESS).read_text())}
    except (OSError, ValueError):
        log.warn(f"train: {checkpoint} has no {PROGRESS}: the figures cover the resumed part only")
        return empty




def make_callbacks(collator, out: Path, total_hint: int, resumed_step: int, previous: dict | None = None,
                   replicas: int = 1):
    """`replicas`: processes that see the same rows (a context-parallel group), counted once in tokens/s."""
    from transformers import TrainerCallback

    journal = rundir.JsonlLog(out / rundir.LOG)
    before = previous or progress_of(None)

    class Reporter(TrainerCallback):
        """A progress bar (loss, tokens/s, ETA) on stderr and trainer_log.jsonl."""

        def __init__(self):
            self.bar = None
            self.trainer = None      # set by the caller: the loss totals live on it
            self.start = time.monotonic()
            self.tokens_at_start = 0
            self.batches_at_start = 0
            self.consumed = 0
            self.last_loss = None
            self.shown: dict = {}   # rewards, accuracies, KL on the progress line too (SHOWN)
            self.pending = False    # a step ended whose log line comes next

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                if resumed_step:
                    journal.truncate_after(resumed_step)
                self.bar = log.Progress("train", total=state.max_steps or total_hint, unit="steps").__enter__()
                if resumed_step:
                    self.bar.resume_at(resumed_step)
            self.start = time.monotonic()
            self.tokens_at_start = collator.tokens
            self.batches_at_start = len(getattr(collator, "counts", []))
            self.consumed = 0
            if resumed_step and self.trainer is not None and "pending_loss" in before:
                trainer_seams.restore_pending_loss(self.trainer, before["pending_loss"], before["last_logged_step"],
                                                   args.device)

        def trained_tokens(self) -> int:
            """Tokens of the batches that trained in this part of the run (the data loader collates
            one batch ahead, so the collator's own total runs ahead of training)."""
            counts = getattr(collator, "counts", None)
            if counts is None:
                return collator.tokens - self.tokens_at_start
            return sum(counts[self.batches_at_start:self.batches_at_start + self.consumed])

        def on_substep_end(self, args, state, control, **kw):
            self.consumed += 1   # a gradient-accumulation micro-batch

        def tokens_per_second(self) -> float:
            world = int(os.environ.get("WORLD_SIZE", "1")) // replicas
            return (collator.tokens - self.tokens_at_start) * world / max(time.monotonic() - self.start, 1e-9)

        def on_step_end(self, args, state, control, **kw):
            self.consumed += 1
            # the Trainer logs a step's loss after on_step_end: a step that logs is shown then, with
            # its own loss (and rewards), not the previous log line's
            logs = args.logging_steps and (state.global_step % args.logging_steps == 0
                                           or (state.global_step == 1 and args.logging_first_step))
            self.pending = bool(logs)
            if not self.pending:
                self.show()

        def show(self) -> None:
            self.pending = False
            if self.bar is not None:
                fields = {"tok/s": round(self.tokens_per_second())}
                if self.last_loss is not None:
                    fields = {"loss": round(self.last_loss, 4), **self.shown, **fields}
                self.bar.advance(1, **fields)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            if "loss" in logs:
                self.last_loss = float(logs["loss"])
            shown = {label: round(float(logs[k]), 3) for k, label in SHOWN.items() if isinstance(logs.get(k), (int, float))}
            if shown or "loss" in logs:
                self.shown = shown
            entry = {"step": state.global_step, "epoch": round(state.epoch or 0, 4),
                     "elapsed_s": round(before["runtime_seconds"] + time.monotonic() - self.start, 2),
                     "tokens_per_second": round(self.tokens_per_second(), 1), **logs}
            journal.write(entry)
            if "eval_loss" in logs:
                log.info(f"train: step {state.global_step}: eval loss {logs['eval_loss']:.4f}")
            if getattr(self, "pending", False):
                self.show()

        def on_save(self, args, state, control, **kw):
            """Beside the checkpoint: the totals a resumed run starts from (the tokens of every
            process's batches: a collective, so every process comes here)."""
            if self.trainer is None:
                return
            from lmforge.shared.train.distributed import total

            tokens = total(self.trained_tokens(), replicas)
            if not state.is_world_process_zero:
                return
            logged, pending, last_logged = trainer_seams.loss_totals(self.trainer)
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                rundir.write_json(checkpoint / PROGRESS, {
                    "step": state.global_step, "loss_sum": before["loss_sum"] + logged,
                    "pending_loss": pending,
                    "last_logged_step": state.global_step if last_logged is None else last_logged,
                    "tokens": before["tokens"] + tokens,
                    "runtime_seconds": before["runtime_seconds"] + time.monotonic() - self.start})

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.__exit__(None, None, None)
                self.bar = None

    return [Reporter()]


def graceful_stop():
    """Ctrl-C or SIGTERM (or SIGHUP) while training, once a step has finished: the step under way
    finishes, a checkpoint is saved, the run stops and says how to resume. A second signal, or one
    before the first step, stops at once as usual. In a multi-process run every process stops at
    the same step (the request is shared at each step's end)."""
    from transformers import TrainerCallback

    class GracefulStop(TrainerCallback):
        def __init__(self):
            self.requested: int | None = None   # the signal that asked for the stop
            self.armed = False                   # a step has finished: there is something to save
            self.stopped_at: int | None = None

        def on_step_end(self, args, state, control, **kw):
            self.armed = True
            if _shared_request(self.requested):
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step

        def handling_signals(self):
            import signal
            import threading
            from contextlib import contextmanager

            from lmforge.shared.core.errors import Terminated

            @contextmanager
            def installed():
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return

                def handle(signum, frame):
                    if not self.armed or self.requested is not None:   # nothing to save yet, or asked twice
                        if signum == signal.SIGINT:
                            raise KeyboardInterrupt
                        raise Terminated(signum)
                    self.requested = signum
                    if int(os.environ.get("RANK", "0")) == 0:
                        log.info(f"train: {signal.Signals(signum).name}: stopping after this step, with a checkpoint "
                                 "(again to stop now)")

                sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                previous = {s: signal.signal(s, handle) for s in sigs}
                try:
                    yield
                finally:
                    for s, h in previous.items():
                        signal.signal(s, h)

            return installed()

        def raise_if_stopped(self) -> None:
            """After trainer.train(): a requested stop ends the run here, its checkpoint kept."""
            if self.requested is None or self.stopped_at is None:
                return
            import shlex
            import signal
            import sys

            from lmforge.shared.core.errors import Terminated

            if int(os.environ.get("RANK", "0")) == 0:
                argv = [a for a in sys.argv if a != "--resume"]
                command = shlex.join(["lmforge" if Path(argv[0]).name == "lmforge" else argv[0], *argv[1:], "--resume"])
                log.info(f"train: stopped at step {self.stopped_at}, its checkpoint saved; to go on: {command}")
            if self.requested == signal.SIGINT:
                raise KeyboardInterrupt
            raise Terminated(self.requested)

    return GracefulStop()


def _shared_request(requested) -> bool:
    """Whether any process asked to stop (every process must stop at the same step)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return requested is not None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return requested is not None
    flag = torch.tensor([1 if requested is not None else 0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
