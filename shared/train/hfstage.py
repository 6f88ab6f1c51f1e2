"""The stages the Hugging Face Trainer runs (pt, sft, rm, the dpo family, grpo): load the data, the
tokenizer and the model for the device, set up the method, let the stage build its trainer, train,
and save the result with its record. The stage's own part is its trainer builder:

    pt, sft  training.build_default_trainer     rm   preference.build_rm_trainer
    dpo      preference.build_dpo_trainer        grpo grpo.build_grpo_trainer

Runs unchanged under torchrun / accelerate launch (DDP), DeepSpeed ZeRO-2/3, and on one device.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

from lmforge.shared.core import log, rundir
from lmforge.shared.core.commands.train import TrainDPO, TrainGRPO, TrainRM, Training
from lmforge.shared.core.errors import BadInput, RunFailure
from lmforge.shared.core.meta import file_digest
from lmforge.shared.data.packed import PackedData, check_tokenizer, open_packed
from lmforge.shared.train import arguments, distributed, fsdp, patches, progress, reporting, sharded
from lmforge.shared.train.lifecycle import save_common


def builder_of(o: Training):
    """The stage's trainer builder: (o, model, tokenizer, args, data, eval_data) -> (trainer, token counter)."""
    if isinstance(o, TrainRM):
        from lmforge.shared.train.preference import build_rm_trainer

        return build_rm_trainer
    if isinstance(o, TrainDPO):
        from lmforge.shared.train.preference import build_dpo_trainer

        return build_dpo_trainer
    if isinstance(o, TrainGRPO):
        from lmforge.shared.train.grpo import build_grpo_trainer

        return build_grpo_trainer
    from lmforge.shared.train.training import build_default_trainer

    return build_default_trainer


def validate(o: Training) -> None:
    """What needs more than the options themselves, before anything loads: the trackers'
    packages, the attention kernel S² needs, the model's own weights, the stage's own checks."""
    reporting.check(o.report)   # known trackers, their packages installed
    from lmforge.shared.train.contextpar import stage as context_parallel

    context_parallel.check(o)
    if getattr(o, "shift_attn", False):
        from lmforge.shared.train.patches.shiftattn import check_attention

        check_attention(o.attn)
    from lmforge.shared.modeldir.config import is_quantized

    if is_quantized(o.model):
        if not o.is_adapter:
            raise BadInput(f"--model {o.model} holds quantized weights: they train adapters only, "
                           f"not --method {o.method}", "use --method lora, dora or pissa")
        if o.quant:
            raise BadInput(f"--model {o.model} is already quantized", "drop --quant")
    if isinstance(o, TrainGRPO):
        from lmforge.shared.train.grpo import validate as validate_grpo

        validate_grpo(o)


