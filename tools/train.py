"""`lmforge train pt|sft|...`: fine-tune a model on packed data; prints the output directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from ._cli import REQUIRED, command, group, print_path, with_options

app = group("Train a model (pt, sft, rm, dpo, ppo) on packed data. Prints the output directory.")

P = "Model and data"
M = "Method"
L = "LoRA"
F = "Freeze / LLaMA-Pro"
E = "GaLore / BAdam"
O = "Optimisation"
R = "Run"
D = "Distributed"

MODEL_DATA = [
    ("model", Annotated[str, typer.Option("--model", "-m", help="Base model: a directory or a Hub id.", rich_help_panel=P)], REQUIRED),
    ("data", Annotated[str, typer.Option("--data", "-d", help="Packed training data (`lmforge data pack`), or - for stdin.", rich_help_panel=P)], REQUIRED),
    ("output", Annotated[Path, typer.Option("--output", "-o", help="Output directory (printed on stdout at the end).", rich_help_panel=P)], REQUIRED),
    ("eval_data", Annotated[Optional[str], typer.Option(help="Packed evaluation data: eval loss during and after training.", rich_help_panel=P)], None),
    ("overwrite", Annotated[bool, typer.Option(help="Replace a non-empty output directory.", rich_help_panel=P)], False),
    ("resume", Annotated[bool, typer.Option(help="Continue an interrupted run from its last checkpoint.", rich_help_panel=P)], False),
]
METHOD = [
    ("method", Annotated[Literal["full", "freeze", "lora", "dora", "pissa", "llama-pro", "galore", "badam"], typer.Option(
        help="What trains: all weights, some layers, LoRA-family adapters, new blocks, or full training with GaLore/BAdam.", rich_help_panel=M)], "lora"),
    ("quant", Annotated[Optional[int], typer.Option(help="Load the base in 4 or 8 bits (bitsandbytes; QLoRA). Adapter methods only.", rich_help_panel=M)], None),
]
LORA = [
    ("lora_rank", Annotated[int, typer.Option(help="LoRA rank.", rich_help_panel=L)], 8),
    ("lora_alpha", Annotated[Optional[float], typer.Option(help="LoRA alpha (default 2 x rank).", rich_help_panel=L)], None),
    ("lora_dropout", Annotated[float, typer.Option(help="Dropout on the LoRA path.", rich_help_panel=L)], 0.0),
    ("lora_target", Annotated[str, typer.Option(help="Modules to adapt: all (every linear layer but the head) or names, e.g. q_proj,v_proj.", rich_help_panel=L)], "all"),
    ("rslora", Annotated[bool, typer.Option(help="Rank-stabilised scaling (alpha / sqrt(r)).", rich_help_panel=L)], False),
    ("loraplus_ratio", Annotated[Optional[float], typer.Option(help="LoRA+: learning rate of B = ratio x that of A (e.g. 16).", rich_help_panel=L)], None),
]
FREEZE = [
    ("freeze_layers", Annotated[int, typer.Option(help="freeze: train the last N decoder layers (negative: the first N).", rich_help_panel=F)], 2),
    ("freeze_modules", Annotated[str, typer.Option(help="freeze: within those layers, train only these submodules (e.g. mlp,self_attn; default all).", rich_help_panel=F)], "all"),
    ("freeze_extra", Annotated[str, typer.Option(help="freeze: also train these modules (e.g. embed_tokens,norm).", rich_help_panel=F)], ""),
    ("expand_layers", Annotated[int, typer.Option(help="llama-pro: number of new blocks to insert (must divide the layer count).", rich_help_panel=F)], 0),
]
MEMORY = [
    ("galore_rank", Annotated[int, typer.Option(help="galore: rank of the gradient projection.", rich_help_panel=E)], 16),
    ("galore_scale", Annotated[float, typer.Option(help="galore: scale of the projected update.", rich_help_panel=E)], 0.25),
    ("galore_update_interval", Annotated[int, typer.Option(help="galore: steps between projection updates.", rich_help_panel=E)], 200),
    ("galore_target", Annotated[str, typer.Option(help="galore: module name patterns (default: attention and MLP layers).", rich_help_panel=E)], "all"),
    ("badam_mode", Annotated[Literal["ascending", "descending", "random"], typer.Option(help="badam: order of the blocks.", rich_help_panel=E)], "ascending"),
    ("badam_switch_interval", Annotated[int, typer.Option(help="badam: steps before switching to the next block.", rich_help_panel=E)], 50),
]
OPTIM = [
    ("learning_rate", Annotated[Optional[float], typer.Option("--learning-rate", "--lr", help="Peak learning rate (default 1e-4 for adapters, 1e-5 otherwise).", rich_help_panel=O)], None),
    ("epochs", Annotated[float, typer.Option(help="Passes over the data.", rich_help_panel=O)], 3.0),
    ("max_steps", Annotated[int, typer.Option(help="Stop after N optimizer steps (overrides --epochs).", rich_help_panel=O)], -1),
    ("warmup", Annotated[float, typer.Option(help="Linear warm-up: a fraction of the steps (< 1) or a step count.", rich_help_panel=O)], 0.0),
    ("weight_decay", Annotated[float, typer.Option(help="Weight decay.", rich_help_panel=O)], 0.0),
    ("max_grad_norm", Annotated[float, typer.Option(help="Gradient clipping (0: none).", rich_help_panel=O)], 1.0),
    ("batch_size", Annotated[int, typer.Option(help="Rows per device per step (packed rows are long).", rich_help_panel=O)], 1),
    ("grad_accum", Annotated[int, typer.Option(help="Gradient accumulation steps.", rich_help_panel=O)], 8),
    ("scheduler", Annotated[str, typer.Option(help="Learning-rate schedule: cosine, linear, constant, constant_with_warmup, ...", rich_help_panel=O)], "cosine"),
    ("optim", Annotated[str, typer.Option(help="Optimizer: adamw, adamw8bit, paged_adamw8bit, adafactor, sgd, or any transformers name.", rich_help_panel=O)], "adamw"),
    ("gradient_checkpointing", Annotated[bool, typer.Option(help="Recompute activations in the backward pass (less memory).", rich_help_panel=O)], False),
    ("neftune_alpha", Annotated[Optional[float], typer.Option(help="NEFTune (pt/sft): uniform noise of scale alpha / sqrt(row length x hidden) on the input embeddings while training, e.g. 5.", rich_help_panel=O)], None),
    ("precision", Annotated[Literal["auto", "bf16", "fp16", "fp32"], typer.Option(help="auto: bf16 on recent GPUs, fp16 on older ones, fp32 on CPU.", rich_help_panel=O)], "auto"),
    ("attn", Annotated[Literal["auto", "sdpa", "eager", "flash_attention_2"], typer.Option(help="Attention kernel (auto: flash-attention on CUDA when installed, else sdpa).", rich_help_panel=O)], "auto"),
    ("rope_scaling", Annotated[Literal["auto", "linear", "dynamic", "yarn", "none"], typer.Option(help="RoPE scaling when the data's cutoff exceeds the model's context.", rich_help_panel=O)], "auto"),
    ("seed", Annotated[int, typer.Option(help="Random seed.", rich_help_panel=O)], 42),
]
RUN = [
    ("save_steps", Annotated[int, typer.Option(help="Checkpoint every N steps (for --resume).", rich_help_panel=R)], 500),
    ("keep_checkpoints", Annotated[bool, typer.Option(help="Keep checkpoints/ after a successful run.", rich_help_panel=R)], False),
    ("logging_steps", Annotated[int, typer.Option(help="Log every N steps to trainer_log.jsonl.", rich_help_panel=R)], 10),
    ("eval_steps", Annotated[Optional[int], typer.Option(help="Evaluate every N steps (default: --save-steps).", rich_help_panel=R)], None),
    ("report", Annotated[Literal["none", "tensorboard"], typer.Option(help="Also write TensorBoard events (OUT/tensorboard).", rich_help_panel=R)], "none"),
]
DIST = [
    ("deepspeed", Annotated[Optional[str], typer.Option(help="DeepSpeed: z2, z3, z3-offload, or a config JSON (launch with torchrun/deepspeed).", rich_help_panel=D)], None),
    ("fsdp", Annotated[bool, typer.Option(help="PyTorch FSDP (CUDA GPUs; launch with torchrun or accelerate).", rich_help_panel=D)], False),
]
COMMON = [MODEL_DATA, METHOD, LORA, FREEZE, MEMORY, OPTIM, RUN, DIST]


def options_from(stage: str, opts: dict, **extra):
    """Command-line values -> TrainOptions."""
    from lmforge.shared.train.methods import MethodOptions
    from lmforge.shared.train.training import TrainOptions

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
@with_options(*COMMON)
def pt(**opts) -> None:
    run_and_print(options_from("pt", opts))


@command(app, "sft", help="Supervised fine-tuning on packed chat data (`data pack --stage sft`).")
@with_options(*COMMON)
def sft(**opts) -> None:
    run_and_print(options_from("sft", opts))


RM_DATA = "Reward model"
PREF = "Preference loss"
PREFERENCE = [
    ("loss", Annotated[Literal["sigmoid", "ipo", "hinge", "orpo", "simpo", "kto"], typer.Option(
        help="sigmoid (DPO), ipo, hinge: with a reference model; orpo, simpo: without; kto: on KTO-labelled data.",
        rich_help_panel=PREF)], "sigmoid"),
    ("beta", Annotated[Optional[float], typer.Option(
        help="Strength of the preference term (default 0.1; 2.0 for simpo; ORPO's lambda for orpo).", rich_help_panel=PREF)], None),
    ("ftx", Annotated[float, typer.Option(
        help="DPO-ftx: add FTX x the SFT loss on the chosen answer (logged as sft_loss).", rich_help_panel=PREF)], 0.0),
    ("simpo_gamma", Annotated[float, typer.Option(help="simpo: the target reward margin gamma.", rich_help_panel=PREF)], 0.5),
    ("precompute_ref", Annotated[bool, typer.Option(
        help="Full tuning: compute reference log-probs once before training instead of keeping a frozen copy.",
        rich_help_panel=PREF)], False),
    ("desirable_weight", Annotated[float, typer.Option(help="kto: weight of desirable examples.", rich_help_panel=PREF)], 1.0),
    ("undesirable_weight", Annotated[float, typer.Option(help="kto: weight of undesirable examples.", rich_help_panel=PREF)], 1.0),
]


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
@with_options(*COMMON)
def rm(**opts) -> None:
    from lmforge.shared.train.preference import build_rm_trainer

    _refuse_pt_sft_only_options("rm", opts)
    run_and_print(options_from("rm", opts, data_stages=("rm", "dpo"), kind="reward"), build_rm_trainer)


@command(app, "dpo", help="Preference optimisation: DPO, IPO, hinge, ORPO, SimPO, KTO; DPO-ftx with --ftx.")
@with_options(*COMMON, PREFERENCE)
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


G = "PPO"
PPO_OPTIONS = [
    ("model", Annotated[str, typer.Option("--model", "-m", help="Base model (directory or Hub id).", rich_help_panel=P)], REQUIRED),
    ("reward", Annotated[str, typer.Option(help="Reward model directory (`lmforge train rm`).", rich_help_panel=P)], REQUIRED),
    ("data", Annotated[str, typer.Option("--data", "-d", help="Prompts packed with `data pack --stage ppo`.", rich_help_panel=P)], REQUIRED),
    ("output", Annotated[Path, typer.Option("--output", "-o", help="Output directory (printed on stdout).", rich_help_panel=P)], REQUIRED),
    ("sft", Annotated[Optional[str], typer.Option(help="The SFT adapter (merged into the base in memory) or SFT model directory.", rich_help_panel=P)], None),
    ("overwrite", Annotated[bool, typer.Option(help="Replace a non-empty output directory.", rich_help_panel=P)], False),
    ("resume", Annotated[bool, typer.Option(help="Continue an interrupted run from its last checkpoint.", rich_help_panel=P)], False),
    ("layout", Annotated[Literal["shared", "separate"], typer.Option(
        help="shared: one base model serves policy, reference and reward by switching adapters; separate: four models.",
        rich_help_panel=G)], "shared"),
    ("lora_rank", Annotated[int, typer.Option(help="Rank of the policy's LoRA adapter.", rich_help_panel=G)], 8),
    ("lora_alpha", Annotated[Optional[float], typer.Option(help="LoRA alpha (default 2 x rank).", rich_help_panel=G)], None),
    ("lora_target", Annotated[str, typer.Option(help="Modules to adapt (all, or names).", rich_help_panel=G)], "all"),
    ("learning_rate", Annotated[float, typer.Option("--learning-rate", "--lr", help="Learning rate.", rich_help_panel=G)], 1e-5),
    ("batch_size", Annotated[int, typer.Option(help="Prompts per PPO step (rollouts).", rich_help_panel=G)], 8),
    ("mini_batch_size", Annotated[int, typer.Option(help="Rollouts per gradient update.", rich_help_panel=G)], 4),
    ("ppo_epochs", Annotated[int, typer.Option(help="Passes over each batch of rollouts.", rich_help_panel=G)], 4),
    ("max_steps", Annotated[int, typer.Option(help="PPO steps.", rich_help_panel=G)], 100),
    ("epochs", Annotated[Optional[float], typer.Option(help="Passes over the prompts (overrides --max-steps).", rich_help_panel=G)], None),
    ("max_new_tokens", Annotated[int, typer.Option(help="Longest response sampled.", rich_help_panel=G)], 64),
    ("temperature", Annotated[float, typer.Option(help="Sampling temperature (0: greedy).", rich_help_panel=G)], 1.0),
    ("top_k", Annotated[int, typer.Option(help="Top-k sampling (0: off).", rich_help_panel=G)], 0),
    ("top_p", Annotated[float, typer.Option(help="Nucleus sampling.", rich_help_panel=G)], 1.0),
    ("kl_coef", Annotated[float, typer.Option(help="Initial per-token KL penalty coefficient.", rich_help_panel=G)], 0.05),
    ("kl_target", Annotated[float, typer.Option(help="Adaptive KL target (0: fixed coefficient).", rich_help_panel=G)], 6.0),
    ("kl_horizon", Annotated[int, typer.Option(help="Adaptive KL horizon.", rich_help_panel=G)], 10000),
    ("gamma", Annotated[float, typer.Option(help="Discount.", rich_help_panel=G)], 1.0),
    ("lam", Annotated[float, typer.Option(help="GAE lambda.", rich_help_panel=G)], 0.95),
    ("clip_range", Annotated[float, typer.Option(help="PPO ratio clipping.", rich_help_panel=G)], 0.2),
    ("clip_range_value", Annotated[float, typer.Option(help="Value clipping.", rich_help_panel=G)], 0.2),
    ("vf_coef", Annotated[float, typer.Option(help="Weight of the value loss.", rich_help_panel=G)], 0.1),
    ("reward_scale", Annotated[float, typer.Option(help="Multiply scores by this.", rich_help_panel=G)], 1.0),
    ("reward_clip", Annotated[Optional[float], typer.Option(help="Clip scores to +-this.", rich_help_panel=G)], None),
    ("reward_norm", Annotated[bool, typer.Option(help="Normalise scores by their running mean and std.", rich_help_panel=G)], False),
    ("missing_eos_penalty", Annotated[Optional[float], typer.Option(help="Subtract this from the score of answers that never stop.", rich_help_panel=G)], None),
    ("whiten_advantages", Annotated[bool, typer.Option(help="Normalise advantages over each batch.", rich_help_panel=G)], True),
    ("max_grad_norm", Annotated[float, typer.Option(help="Gradient clipping (0: none).", rich_help_panel=G)], 1.0),
    ("precision", Annotated[Literal["auto", "bf16", "fp16", "fp32"], typer.Option(help="Weights' precision.", rich_help_panel=G)], "auto"),
    ("seed", Annotated[int, typer.Option(help="Random seed.", rich_help_panel=R)], 42),
    ("save_steps", Annotated[int, typer.Option(help="Checkpoint every N steps.", rich_help_panel=R)], 50),
    ("keep_checkpoints", Annotated[bool, typer.Option(help="Keep checkpoints/ at the end.", rich_help_panel=R)], False),
    ("logging_steps", Annotated[int, typer.Option(help="Log every N steps.", rich_help_panel=R)], 1),
]


@command(app, "ppo", help="RLHF with PPO: SFT model + reward model, one shared base model in memory.")
@with_options(PPO_OPTIONS)
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
