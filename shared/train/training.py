"""`train pt` and `train sft`: the Hugging Face Trainer on packed data, with our methods.

The path: check the data against the model's tokenizer -> load the model for the device ->
set up the method -> Trainer with the padding-free collator -> save the result and the record.
Runs unchanged under torchrun / accelerate launch (DDP), DeepSpeed ZeRO-2/3, and on one device.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmforge.shared.core import catalog
from lmforge.shared.core import log, rundir
from lmforge.shared.core.errors import BadInput, RunFailure
from lmforge.shared.core.meta import file_digest
from lmforge.shared.data.packed import PackedData, check_tokenizer, open_packed
from lmforge.shared.model.models import check_context, write_generation_config
from lmforge.shared.train import reporting
from lmforge.shared.train.checkpointing import checkpointing_kwargs
from lmforge.shared.train.methods import MethodOptions

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")


_DEFAULTS = catalog.defaults("train sft")   # the options' declared defaults


@dataclass
class TrainOptions:
    stage: str
    model: str
    data: str
    output: Path
    eval_data: str | None = _DEFAULTS["eval_data"]
    overwrite: bool = _DEFAULTS["overwrite"]
    resume: bool = _DEFAULTS["resume"]
    method: MethodOptions = field(default_factory=MethodOptions)
    learning_rate: float | None = _DEFAULTS["learning_rate"]
    epochs: float = _DEFAULTS["epochs"]
    max_steps: int = _DEFAULTS["max_steps"]
    warmup: float = _DEFAULTS["warmup"]
    weight_decay: float = _DEFAULTS["weight_decay"]
    max_grad_norm: float = _DEFAULTS["max_grad_norm"]
    batch_size: int = _DEFAULTS["batch_size"]
    grad_accum: int = _DEFAULTS["grad_accum"]
    scheduler: str = _DEFAULTS["scheduler"]
    gradient_checkpointing: bool = _DEFAULTS["gradient_checkpointing"]
    neftune_alpha: float | None = _DEFAULTS["neftune_alpha"]
    precision: str = _DEFAULTS["precision"]
    attn: str = _DEFAULTS["attn"]
    rope_scaling: str = _DEFAULTS["rope_scaling"]
    shift_attn: bool = _DEFAULTS["shift_attn"]   # issue 21: S² attention while training (shiftattn.py)
    kernels: str = _DEFAULTS["kernels"]          # issue 21: liger | unsloth | none (kernels.py)
    checkpointing: str = _DEFAULTS["checkpointing"]   # issue 21: full | selective (checkpointing.py)
    checkpoint_every: int = _DEFAULTS["checkpoint_every"]   # issue 21: checkpoint every N-th layer
    seed: int = _DEFAULTS["seed"]
    save_steps: int = _DEFAULTS["save_steps"]
    keep_checkpoints: bool = _DEFAULTS["keep_checkpoints"]
    logging_steps: int = _DEFAULTS["logging_steps"]
    eval_steps: int | None = _DEFAULTS["eval_steps"]
    report: list[str] | None = _DEFAULTS["report"]   # trackers (shared/train/reporting.py)
    deepspeed: str | None = _DEFAULTS["deepspeed"]
    fsdp: bool = _DEFAULTS["fsdp"]
    optim: str = _DEFAULTS["optim"]
    quant: int | None = _DEFAULTS["quant"]
    extra: dict = field(default_factory=dict)   # stage-specific settings, recorded as they are

    def __post_init__(self):
        if self.checkpointing == "selective":   # selective is a kind of gradient checkpointing: it turns it on
            self.gradient_checkpointing = True

    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.method.is_adapter else 1e-5


# ----------------------------------------------------------------------------- settings

def deepspeed_config(spec: str) -> dict | str:
    """z2 | z3 | z3-offload, or a JSON file of one's own."""
    base = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    if spec == "z2":
        return {**base, "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True}}
    if spec in ("z3", "z3-offload"):
        zero: dict[str, object] = {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                "stage3_gather_16bit_weights_on_model_save": True}
        if spec == "z3-offload":
            zero.update({"offload_optimizer": {"device": "cpu", "pin_memory": True},
                         "offload_param": {"device": "cpu", "pin_memory": True}})
        return {**base, "zero_optimization": zero}
    path = Path(spec)
    if not path.is_file():
        raise BadInput(f"--deepspeed {spec}: not z2, z3, z3-offload or a config file")
    return str(path)


def validate(o: TrainOptions) -> None:
    from lmforge.shared.train.methods import validate as validate_method

    validate_method(o.method)
    if o.scheduler not in SCHEDULERS:
        raise BadInput(f"unknown scheduler '{o.scheduler}'", f"use one of {', '.join(SCHEDULERS)}")
    if o.batch_size < 1 or o.grad_accum < 1:
        raise BadInput("--batch-size and --grad-accum must be at least 1")
    if o.learning_rate is not None and not o.learning_rate > 0:
        raise BadInput(f"--learning-rate {o.learning_rate:g}: must be above 0", "e.g. 2e-4 for LoRA, 2e-5 for full")
    if o.epochs <= 0 and o.max_steps <= 0:
        raise BadInput("give --epochs > 0 or --max-steps > 0")
    if o.neftune_alpha is not None and not o.neftune_alpha > 0:
        raise BadInput(f"--neftune-alpha {o.neftune_alpha:g}: must be above 0", "the NEFTune paper uses 5 to 15")
    if o.warmup < 0:
        raise BadInput("--warmup must be >= 0 (a fraction below 1, or a step count)")
    if o.max_steps != -1 and o.max_steps < 1:
        raise BadInput(f"--max-steps {o.max_steps}: must be at least 1", "or leave it out to train by --epochs")
    for name, value in (("--save-steps", o.save_steps), ("--logging-steps", o.logging_steps),
                        ("--eval-steps", o.eval_steps)):
        if value is not None and value < 1:
            raise BadInput(f"{name} {value}: must be at least 1")
    if not o.max_grad_norm >= 0:
        raise BadInput(f"--max-grad-norm {o.max_grad_norm:g}: must be >= 0", "0 turns clipping off")
    if not o.weight_decay >= 0:
        raise BadInput(f"--weight-decay {o.weight_decay:g}: must be >= 0")
    if not o.epochs >= 0 or o.epochs == float("inf"):
        raise BadInput(f"--epochs {o.epochs:g}: must be a finite number >= 0")
    from lmforge.shared.train.reporting import check as check_report

    check_report(o.report)   # known trackers, their packages installed
    if o.deepspeed and o.fsdp:
        raise BadInput("--deepspeed and --fsdp exclude each other")
    if o.shift_attn:   # issue 21
        from lmforge.shared.train.shiftattn import check_attention

        check_attention(o.attn)
        reference = o.stage == "dpo" and o.extra.get("loss") in ("sigmoid", "ipo", "hinge", "kto")
        if reference and (not o.method.is_adapter or o.extra.get("precompute_ref")):
            # TRL loads its own frozen reference (or precomputes), with full attention: the policy's
            # S² log-probs would be compared with full-attention ones from the first step on
            raise BadInput(f"--shift-attn with --loss {o.extra.get('loss')} needs the reference to be the policy's own "
                           "layers (adapter methods, no --precompute-ref)",
                           "use --method lora, or a reference-free loss (--loss orpo or simpo)")
    if o.checkpointing not in catalog.CHECKPOINTING:
        raise BadInput(f"--checkpointing {o.checkpointing}: use {' or '.join(catalog.CHECKPOINTING)}")
    if o.checkpoint_every < 1:
        raise BadInput(f"--checkpoint-every {o.checkpoint_every}: must be at least 1", "1 checkpoints every layer")
    if o.checkpoint_every > 1 and not o.gradient_checkpointing:
        raise BadInput(f"--checkpoint-every {o.checkpoint_every} without gradient checkpointing",
                       "add --gradient-checkpointing (or --checkpointing selective)")
    if o.checkpointing == "selective" and _zero3(o.deepspeed):
        # PEFT under ZeRO-3 needs reentrant checkpointing (TRL forces it), which takes no selective policy
        raise BadInput("--checkpointing selective does not run under --deepspeed z3 (ZeRO-3 checkpoints reentrantly)",
                       "use --checkpointing full with ZeRO-3, or --deepspeed z2")
    if o.checkpointing == "selective" and o.kernels == "unsloth":
        raise BadInput("--checkpointing selective with --kernels unsloth: Unsloth checkpoints its own way",
                       "drop --checkpointing selective (Unsloth's offloaded checkpointing runs)")
    if o.kernels not in catalog.KERNELS:
        raise BadInput(f"--kernels {o.kernels}: use {', '.join(catalog.KERNELS)}")
    if o.quant is not None and not o.method.is_adapter:
        raise BadInput(f"--quant {o.quant} (quantized weights) trains adapters only, not --method {o.method.method}",
                       "use --method lora, dora or pissa")
    if o.quant not in (None, 4, 8):
        raise BadInput(f"--quant {o.quant}: use 4 or 8")
    from lmforge.shared.model.models import is_quantized_dir

    if is_quantized_dir(o.model):
        if not o.method.is_adapter:
            raise BadInput(f"--model {o.model} holds quantized weights: they train adapters only, "
                           f"not --method {o.method.method}", "use --method lora, dora or pissa")
        if o.quant:
            raise BadInput(f"--model {o.model} is already quantized", "drop --quant")


def _training_arguments(o: TrainOptions, device, out: Path, eval_data: PackedData | None):
    import torch
    from transformers import TrainingArguments

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if o.fsdp and device.kind != "cuda":
        raise BadInput("--fsdp needs CUDA GPUs (accelerate silently turns FSDP off on a CPU)",
                       "use --deepspeed z3 on CPUs")
    eval_steps = o.eval_steps or o.save_steps
    kwargs = dict(
        output_dir=str(out / rundir.CHECKPOINTS), per_device_train_batch_size=o.batch_size,
        per_device_eval_batch_size=o.batch_size, gradient_accumulation_steps=o.grad_accum,
        learning_rate=o.lr(), num_train_epochs=o.epochs if o.max_steps <= 0 else 1.0, max_steps=o.max_steps,
        warmup_steps=o.warmup, weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm,
        lr_scheduler_type=o.scheduler, logging_steps=o.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=o.save_steps, save_total_limit=2,
        eval_strategy="steps" if eval_data is not None else "no", eval_steps=eval_steps if eval_data else None,
        bf16=device.dtype_name == "bf16" and device.kind != "cpu", fp16=device.dtype_name == "fp16",
        seed=o.seed, data_seed=o.seed, report_to=_trackers(o) or "none", run_name=out.name,
        gradient_checkpointing=o.gradient_checkpointing,
        gradient_checkpointing_kwargs=checkpointing_kwargs(o.checkpointing, o.checkpoint_every) if o.gradient_checkpointing else None,
        remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0, neftune_noise_alpha=o.neftune_alpha,
        use_cpu=device.kind == "cpu", save_only_model=False, ddp_find_unused_parameters=False,
    )
    if distributed and device.kind == "cpu":
        kwargs["ddp_backend"] = "gloo"
    if o.deepspeed:
        kwargs["deepspeed"] = deepspeed_config(o.deepspeed)
    if o.fsdp:
        kwargs["fsdp"] = "full_shard auto_wrap"
    from lmforge.shared.train.optimizers import galore_arguments, optimizer_name

    if o.method.method == "galore":
        kwargs.update(galore_arguments(o))
    else:
        kwargs["optim"] = optimizer_name(o.optim, o.method.method)
    if o.extra.get("training_arguments"):
        kwargs.update(o.extra["training_arguments"])
    if device.kind == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return TrainingArguments(**kwargs)


# ----------------------------------------------------------------------------- callbacks

PROGRESS = "lmforge_progress.json"   # in each checkpoint: the run's totals so far (for --resume)


def progress_of(checkpoint: Path | None) -> dict:
    """What a run had done when `checkpoint` was saved: summed loss, tokens, seconds (zeros for a
    fresh start), so that a resumed run reports the whole run, not only its last part."""
    import json

    empty = {"loss_sum": 0.0, "tokens": 0, "runtime_seconds": 0.0}
    if checkpoint is None:
        return empty
    try:
        return {**empty, **json.loads((checkpoint / PROGRESS).read_text())}
    except (OSError, ValueError):
        log.warn(f"train: {checkpoint} has no {PROGRESS}: the figures cover the resumed part only")
        return empty


def make_callbacks(collator, out: Path, total_hint: int, resumed_step: int, previous: dict | None = None):
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
            self.shown: dict = {}   # grpo: the mean reward and KL on the progress line too

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                if resumed_step:
                    journal.truncate_after(resumed_step)
                self.bar = log.Progress("train", total=state.max_steps or total_hint, unit="steps").__enter__()
                if resumed_step:
                    self.bar.done = resumed_step
            self.start = time.monotonic()
            self.tokens_at_start = collator.tokens
            self.batches_at_start = len(getattr(collator, "counts", []))
            self.consumed = 0
            trainer = self.trainer
            if resumed_step and trainer is not None and "pending_loss" in before:
                import torch

                trainer._tr_loss = torch.tensor(before["pending_loss"], device=args.device)
                trainer._globalstep_last_logged = before["last_logged_step"]

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
            world = int(os.environ.get("WORLD_SIZE", "1"))
            return (collator.tokens - self.tokens_at_start) * world / max(time.monotonic() - self.start, 1e-9)

        def on_step_end(self, args, state, control, **kw):
            self.consumed += 1
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
            self.shown = {k: round(float(logs[k]), 3) for k in ("reward", "kl") if isinstance(logs.get(k), (int, float))}
            entry = {"step": state.global_step, "epoch": round(state.epoch or 0, 4),
                     "elapsed_s": round(before["runtime_seconds"] + time.monotonic() - self.start, 2),
                     "tokens_per_second": round(self.tokens_per_second(), 1), **logs}
            journal.write(entry)
            if "eval_loss" in logs:
                log.info(f"train: step {state.global_step}: eval loss {logs['eval_loss']:.4f}")

        def on_save(self, args, state, control, **kw):
            """Beside the checkpoint: the totals a resumed run starts from."""
            trainer = self.trainer
            if not state.is_world_process_zero or trainer is None:
                return
            # the Trainer sums the loss of the steps since its last log line in _tr_loss, and moves it
            # into _total_loss_scalar at each log line: both are kept, so that a resumed run logs
            # the same windows (and the same mean loss) as an uninterrupted one
            logged = float(getattr(trainer, "_total_loss_scalar", 0.0))
            on_device = getattr(trainer, "_tr_loss", None)
            pending = float(on_device.item()) if on_device is not None and hasattr(on_device, "item") \
                else float(on_device or 0.0)
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                rundir.write_json(checkpoint / PROGRESS, {
                    "step": state.global_step, "loss_sum": before["loss_sum"] + logged,
                    "pending_loss": pending,
                    "last_logged_step": int(getattr(trainer, "_globalstep_last_logged", state.global_step)),
                    "tokens": before["tokens"] + self.trained_tokens(),
                    "runtime_seconds": before["runtime_seconds"] + time.monotonic() - self.start})

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.__exit__(None, None, None)
                self.bar = None

    return [Reporter()]


# ----------------------------------------------------------------------------- the run

def setup_distributed(o: TrainOptions, device) -> None:
    """CPU multi-process runs talk over gloo; DeepSpeed must be initialised before the model loads."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if o.deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if device.kind == "cpu" else "nccl")


def run(o: TrainOptions, build_trainer=None) -> Path:
    """Train and save; returns the output directory. `build_trainer` lets other stages (rm, dpo,
    ppo) reuse the set-up with their own trainer."""
    validate(o)
    log.quiet_libraries()
    out = Path(o.output)
    created = not out.exists()
    resume_from = rundir.prepare(out, overwrite=o.overwrite, resume=o.resume)
    try:
        if o.resume and (out / rundir.RECORD).exists() and resume_from is None:
            log.info(f"train: {out} is already finished")
            return out
        rundir.begin(out)
        with rundir.removed_on_failure(out, fresh=resume_from is None, created=created):
            _train(o, out, resume_from, build_trainer)
        rundir.finish(out)
    finally:
        rundir.unlock(out / rundir.LOCK)
    return out



def _train(o: TrainOptions, out: Path, resume_from: Path | None, build_trainer) -> None:
    from lmforge.shared.model.models import (
        choose_device,
        count_parameters,
        load_model,
        load_tokenizer_for,
    )
    from lmforge.shared.train.methods import apply as apply_method

    stages = (o.stage,) if o.stage in ("pt", "sft") else o.extra.get("data_stages", (o.stage,))
    data = open_packed(o.data, stages)
    eval_data = open_packed(o.eval_data, stages, "--eval-data") if o.eval_data else None
    if o.rope_scaling == "none":   # positions past the model's context: refused before the model loads
        check_context(o.model, {"--data": data, "--eval-data": eval_data}, o.extra.get("max_new_tokens", 0))
    device = choose_device(o.precision, o.attn)
    setup_distributed(o, device)
    from transformers import set_seed

    set_seed(o.seed)  # before the model is built: adapter and new-block initialisation are random
    added = (data.meta.get("tokenizer") or {}).get("added_tokens", [])
    tokenizer = load_tokenizer_for(o.model, added)
    check_tokenizer(data, tokenizer, o.model)
    if eval_data is not None:
        check_tokenizer(eval_data, tokenizer, o.model, "--eval-data")
    o.method.added_token_ids = tokenizer.convert_tokens_to_ids(added) if added and o.method.is_adapter else []
    from lmforge.shared.train import kernels, packedattn, shiftattn

    kernels.check(o.kernels, device.kind, o.method.method, o.quant)   # CUDA only: refused before loading
    if o.shift_attn and device.attn == "auto":
        device.attn = "sdpa"   # S² reads sdpa's (or eager's) masks: not flash-attention's
    if o.kernels == "unsloth":
        model = kernels.load_unsloth(o.model, device, cutoff=data.meta.get("cutoff"), quant=o.quant)
        from lmforge.shared.model.models import resize_to

        resize_to(model, tokenizer)
    else:
        model = load_model(o.model, device, cutoff=data.meta.get("cutoff"), rope=o.rope_scaling, quant=o.quant,
                           tokenizer=tokenizer)
    if o.shift_attn:   # before PEFT wraps the model; undone before saving (save_result)
        shiftattn.check_model(model.config)
        shiftattn.install(model)
        log.info(f"train: S² attention (--shift-attn) while training, over {device.attn}")
    neat = data.meta.get("packing") == "neat"
    if not o.shift_attn and packedattn.applies(model, device.attn, neat):   # one causal attention per example
        packedattn.install(model)
        log.info("train: neat-packed rows attend example by example (sdpa per example)")
    if o.kernels == "liger":
        kernels.apply_liger(model)
    if o.quant:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=o.gradient_checkpointing)
    pissa_init = out / "pissa_init"
    if o.kernels == "unsloth":
        model = kernels.unsloth_lora(model, o.method, o.gradient_checkpointing, o.seed)
    else:
        model = apply_method(model, o.method)
    if o.method.method == "pissa" and resume_from is None and int(os.environ.get("RANK", "0")) == 0:
        model.save_pretrained(str(pissa_init))  # the starting point, to convert the result back to plain LoRA
    trainable, total = count_parameters(model)
    log.info(f"train: {o.stage} {o.method.method} on {device.kind} ({device.dtype_name}, {device.attn}); "
             f"{trainable:,} of {total:,} parameters train ({trainable / max(total, 1):.2%}); "
             f"lr {o.lr():g}; {data.rows:,} rows")
    args = _training_arguments(o, device, out, eval_data)
    builder = build_trainer or build_default_trainer
    trainer, collator = builder(o, model, tokenizer, args, data, eval_data)
    previous = progress_of(resume_from)
    reporter = make_callbacks(collator, out, total_hint=0, resumed_step=_step_of(resume_from), previous=previous)
    reporter[0].trainer = trainer
    for callback in reporter:
        trainer.add_callback(callback)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if "tensorboard" in reporting.names(o.report):
        trainer.add_callback(_tensorboard(out))
    if _trackers(o):
        trainer.add_callback(reporting.run_config_callback(_trackers(o), run_parameters(o, device)))
    started = time.monotonic()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise RunFailure("out of memory while training",
                             "lower --batch-size or --cutoff, add --gradient-checkpointing, or use --quant") from None
        raise
    runtime = time.monotonic() - started
    # the whole run, a resumed one included: what the checkpoint had done plus this part
    steps_now = int(result.global_step) - _step_of(resume_from)
    loss_sum = previous["loss_sum"] + float(result.training_loss) * max(steps_now, 0)
    tokens = previous["tokens"] + reporter[0].trained_tokens()
    runtime += previous["runtime_seconds"]
    metrics = {"train_loss": round(loss_sum / max(int(result.global_step), 1), 6), "steps": int(result.global_step),
               "runtime_seconds": round(runtime, 2), "tokens": tokens,
               "tokens_per_second": round(reporter[0].tokens_per_second(), 1),
               "trainable_parameters": trainable, "total_parameters": total,
               **(trainer.lmforge_metrics() if hasattr(trainer, "lmforge_metrics") else {})}  # grpo: rewards
    if device.kind == "cuda":  # what the run held at most, as the seed's memory table counts it
        import torch

        metrics["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if eval_data is not None:
        evaluated = trainer.evaluate()
        metrics.update({k: round(float(v), 6) for k, v in evaluated.items() if k.startswith("eval_") and
                        isinstance(v, (int, float))})
    save_result(o, trainer, model, tokenizer, data, out, metrics, device, pissa_init)


def _trackers(o: TrainOptions) -> list[str]:
    """The trackers the Trainer's integrations report to (TensorBoard has its own callback: OUT/tensorboard)."""
    return [n for n in reporting.names(o.report) if n != "tensorboard"]


def run_parameters(o: TrainOptions, device) -> dict:
    """The run's parameters as lmforge.json records them (also each tracker's run config)."""
    return {"stage": o.stage, "base_model": rundir.model_ref(o.model), "method": o.method.method,
            "method_options": {k: v for k, v in asdict(o.method).items() if k != "added_token_ids"},
            "hyperparameters": {"learning_rate": o.lr(), "epochs": o.epochs, "max_steps": o.max_steps,
                                "warmup": o.warmup, "weight_decay": o.weight_decay, "max_grad_norm": o.max_grad_norm,
                                "batch_size": o.batch_size, "grad_accum": o.grad_accum, "scheduler": o.scheduler,
                                "seed": o.seed, "precision": device.dtype_name, "optim": o.optim,
                                "gradient_checkpointing": o.gradient_checkpointing, "quant": o.quant,
                                "shift_attn": o.shift_attn, "kernels": o.kernels,   # issue 21
                                "checkpointing": o.checkpointing if o.gradient_checkpointing else None,
                                "checkpoint_every": o.checkpoint_every if o.gradient_checkpointing else None,
                                "neftune_alpha": o.neftune_alpha,
                                "deepspeed": o.deepspeed, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                                **{k: v for k, v in o.extra.items()
                                   if k not in ("training_arguments", "data_stages", "kind")}}}


def _step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.split("-")[-1]) if checkpoint else 0


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback
    except ImportError:
        raise BadInput("--report tensorboard needs tensorboard", "pip install 'lmforge[tensorboard]'") from None
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out / "tensorboard")))


