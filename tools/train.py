"""`lmforge train pt|sft|...`: fine-tune a model on packed data; prints the output directory."""

from __future__ import annotations

from ._cli import command, declared, given, group, print_path

app = group("Train a model (pt, sft, rm, dpo, ppo, grpo) on packed data. Prints the output directory.")

def options_from(stage: str, opts: dict, **extra):
    """Command-line values -> TrainOptions."""
    from lmforge.shared.train.methods import MethodOptions
    from lmforge.shared.train.training import TrainOptions

    from lmforge.shared.train.methods import refuse_unused

    refuse_unused(opts["method"], given())
    method_fields = set(MethodOptions.__dataclass_fields__) - {"added_token_ids"}
    method = MethodOptions(**{k: v for k, v in opts.items() if k in method_fields})
    general = {k: v for k, v in opts.items() if k in TrainOptions.__dataclass_fields__ and k not in ("stage", "method")}
    return TrainOptions(stage=stage, method=method, extra=extra, **general)


def run_and_print(options, build_trainer=None) -> None:
    from lmforge.shared.core import log
    from lmforge.shared.train import training

    with log.stdout_guard():
        out = training.run(options, build_trainer)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print_path(out)


@command(app, "pt", help="Continued pre-training on packed text (`data pack --stage pt`).")
@declared("train pt")
def pt(**opts) -> None:
    run_and_print(options_from("pt", opts))


@command(app, "sft", help="Supervised fine-tuning on packed chat data (`data pack --stage sft`).")
@declared("train sft")
def sft(**opts) -> None:
    run_and_print(options_from("sft", opts))


def _refuse_pt_sft_only_options(stage: str, opts: dict) -> None:
    from lmforge.shared.core.errors import BadInput

    if opts.get("loraplus_ratio"):
        raise BadInput(f"--loraplus-ratio is for train pt/sft, not {stage}")
    if opts.get("neftune_alpha") is not None:  # the noise would reach the reference pass too
        raise BadInput(f"--neftune-alpha is for train pt/sft, not {stage}")
    if opts.get("method") == "badam":
        raise BadInput(f"--method badam is for train pt/sft, not {stage}")
    if opts.get("method") == "pissa" and stage == "rm":
        raise BadInput("--method pissa is not supported for reward models", "use lora or dora")


@command(app, "rm", help="Reward model: the base + a value head, trained on pairwise data (`data pack --stage rm`).")
@declared("train rm")
def rm(**opts) -> None:
    from lmforge.shared.train.preference import build_rm_trainer

    _refuse_pt_sft_only_options("rm", opts)
    run_and_print(options_from("rm", opts, data_stages=("rm", "dpo"), kind="reward"), build_rm_trainer)


@command(app, "dpo", help="Preference optimisation: DPO, IPO, hinge, ORPO, SimPO, KTO; DPO-ftx with --ftx.")
@declared("train dpo")
def dpo(**opts) -> None:
    from lmforge.shared.train.preference import build_dpo_trainer

    _refuse_pt_sft_only_options("dpo", opts)
    loss = opts.pop("loss")
    beta = opts.pop("beta")
    extra = {"loss": loss, "beta": beta if beta is not None else (2.0 if loss == "simpo" else 0.1),
             "ftx": opts.pop("ftx"), "simpo_gamma": opts.pop("simpo_gamma"), "precompute_ref": opts.pop("precompute_ref"),
             "desirable_weight": opts.pop("desirable_weight"), "undesirable_weight": opts.pop("undesirable_weight"),
             "data_stages": ("kto",) if loss == "kto" else ("dpo", "rm")}
    run_and_print(options_from("dpo", opts, **extra), build_dpo_trainer)


@command(app, "ppo", help="RLHF with PPO: SFT model + reward model, one shared base model in memory.")
@declared("train ppo")
def ppo(**opts) -> None:
    import os

    from lmforge.shared.core import log

    log.quiet_libraries()  # before torch loads: it autoloads bitsandbytes, which talks
    from lmforge.shared.train import ppo as ppo_

    options = ppo_.PPOOptions(**opts)
    with log.stdout_guard():
        out = ppo_.run(options)
    if int(os.environ.get("RANK", "0")) == 0:
        print_path(out)


@command(app, "grpo", help="Online RL with verifiable rewards (GRPO, TRL): prompts packed with `data pack --stage ppo`.")
@declared("train grpo")
def grpo(**opts) -> None:
    from lmforge.shared.core import log

    log.quiet_libraries()
    from lmforge.shared.train.grpo import build_grpo_trainer, validate

    _refuse_pt_sft_only_options("grpo", opts)
    names = ("reward_weights", "reward_timeout", "num_generations", "max_new_tokens", "temperature", "top_p", "top_k", "kl_coef",
             "loss_type", "clip_range", "clip_range_high", "num_iterations", "scale_rewards", "mask_truncated", "vllm")
    extra = {"rewards": list(opts.pop("reward") or []), **{k: opts.pop(k) for k in names},
             "data_stages": ("ppo",)}
    options = options_from("grpo", opts, **extra)
    validate(options)
    run_and_print(options, build_grpo_trainer)
