"""The parts every training stage's options are composed of: the model and data, what trains
(method, LoRA, freeze / LLaMA-Pro, GaLore / BAdam, vision towers), how it trains (optimisation,
speed and memory), the run (checkpoints, logging, trackers) and how it is distributed. Each part
checks its own options (`check_own`); train.py composes them per stage."""

from __future__ import annotations

from pathlib import Path

from lmforge.shared.core.commands.common import (BATCH_SIZE, MODEL, OUTPUT, OVERWRITE, PRECISION, SEED,
                                                  ATTENTIONS)
from lmforge.shared.core.errors import BadInput
from lmforge.shared.core.options import REQUIRED, Opt, declaration

P, M, L, F, E, O, R, D = ("Model and data", "Method", "LoRA", "Freeze / LLaMA-Pro", "GaLore / BAdam", "Optimisation",
                          "Run", "Distributed")
METHODS = ("full", "freeze", "lora", "dora", "pissa", "llama-pro", "galore", "badam")
ADAPTERS = ("lora", "dora", "pissa")
KERNELS = ("none", "liger", "unsloth")
CHECKPOINTING = ("full", "selective")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")
TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "trackio", "swanlab")

TRAIN_MODEL = MODEL.but(help="Base model: a directory or a Hub id.", panel=P)
TRAIN_OUTPUT = OUTPUT.but(panel=P)
TRAIN_OVERWRITE = OVERWRITE.but(help="Replace a non-empty output directory.", panel=P)
RESUME = Opt(default=False, help="Continue an interrupted run from its last checkpoint.", panel=P)
LORA_RANK = Opt(default=8, help="LoRA rank.", panel=L)
LORA_ALPHA = Opt(default=None, help="LoRA alpha (default 2 x rank).", panel=L, min=0, min_open=True)
LORA_TARGET = Opt(default="all", panel=L,
                  help="Modules to adapt: all (every linear layer but the head) or names, e.g. q_proj,v_proj.")
LEARNING_RATE = Opt(default=None, flags=("--learning-rate", "--lr"), panel=O, min=0, min_open=True,
                    help="Peak learning rate (default 1e-4 for adapters, 1e-5 otherwise).")
EPOCHS = Opt(default=3.0, help="Passes over the data.", panel=O, min=0)
MAX_STEPS = Opt(default=-1, help="Stop after N optimizer steps (overrides --epochs).", panel=O)
MAX_GRAD_NORM = Opt(default=1.0, help="Gradient clipping (0: none).", panel=O, min=0)
GRAD_ACCUM = Opt(default=8, help="Gradient accumulation steps.", panel=O)
SAVE_STEPS = Opt(default=500, help="Checkpoint every N steps (for --resume).", panel=R)
KEEP_CHECKPOINTS = Opt(default=False, help="Keep checkpoints/ after a successful run.", panel=R)
REPORT = Opt(choices=TRACKERS, default=None, panel=R,
             help="Report the run to trackers (repeat for several): tensorboard (OUT/tensorboard), wandb, mlflow, "
                  "trackio, swanlab; the run config holds the lmforge.json parameters.")
LOGGING_STEPS = Opt(default=10, help="Log every N steps to trainer_log.jsonl.", panel=R)


@declaration
class Base:
    """The base model, where the run goes, and whether it starts afresh."""

    model: str = TRAIN_MODEL
    data: str = Opt(default=REQUIRED, flags=("--data", "-d"), panel=P,
                    help="Packed training data (`lmforge data pack`), or - for stdin.")
    output: Path = TRAIN_OUTPUT
    overwrite: bool = TRAIN_OVERWRITE
    resume: bool = RESUME


@declaration
class EvalData:
    eval_data: str | None = Opt(default=None, help="Packed evaluation data: eval loss during and after training.",
                                panel=P)


# Options that only mean something for some methods: setting one for another method is refused
# (it would be silently ignored).
ONLY_FOR = {
    ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "rslora", "loraplus_ratio"): ADAPTERS,
    ("freeze_layers", "freeze_modules", "freeze_extra"): ("freeze",),
    ("galore_rank", "galore_scale", "galore_update_interval", "galore_target"): ("galore",),
    ("badam_mode", "badam_switch_interval"): ("badam",),
}


