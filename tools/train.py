"""`lmforge train pt|sft|...`: fine-tune a model on packed data; prints the output directory."""

from __future__ import annotations

from ._cli import command, declared, group, print_path

app = group("Train a model (pt, sft, rm, dpo, ppo, grpo) on packed data. Prints the output directory.")


def _train(o) -> None:
    import os

    from lmforge.shared.core import log

    log.quiet_libraries()  # before torch loads: it autoloads bitsandbytes, which talks
    from lmforge.shared.train import lifecycle

    with log.stdout_guard():
        out = lifecycle.train(o)
    if int(os.environ.get("RANK", "0")) == 0:
        print_path(out)


@command(app, "pt", help="Continued pre-training on packed text (`data pack --stage pt`).")
@declared("train pt")
def pt(o) -> None:
    _train(o)


@command(app, "sft", help="Supervised fine-tuning on packed chat data (`data pack --stage sft`).")
@declared("train sft")
def sft(o) -> None:
    _train(o)


@command(app, "rm", help="Reward model: the base + a value head, trained on pairwise data (`data pack --stage rm`).")
@declared("train rm")
def rm(o) -> None:
    _train(o)


@command(app, "dpo", help="Preference optimisation: DPO, IPO, hinge, ORPO, SimPO, KTO; DPO-ftx with --ftx.")
@declared("train dpo")
def dpo(o) -> None:
    _train(o)


@command(app, "ppo", help="RLHF with PPO: SFT model + reward model, one shared base model in memory.")
@declared("train ppo")
def ppo(o) -> None:
    _train(o)


@command(app, "grpo", help="Online RL with verifiable rewards (GRPO, TRL): prompts packed with `data pack --stage ppo`.")
@declared("train grpo")
def grpo(o) -> None:
    _train(o)