def build_default_trainer(o: TrainOptions, model, tokenizer, args, data: PackedData, eval_data: PackedData | None):
    """pt/sft: the plain Trainer on packed rows with the padding-free collator."""
    from lmforge.shared.data.collate import PackedCollator
    from transformers import Trainer

    collator = PackedCollator(neat=data.meta.get("packing") == "neat", pad_id=tokenizer.pad_token_id or 0)
    if data.meta.get("vision"):   # issue 17: images decoded and processed per batch
        collator = vision_collator(o.model, model, tokenizer, data)
    optimizers: tuple[Any, None] = (None, None)  # (a torch optimizer, or None for the Trainer's own; no scheduler)
    if o.method.loraplus_ratio:
        import torch
        from peft.optimizers import create_loraplus_optimizer

        optimizers = (create_loraplus_optimizer(model, optimizer_cls=torch.optim.AdamW, lr=o.lr(),
                                                loraplus_lr_ratio=o.method.loraplus_ratio,
                                                weight_decay=o.weight_decay), None)
    from lmforge.shared.train.optimizers import custom_optimizer

    custom = custom_optimizer(o, model)
    if custom is not None:
        optimizers = (custom, None)
    trainer = Trainer(model=model, args=args, train_dataset=data.dataset,
                      eval_dataset=eval_data.dataset if eval_data else None, data_collator=collator,
                      optimizers=optimizers)
    # ZeRO-3 only gathers a layer's weights inside that layer's forward: keep the standard loss there
    if not _zero3(o.deepspeed) and o.kernels in ("none", "", None):   # liger/unsloth fuse the loss themselves
        from lmforge.shared.train import lossfn

        # output layer + loss in chunks: less memory; our own attribute, read back with getattr
        trainer.lmforge_restore = lossfn.install(model)  # type: ignore[attr-defined]
    return trainer, collator