@declaration
class Method:
    """What trains: the method and its settings (LoRA family, freeze, LLaMA-Pro, GaLore, BAdam)."""

    method: str = Opt(choices=METHODS, default="lora", panel=M,
                      help="What trains: all weights, some layers, LoRA-family adapters, new blocks, or full training "
                           "with GaLore/BAdam.")
    quant: int | None = Opt(default=None, panel=M,
                            help="Load the base in 4 or 8 bits (bitsandbytes; QLoRA). Adapter methods only.")
    lora_rank: int = LORA_RANK
    lora_alpha: float | None = LORA_ALPHA
    lora_dropout: float = Opt(default=0.0, help="Dropout on the LoRA path.", panel=L, min=0, max=1, max_open=True)
    lora_target: str = LORA_TARGET
    rslora: bool = Opt(default=False, help="Rank-stabilised scaling (alpha / sqrt(r)).", panel=L)
    freeze_layers: int = Opt(default=2, panel=F,
                             help="freeze: train the last N decoder layers (negative: the first N).")
    freeze_modules: str = Opt(default="all", panel=F,
                              help="freeze: within those layers, train only these submodules (e.g. mlp,self_attn; "
                                   "default all).")
    freeze_extra: str = Opt(default="", help="freeze: also train these modules (e.g. embed_tokens,norm).", panel=F)
    expand_layers: int = Opt(default=0, panel=F,
                             help="llama-pro: number of new blocks to insert (must divide the layer count).")
    galore_rank: int = Opt(default=16, help="galore: rank of the gradient projection.", panel=E)
    galore_scale: float = Opt(default=0.25, help="galore: scale of the projected update.", panel=E, min=0,
                              min_open=True)
    galore_update_interval: int = Opt(default=200, help="galore: steps between projection updates.", panel=E)
    galore_target: str = Opt(default="all", help="galore: module name patterns (default: attention and MLP layers).",
                             panel=E)
    badam_mode: str = Opt(choices=("ascending", "descending", "random"), default="ascending",
                          help="badam: order of the blocks.", panel=E)
    badam_switch_interval: int = Opt(default=50, help="badam: steps before switching to the next block.", panel=E)
    # vision-language models: the vision tower and projector are frozen unless these say otherwise
    train_projector: bool = Opt(default=False, panel=M,
                                help="Vision-language models: also train the projector between the vision tower and "
                                     "the language model.")
    train_vision_tower: bool = Opt(default=False, panel=M, help="Vision-language models: also train the vision tower.")

    @property
    def is_adapter(self) -> bool:
        return self.method in ADAPTERS

    def method_values(self) -> dict:
        """The method's settings, as the run record keeps them."""
        from dataclasses import fields

        names = [f.name for f in fields(Method) if f.name != "quant"] + ["loraplus_ratio"]
        return {n: getattr(self, n, None) for n in names}

    def check_own(self) -> None:
        given: frozenset[str] = getattr(self, "given", frozenset())
        for names, methods in ONLY_FOR.items():
            for name in names:
                if name in given and self.method not in methods:
                    flag = "--" + name.replace("_", "-")
                    raise BadInput(f"{flag} applies to --method {' / '.join(methods)}, not {self.method}",
                                   f"drop {flag}, or choose --method {methods[0]}")
        if self.is_adapter:
            if self.lora_rank < 1:
                raise BadInput("--lora-rank must be at least 1")
        elif getattr(self, "loraplus_ratio", None) is not None or self.rslora:
            raise BadInput(f"--loraplus-ratio/--rslora apply to LoRA methods, not {self.method}", "use --method lora")
        if self.method == "llama-pro" and self.expand_layers < 1:
            raise BadInput("--method llama-pro needs --expand-layers N (N >= 1)")
        if self.method != "llama-pro" and self.expand_layers:
            raise BadInput("--expand-layers applies to --method llama-pro")
        if self.method == "galore" and (self.galore_rank < 1 or self.galore_update_interval < 1):
            raise BadInput("--galore-rank and --galore-update-interval must be at least 1")
        if self.method == "badam" and self.badam_switch_interval < 1:
            raise BadInput("--badam-switch-interval must be at least 1")
        if self.method == "freeze" and self.freeze_layers == 0:
            raise BadInput("--freeze-layers 0 trains nothing", "give N > 0 (last N layers) or N < 0 (first N)")
        if self.quant is not None and not self.is_adapter:
            raise BadInput(f"--quant {self.quant} (quantized weights) trains adapters only, not --method {self.method}",
                           "use --method lora, dora or pissa")
        if self.quant not in (None, 4, 8):
            raise BadInput(f"--quant {self.quant}: use 4 or 8")


WARMUP = Opt(default=0.0, min=0, panel=O, help="Linear warm-up: a fraction of the steps (< 1) or a step count.")