def train(o: Training, out: Path, resume_from: Path | None) -> None:
    from lmforge.shared.model.models import check_context, choose_device, count_parameters, load_model
    from lmforge.shared.modeldir.tokenizers import load_tokenizer_for
    from lmforge.shared.train.patches import kernels
    from lmforge.shared.train.methods import apply as apply_method

    eval_path = getattr(o, "eval_data", None)
    data = open_packed(o.data, o.accepts())
    eval_data = open_packed(eval_path, o.accepts(), "--eval-data") if eval_path else None
    if o.rope_scaling == "none":   # positions past the model's context: refused before the model loads
        check_context(o.model, {"--data": data, "--eval-data": eval_data}, getattr(o, "max_new_tokens", 0))
    from lmforge.shared.train.contextpar import stage as context_parallel

    context_parallel.check(o, vision=bool(data.meta.get("vision")))
    device = choose_device(o.precision, o.attn)
    fsdp.check(o, device)
    arguments.setup_distributed(o, device)
    distributed.start(o, device)
    sharded.check_resume(o, resume_from, int(os.environ.get("WORLD_SIZE", "1")))
    distributed.check_same(o, out, resume_from)   # every process: same version, options, shared output
    sharded.clean_partial(out)
    layout = context_parallel.setup(o, device)   # its process groups exist before the model loads
    from transformers import set_seed

    set_seed(o.seed)  # before the model is built: adapter and new-block initialisation are random
    added = (data.meta.get("tokenizer") or {}).get("added_tokens", [])
    tokenizer = load_tokenizer_for(o.model, added)
    check_tokenizer(data, tokenizer, o.model)
    if eval_data is not None:
        check_tokenizer(eval_data, tokenizer, o.model, "--eval-data")
    added_ids = tokenizer.convert_tokens_to_ids(added) if added and o.is_adapter else []
    kernel = getattr(o, "kernels", "none")
    shift = getattr(o, "shift_attn", False)
    kernels.check(kernel, device.kind, o.method, o.quant)   # CUDA only: refused before loading
    if (shift or layout is not None) and device.attn == "auto":
        device.attn = "sdpa"   # S² reads sdpa's (or eager's) masks; context parallelism runs sdpa inside
    if kernel == "unsloth":
        model = kernels.load_unsloth(o.model, device, cutoff=data.meta.get("cutoff"), quant=o.quant)
        from lmforge.shared.model.models import resize_to

        resize_to(model, tokenizer)
    else:
        model = load_model(o.model, device, cutoff=data.meta.get("cutoff"), rope=o.rope_scaling, quant=o.quant,
                           tokenizer=tokenizer, masters=not o.is_adapter)
    with ExitStack() as patched:
        # attention and kernel patches go in before PEFT wraps the model, and come out before the
        # model is saved (the saved model, and anything reusing it, gets its own attention back)
        patched.enter_context(patches.model_patches(model, device, shift=shift, kernels=kernel,
                                                    neat=data.meta.get("packing") == "neat", layout=layout,
                                                    mode=getattr(o, "context_parallel_mode", "auto")))
        if o.quant:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=o.gradient_checkpointing)
        pissa_init = out / "pissa_init"
        if kernel == "unsloth":
            model = kernels.unsloth_lora(model, o, o.gradient_checkpointing, o.seed)
        else:
            model = apply_method(model, o, added_ids)
        if o.method == "pissa" and resume_from is None and int(os.environ.get("RANK", "0")) == 0:
            model.save_pretrained(str(pissa_init))  # the starting point, to convert the result back to plain LoRA
        trainable, total = count_parameters(model)
        if fsdp.enabled(o):
            fsdp.shard(model, o, device)
        log.info(f"train: {o.stage} {o.method} on {device.kind} ({device.dtype_name}, {device.attn}); "
                 f"{trainable:,} of {total:,} parameters train ({trainable / max(total, 1):.2%}); "
                 f"lr {o.lr():g}; {data.rows:,} rows")
        args = arguments.training_arguments(o, device, out, eval_data is not None)
        trainer, collator = builder_of(o)(o, model, tokenizer, args, data, eval_data)
        if fsdp.enabled(o):
            fsdp.prepare(trainer, o)
        if layout is not None:
            context_parallel.shard_trainer(trainer, layout, o.stage, tokenizer.pad_token_id or 0)
        patched.enter_context(patches.trainer_patches(trainer, model, o))
        metrics = _fit(o, trainer, collator, out, resume_from, device, eval_data)
        metrics.update(trainable_parameters=trainable, total_parameters=total)
    _save(o, trainer, model, tokenizer, data, out, metrics, device, pissa_init)