def vision_collator(model_dir: str, model, tokenizer, data: PackedData):
    """The collator for a vision-language model's packed sft data (issue 17)."""
    import inspect

    from lmforge.shared.data import multimodal
    from lmforge.shared.data.collate import VisionCollator
    from lmforge.shared.model import vision

    vision.require_vlm(model, model_dir, data)
    images = multimodal.for_packed(model_dir, tokenizer, data)
    family = images.name
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    rope_index = getattr(inner, "get_rope_index", None) if family.startswith("qwen") else None
    accepted = inspect.signature(base.forward).parameters
    token_types = next((n for n in ("mm_token_type_ids", "token_type_ids") if n in accepted), None)
    return VisionCollator(neat=data.meta.get("packing") == "neat", pad_id=tokenizer.pad_token_id or 0,
                          vision=images, rope_index=rope_index, token_types=token_types)


def _zero3(spec: str | None) -> bool:
    """Whether --deepspeed names ZeRO-3 (z3, z3-offload, or a config file of stage 3)."""
    if not spec:
        return False
    if spec.startswith("z3"):
        return True
    import json

    try:
        return json.loads(Path(spec).read_text()).get("zero_optimization", {}).get("stage") == 3
    except (OSError, ValueError):
        return False


def save_result(o: TrainOptions, trainer, model, tokenizer, data: PackedData, out: Path, metrics: dict,
                device, pissa_init: Path) -> None:
    """The final model or adapter, the tokenizer, a generation config, the log plot, lmforge.json."""
    import shutil

    restore = getattr(trainer, "lmforge_restore", None)
    if restore is not None:
        restore()
    from lmforge.shared.train import packedattn, shiftattn

    # the saved model (and anything that reuses `model`) gets its own attention back
    shiftattn.uninstall(model)
    packedattn.uninstall(model)
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return
    if o.method.method == "pissa":
        # a plain LoRA (rank 2r) that applies to the original base weights, not PiSSA's residual
        trainer.model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(pissa_init))
        shutil.rmtree(pissa_init, ignore_errors=True)
    from lmforge.shared.data.tokenizing import save_tokenizer

    save_tokenizer(tokenizer, str(out))  # checked to load back alike
    from lmforge.shared.model.models import copy_image_processor

    copy_image_processor(o.model, out)   # issue 17: a trained vision-language model keeps its image processor
    stops = data.meta.get("stop_words") or [tokenizer.eos_token]
    write_generation_config(o.model, out, tokenizer, stops)
    for leftover in ("training_args.bin",):
        (out / leftover).unlink(missing_ok=True)
    if not o.keep_checkpoints:
        shutil.rmtree(out / rundir.CHECKPOINTS, ignore_errors=True)
    rundir.plot_loss(out)
    record = rundir.record(
        o.extra.get("kind") or ("adapter" if o.method.is_adapter else "model"),
        **{k: v for k, v in run_parameters(o, device).items() if k != "hyperparameters"},
        data={"path": str(data.path), "fingerprint": file_digest(data.path), "rows": data.rows,
              "cutoff": data.meta.get("cutoff"), "packing": data.meta.get("packing")},
        eval_data=o.eval_data, template=data.meta.get("template"), stop_words=stops,
        added_tokens=(data.meta.get("tokenizer") or {}).get("added_tokens", []),
        tokenizer_fingerprint=(data.meta.get("tokenizer") or {}).get("fingerprint"),
        hyperparameters=run_parameters(o, device)["hyperparameters"],
        device={"kind": device.kind, "attention": device.attn}, metrics=metrics,
    )
    rundir.write_record(out, record)
    log.info(f"train: done: loss {metrics['train_loss']:.4f}" +
             (f", eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "") +
             f", {metrics['tokens_per_second']:,.0f} tokens/s, {metrics['runtime_seconds']:.0f}s")
