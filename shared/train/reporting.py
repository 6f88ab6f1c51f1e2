"""`--report`: training runs reported to the trackers people use, through transformers' own
integrations (TensorBoard, Weights & Biases, MLflow, Trackio, SwanLab).

Trainer-based commands hand the names to `TrainingArguments(report_to=...)`, so the Trainer's
integration callbacks log what it logs (the rows of trainer_log.jsonl); `RunConfig` then adds the
run's lmforge parameters (those lmforge.json records) to each tracker's run config. Commands
with their own loop (ppo) drive the same integration callbacks with `LoopReporter`.
Where runs go is each tracker's own setting: WANDB_MODE=offline / WANDB_DIR, MLFLOW_TRACKING_URI,
TRACKIO_DIR, SWANLAB_MODE=offline...; the run is named after the output directory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lmforge.shared.core.errors import BadInput

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "swanlab")
CHOICES = ("none", *TRACKERS)
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
            "swanlab": "swanlab"}


def names(report) -> list[str]:
    """--report values (a list, or one string, possibly comma-separated from a YAML file) ->
    the trackers, in order, without duplicates; `none` means none."""
    if report is None:
        return []
    items = [report] if isinstance(report, str) else list(report)
    out: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name or name == "none":
                continue
            if name not in TRACKERS:
                raise BadInput(f"--report {name}: not a tracker lmforge reports to", f"use {', '.join(CHOICES)}")
            if name not in out:
                out.append(name)
    return out


def check(report) -> list[str]:
    """The trackers, each one's package installed, or one line naming the extra to install."""
    chosen = names(report)
    for name in chosen:
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise BadInput(f"--report {name} needs the {_MODULES[name]} package", f"pip install 'lmforge[{name}]'")
    return chosen


def flat(config: dict, prefix: str = "") -> dict:
    """Nested parameters as flat `a.b` keys (MLflow and others take flat string values)."""
    out: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, name + "."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return out


def add_config(chosen: list[str], config: dict) -> None:
    """Put the lmforge parameters into each started tracker run's config (under `lmforge.`)."""
    flat_config = flat({"lmforge": config})
    if "wandb" in chosen:
        import wandb

        if wandb.run is not None:
            wandb.run.config.update({"lmforge": config}, allow_val_change=True)
    if "mlflow" in chosen:
        import mlflow

        if mlflow.active_run() is not None:
            items = list(flat_config.items())
            for i in range(0, len(items), 100):   # MLflow takes at most 100 params per call
                mlflow.log_params(dict(items[i:i + 100]))
    if "trackio" in chosen:
        import trackio

        run = getattr(trackio.context_vars, "current_run", None)
        current = run.get() if run is not None else None
        if current is not None and getattr(current, "config", None) is not None:
            current.config.update(flat_config)
    if "swanlab" in chosen:
        import swanlab

        if swanlab.get_run() is not None:
            swanlab.config.update(flat_config)


def run_config_callback(chosen: list[str], config: dict):
    """A TrainerCallback, added after the integrations, that adds `config` once their runs exist."""
    from transformers import TrainerCallback

    class RunConfig(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                add_config(chosen, config)

    return RunConfig()


class LoopReporter:
    """The Trainer's integration callbacks, driven by a training loop of one's own (ppo)."""

    def __init__(self, chosen: list[str], out: Path, config: dict, logging_steps: int = 1):
        from transformers import TrainerControl, TrainerState, TrainingArguments
        from transformers.integrations import get_reporting_integration_callbacks
        from transformers.integrations.integration_utils import TensorBoardCallback

        self.chosen = chosen
        self.config = config
        self.args = TrainingArguments(output_dir=str(out / "checkpoints"), report_to=chosen, run_name=out.name,
                                      logging_steps=logging_steps, use_cpu=True)
        self.state = TrainerState(is_world_process_zero=True, is_local_process_zero=True)
        self.control = TrainerControl()
        self.callbacks = [cls() for cls in get_reporting_integration_callbacks([n for n in chosen if n != "tensorboard"])]
        if "tensorboard" in chosen:   # where the Trainer-based commands write it too: OUT/tensorboard
            from torch.utils.tensorboard import SummaryWriter

            self.callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out / "tensorboard"))))

    def begin(self, max_steps: int, step: int = 0) -> None:
        self.state.max_steps = max_steps
        self.state.global_step = step
        for cb in self.callbacks:
            cb.on_train_begin(self.args, self.state, self.control, model=None)
        add_config(self.chosen, self.config)

    def log(self, step: int, logs: dict) -> None:
        self.state.global_step = step
        for cb in self.callbacks:
            cb.on_log(self.args, self.state, self.control, logs=dict(logs), model=None)

    def end(self) -> None:
        for cb in self.callbacks:
            cb.on_train_end(self.args, self.state, self.control, model=None)
