"""`lmforge train ...` as functions: pt, sft, rm, dpo, ppo, grpo. Each returns the output directory
(the model or adapter, its tokenizer, trainer_log.jsonl and lmforge.json, the run's record)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.shared.api._options import options
from lmforge.shared.core.commands.train import TrainDPO, TrainGRPO, TrainPPO, TrainPT, TrainRM, TrainSFT


def _train(o) -> Path:
    from lmforge.shared.train.lifecycle import train

    return train(o)


def pt(o: TrainPT | None = None, **values: Any) -> Path:
    """Continued pre-training on packed text."""
    return _train(options(TrainPT, o, values))


def sft(o: TrainSFT | None = None, **values: Any) -> Path:
    """Supervised fine-tuning on packed chat data."""
    return _train(options(TrainSFT, o, values))


def rm(o: TrainRM | None = None, **values: Any) -> Path:
    """A reward model (the base + a value head) on packed pairs."""
    return _train(options(TrainRM, o, values))


def dpo(o: TrainDPO | None = None, **values: Any) -> Path:
    """Preference optimisation: DPO, IPO, hinge, ORPO, SimPO, KTO."""
    return _train(options(TrainDPO, o, values))


def ppo(o: TrainPPO | None = None, **values: Any) -> Path:
    """RLHF with PPO: an SFT model and a reward model on one shared base."""
    return _train(options(TrainPPO, o, values))


def grpo(o: TrainGRPO | None = None, **values: Any) -> Path:
    """Online RL with verifiable rewards (GRPO)."""
    return _train(options(TrainGRPO, o, values))