def _fit(o: Training, trainer, collator, out: Path, resume_from: Path | None, device, eval_data) -> dict:
    """trainer.train() with lmforge's progress and trackers; the whole run's figures (a resumed
    run's included)."""
    previous = progress.progress_of(resume_from)
    replicas = int(getattr(o, "context_parallel", 1) or 1)
    reporter = progress.make_callbacks(collator, out, total_hint=0, resumed_step=progress.step_of(resume_from),
                                       previous=previous, replicas=replicas)
    reporter[0].trainer = trainer
    for callback in reporter:
        trainer.add_callback(callback)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if "tensorboard" in reporting.names(o.report):
        trainer.add_callback(arguments.tensorboard_callback(out))
    if arguments.trackers(o):
        trainer.add_callback(reporting.run_config_callback(arguments.trackers(o), arguments.run_parameters(o, device)))
    stop = progress.graceful_stop()
    trainer.add_callback(stop)
    started = time.monotonic()
    try:
        with stop.handling_signals(), patches.trainer_state_kept(trainer):
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        stop.raise_if_stopped()
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise RunFailure("out of memory while training",
                             "lower --batch-size or --cutoff, add --gradient-checkpointing, or use --quant") from None
        raise
    runtime = time.monotonic() - started
    # the whole run, a resumed one included: what the checkpoint had done plus this part
    steps_now = int(result.global_step) - progress.step_of(resume_from)
    loss_sum = previous["loss_sum"] + float(result.training_loss) * max(steps_now, 0)
    # every process's batches (rank 0 alone saw its own), so that a run resumed on another number
    # of processes adds up the same
    tokens = previous["tokens"] + distributed.total(reporter[0].trained_tokens(), replicas)
    runtime += previous["runtime_seconds"]
    metrics = {"train_loss": round(loss_sum / max(int(result.global_step), 1), 6), "steps": int(result.global_step),
               "runtime_seconds": round(runtime, 2), "tokens": tokens,
               "tokens_per_second": round(reporter[0].tokens_per_second(), 1),
               **(trainer.lmforge_metrics() if hasattr(trainer, "lmforge_metrics") else {})}  # grpo: rewards
    if device.kind == "cuda":  # what the run held at most, as the seed's memory table counts it
        import torch

        metrics["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if eval_data is not None:
        evaluated = trainer.evaluate()
        metrics.update({k: round(float(v), 6) for k, v in evaluated.items() if k.startswith("eval_") and
                        isinstance(v, (int, float))})
    return metrics


def _save(o: Training, trainer, model, tokenizer, data: PackedData, out: Path, metrics: dict, device,
          pissa_init: Path) -> None:
    """The final model or adapter, the tokenizer, a generation config, the log plot, lmforge.json."""
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return
    if o.method == "pissa":
        # a plain LoRA (rank 2r) that applies to the original base weights, not PiSSA's residual
        trainer.model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(pissa_init))
        shutil.rmtree(pissa_init, ignore_errors=True)
    from lmforge.shared.modeldir.weights import copy_image_processor

    copy_image_processor(o.model, out)   # a trained vision-language model keeps its image processor
    stops = data.meta.get("stop_words") or [tokenizer.eos_token]
    save_common(out, tokenizer, o.model, stops, o.keep_checkpoints)
    parameters = arguments.run_parameters(o, device)
    record = rundir.record(
        o.kind, **{k: v for k, v in parameters.items() if k != "hyperparameters"},
        data={"path": str(data.path), "fingerprint": file_digest(data.path), "rows": data.rows,
              "cutoff": data.meta.get("cutoff"), "packing": data.meta.get("packing")},
        eval_data=getattr(o, "eval_data", None), template=data.meta.get("template"), stop_words=stops,
        added_tokens=(data.meta.get("tokenizer") or {}).get("added_tokens", []),
        tokenizer_fingerprint=(data.meta.get("tokenizer") or {}).get("fingerprint"),
        hyperparameters=parameters["hyperparameters"],
        device={"kind": device.kind, "attention": device.attn}, metrics=metrics,
    )
    rundir.write_record(out, record)
    log.info(f"train: done: loss {metrics['train_loss']:.4f}" +
             (f", eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "") +
             f", {metrics['tokens_per_second']:,.0f} tokens/s, {metrics['runtime_seconds']:.0f}s")
