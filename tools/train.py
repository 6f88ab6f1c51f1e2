"""`lmforge train pt|sft|...`: fine-tune a model on packed data; prints the output directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from ._cli import REQUIRED, command, group, invocation, print_path, with_options

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
    from lmforge.shared.methods import MethodOptions
    from lmforge.shared.training import TrainOptions

    method_fields = set(MethodOptions.__dataclass_fields__) - {"added_token_ids"}
    method = MethodOptions(**{k: v for k, v in opts.items() if k in method_fields})
    general = {k: v for k, v in opts.items() if k in TrainOptions.__dataclass_fields__ and k not in ("stage", "method")}
    return TrainOptions(stage=stage, method=method, extra=extra, **general)


def run_and_print(options, build_trainer=None) -> None:
    from lmforge.shared import training

    with training.stdout_guard():
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