@declaration
class LoraPlus:
    loraplus_ratio: float | None = Opt(default=None, min=0, min_open=True, panel=L,
                                       help="LoRA+: learning rate of B = ratio x that of A (e.g. 16).")


@declaration
class Optimiser:
    """The optimiser and its learning-rate schedule."""

    learning_rate: float | None = LEARNING_RATE
    warmup: float = WARMUP
    weight_decay: float = Opt(default=0.0, help="Weight decay.", panel=O, min=0)
    max_grad_norm: float = MAX_GRAD_NORM
    scheduler: str = Opt(default="cosine", panel=O,
                         help="Learning-rate schedule: cosine, linear, constant, constant_with_warmup, ...")
    optim: str = Opt(default="adamw", panel=O,
                     help="Optimizer: adamw, adamw8bit, paged_adamw8bit, adafactor, sgd, or any transformers name.")

    def lr(self) -> float:
        """The learning rate: as given, or the default of the method family."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if getattr(self, "is_adapter", True) else 1e-5

    def check_own(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise BadInput(f"unknown scheduler '{self.scheduler}'", f"use one of {', '.join(SCHEDULERS)}")


@declaration
class Steps:
    """How long: epochs or steps, and the batch."""

    epochs: float = EPOCHS
    max_steps: int = MAX_STEPS
    batch_size: int = BATCH_SIZE.but(panel=O)
    grad_accum: int = GRAD_ACCUM

    def check_own(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise BadInput("--batch-size and --grad-accum must be at least 1")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise BadInput("give --epochs > 0 or --max-steps > 0")
        if self.max_steps != -1 and self.max_steps < 1:
            raise BadInput(f"--max-steps {self.max_steps}: must be at least 1", "or leave it out to train by --epochs")


@declaration
class Precision:
    gradient_checkpointing: bool = Opt(default=False, help="Recompute activations in the backward pass (less memory).",
                                       panel=O)
    precision: str = PRECISION.but(panel=O)
    attn: str = Opt(choices=ATTENTIONS, default="auto", panel=O,
                    help="Attention kernel (auto: flash-attention on CUDA when installed, else sdpa).")
    rope_scaling: str = Opt(choices=("auto", "linear", "dynamic", "yarn", "none"), default="auto", panel=O,
                            help="RoPE scaling when the data's cutoff exceeds the model's context.")
    seed: int = SEED.but(panel=O)


@declaration
class Neftune:
    neftune_alpha: float | None = Opt(default=None, panel=O, min=0, min_open=True,
                                      help="NEFTune (pt/sft): uniform noise of scale alpha / sqrt(row length x hidden) "
                                           "on the input embeddings while training, e.g. 5.")


@declaration
class Efficiency:
    """Speed and memory of the supervised stages: S² attention, checkpointing, fused kernels."""

    shift_attn: bool = Opt(default=False, panel=O,
                           help="S² attention (LongLoRA) while training: attention within groups of a quarter of the "
                                "row, half the heads shifted by half a group; full attention in eval and generation. "
                                "llama, qwen2, qwen3, mistral.")
    checkpointing: str = Opt(choices=CHECKPOINTING, default="full", panel=O,
                             help="What --gradient-checkpointing keeps for backward: full (each layer's input; the whole "
                                  "layer runs again) or selective (also the LoRA layers' and attention's outputs; only "
                                  "cheap operations run again: near the speed without checkpointing at part of its "
                                  "memory). selective turns it on.")
    checkpoint_every: int = Opt(default=1, min=1, panel=O,
                                help="With gradient checkpointing: checkpoint only every N-th decoder layer; the others "
                                     "keep their activations (2: half the recompute, about half the memory saved).")
    kernels: str = Opt(choices=KERNELS, default="none", panel=O,
                       help="Fused GPU kernels (CUDA only): liger (Liger-Kernel: RMSNorm, RoPE, SwiGLU, fused linear "
                            "cross-entropy) or unsloth (Unsloth's LoRA path).")

    def __post_init__(self) -> None:
        if self.checkpointing == "selective":   # selective is a kind of gradient checkpointing: it turns it on
            self.gradient_checkpointing = True

    def check_own(self) -> None:
        if self.checkpoint_every > 1 and not getattr(self, "gradient_checkpointing", False):
            raise BadInput(f"--checkpoint-every {self.checkpoint_every} without gradient checkpointing",
                           "add --gradient-checkpointing (or --checkpointing selective)")
        if self.checkpointing == "selective" and self.kernels == "unsloth":
            raise BadInput("--checkpointing selective with --kernels unsloth: Unsloth checkpoints its own way",
                           "drop --checkpointing selective (Unsloth's offloaded checkpointing runs)")


@declaration
class Run:
    """Checkpoints, logging and trackers."""

    save_steps: int = SAVE_STEPS
    keep_checkpoints: bool = KEEP_CHECKPOINTS
    logging_steps: int = LOGGING_STEPS
    report: list[str] | None = REPORT

    def check_own(self) -> None:
        for name in ("save_steps", "logging_steps", "eval_steps"):
            value = getattr(self, name, None)
            if value is not None and value < 1:
                raise BadInput(f"--{name.replace('_', '-')} {value}: must be at least 1")


@declaration
class EvalSteps:
    eval_steps: int | None = Opt(default=None, help="Evaluate every N steps (default: --save-steps).", panel=R)


@declaration
class ContextParallel:
    """One sequence split across processes (pt, sft, rm, the dpo family)."""

    context_parallel: int = Opt(default=1, min=1, panel=D,
                                help="Split each row across N processes of a torchrun launch (a multiple of N "
                                     "processes; data parallel across the groups): the activations and attention "
                                     "work per process fall about N times. 1: off.")
    context_parallel_mode: str = Opt(choices=("auto", "ulysses", "ring"), default="auto", panel=D,
                                     help="How attention spans the split row: ulysses (all-to-all over heads; the "
                                          "heads must divide among N), ring (key/value blocks passed around; any "
                                          "heads) or auto (ulysses where it fits).")


@declaration
class Distributed:
    deepspeed: str | None = Opt(default=None, panel=D,
                                help="DeepSpeed: z1, z2, z3, z3-offload, or a config JSON (launch with torchrun/deepspeed).")

    def check_own(self) -> None:
        if getattr(self, "checkpointing", None) == "selective" and zero3(self.deepspeed):
            # PEFT under ZeRO-3 needs reentrant checkpointing (TRL forces it), which takes no selective policy
            raise BadInput("--checkpointing selective does not run under --deepspeed z3 (ZeRO-3 checkpoints "
                           "reentrantly)", "use --checkpointing full with ZeRO-3, or --deepspeed z2")


FSDP_MODES = ("full", "hybrid", "offload")
FSDP_OPTIMIZERS = ("adamw", "sgd", "adamw_torch", "adamw_torch_fused", "adagrad", "rmsprop")  # torch's own, on DTensors


@declaration
class Sharding:
    """PyTorch FSDP2 (pt, sft): the model, its gradients and optimizer state split across processes."""

    fsdp: str | None = Opt(choices=FSDP_MODES, default=None, panel=D,
                           help="Shard the model across the processes of a torchrun launch (PyTorch FSDP2): full "
                                "(weights, gradients and optimizer state split across all processes), hybrid (split "
                                "within each node, replicated across nodes) or offload (full, the shards kept in CPU "
                                "memory; CUDA). Checkpoints are sharded and resume on any number of processes.")

    def check_own(self) -> None:
        if not self.fsdp:
            return
        if getattr(self, "deepspeed", None):
            raise BadInput("--deepspeed and --fsdp exclude each other")
        quant = getattr(self, "quant", None)
        if quant:
            raise BadInput(f"--quant {quant} with --fsdp: FSDP cannot shard bitsandbytes' quantized weights",
                           "train QLoRA without --fsdp (torchrun alone: each process holds the quantized base)")
        method = getattr(self, "method", "lora")
        if method in ("galore", "badam", "pissa"):
            why = "its optimizer works on whole weights" if method != "pissa" else \
                "its conversion back to plain LoRA needs the whole adapter in one process"
            raise BadInput(f"--method {method} does not run under --fsdp: {why}",
                           "use --method full or lora with --fsdp, or --method " + method + " without it")
        optim = getattr(self, "optim", "adamw")
        if optim not in FSDP_OPTIMIZERS:
            # the others keep their own state layout (8-bit blocks, factored moments, paging) that
            # knows nothing of sharded parameters
            raise BadInput(f"--optim {optim} does not run under --fsdp", f"use {', '.join(FSDP_OPTIMIZERS[:3])}")


def zero3(spec: str | None) -> bool:
    """Whether --deepspeed names ZeRO-3 (z3, z3-offload, or a config file of stage 3)."""
    if not spec:
        return False
    if spec.startswith("z3"):
        return True
    import json

    try:
        return json.loads(Path(spec).read_text()).get("zero_optimization", {}).get("stage") == 3
    except (OSError, ValueError, AttributeError):
        return False
