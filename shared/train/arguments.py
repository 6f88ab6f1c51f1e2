"""The Hugging Face TrainingArguments of a run, from its options: batches and schedule,
precision, checkpointing, trackers, DeepSpeed; and what the run record says about them."""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.shared.core import rundir
from lmforge.shared.core.errors import BadInput
from lmforge.shared.train import reporting
from lmforge.shared.train.checkpointing import checkpointing_kwargs


def deepspeed_config(spec: str) -> dict | str:
    """z1 | z2 | z3 | z3-offload, or a JSON file of one's own."""
    base = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    if spec == "z1":   # optimizer state sharded; gradients reduced whole, as under DDP
        return {**base, "zero_optimization": {"stage": 1}}
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
        raise BadInput(f"--deepspeed {spec}: not z1, z2, z3, z3-offload or a config file")
    return str(path)


def trackers(o) -> list[str]:
    """The trackers the Trainer's integrations report to (TensorBoard has its own callback: OUT/tensorboard)."""
    return [n for n in reporting.names(o.report) if n != "tensorboard"]


def tensorboard_callback(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback
    except ImportError:
        raise BadInput("--report tensorboard needs tensorboard", "pip install 'lmforge[tensorboard]'") from None
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out / "tensorboard")))


def setup_distributed(o, device) -> None:
    """CPU multi-process runs talk over gloo; DeepSpeed must be initialised before the model loads."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if getattr(o, "deepspeed", None):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if device.kind == "cpu" else "nccl")


def training_arguments(o, device, out: Path, evaluating: bool):
    """TrainingArguments for stage options `o` on `device`, checkpoints under OUT/checkpoints."""
    import torch
    from transformers import TrainingArguments

    from lmforge.shared.train.optimizers import galore_arguments, optimizer_name

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    eval_steps = getattr(o, "eval_steps", None) or o.save_steps
    checkpointing = getattr(o, "checkpointing", "full")
    kwargs = dict(
        output_dir=str(out / rundir.CHECKPOINTS), per_device_train_batch_size=o.batch_size,
        per_device_eval_batch_size=o.batch_size, gradient_accumulation_steps=o.grad_accum,
        learning_rate=o.lr(), num_train_epochs=o.epochs if o.max_steps <= 0 else 1.0, max_steps=o.max_steps,
        warmup_steps=o.warmup, weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm,
        lr_scheduler_type=o.scheduler, logging_steps=o.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=o.save_steps, save_total_limit=2,
        eval_strategy="steps" if evaluating else "no", eval_steps=eval_steps if evaluating else None,
        bf16=device.dtype_name == "bf16" and device.kind != "cpu", fp16=device.dtype_name == "fp16",
        seed=o.seed, data_seed=o.seed, report_to=trackers(o) or "none", run_name=out.name,
        gradient_checkpointing=o.gradient_checkpointing,
        gradient_checkpointing_kwargs=checkpointing_kwargs(checkpointing, getattr(o, "checkpoint_every", 1))
        if o.gradient_checkpointing else None,
        remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0,
        neftune_noise_alpha=_neftune(o),
        use_cpu=device.kind == "cpu", save_only_model=False, ddp_find_unused_parameters=False,
    )
    if distributed and device.kind == "cpu":
        kwargs["ddp_backend"] = "gloo"
    if getattr(o, "deepspeed", None):
        kwargs["deepspeed"] = deepspeed_config(o.deepspeed)
    if o.method == "galore":
        kwargs.update(galore_arguments(o))
    else:
        kwargs["optim"] = optimizer_name(o.optim, o.method)
    if device.kind == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if getattr(o, "fsdp", None):   # lmforge shards the model itself (fsdp.py), not accelerate
        from lmforge.shared.train.fsdp import arguments_class

        return arguments_class()(**kwargs)
    return TrainingArguments(**kwargs)


def _neftune(o) -> float | None:
    """NEFTune's alpha as the Trainer applies it: the noise scales with 1/sqrt(row length), and a
    context-parallel process holds 1/N of the row, so alpha/sqrt(N) keeps the row's magnitude."""
    alpha = getattr(o, "neftune_alpha", None)
    size = int(getattr(o, "context_parallel", 1) or 1)
    return alpha / size ** 0.5 if alpha is not None else None


def run_parameters(o, device) -> dict:
    """The run's parameters as lmforge.json records them (also each tracker's run config): the
    method and its settings, and every other option by its name (the base model, data and output
    are recorded apart), with what was decided at run time (the learning rate, the precision)."""
    from lmforge.shared.core.commands.training import Base
    from lmforge.shared.core.options import options_of

    method_options = o.method_values()
    apart = {opt.name for opt in options_of(Base)} | set(method_options) | {"method", "report"}
    hyperparameters = {k: v for k, v in o.values().items() if k not in apart}
    hyperparameters.update(learning_rate=o.lr(), precision=device.dtype_name,
                           world_size=int(os.environ.get("WORLD_SIZE", "1")), **o.decided())
    if not o.gradient_checkpointing:
        hyperparameters.update({k: None for k in ("checkpointing", "checkpoint_every") if k in hyperparameters})
    return {"stage": o.stage, "base_model": rundir.model_ref(o.model), "method": o.method,
            "method_options": method_options, "hyperparameters": hyperparameters}
