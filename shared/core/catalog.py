"""Every option of every lmforge command, declared once (see options.py for what derives from it).

An option several commands take is one constant; where a command reads it differently (another
default or help text) the command's entry says so with `.but(...)`, here and nowhere else.
`COMMANDS` maps each command ("train sft") to its options in `--help` order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.shared.core.options import REQUIRED, Opt

# ----------------------------------------------------------------------------- every command, the root

DEBUG = Opt("debug", type="bool", default=False, flags=("--debug",), help="Show tracebacks (also LMFORGE_DEBUG=1).")
QUIET = Opt("quiet", type="bool", default=False, flags=("--quiet", "-q"), help="No progress or info messages on stderr.")
EVERY_COMMAND = (   # added to each command by tools/_cli.py, with their behaviour
    Opt("config", type="path", default=None, flags=("--config",), panel="Common",
        help="YAML file of option values (keys are option names); flags override it."),
    DEBUG.but(panel="Common"),
    QUIET.but(panel="Common"),
)
ROOT = (   # `lmforge [OPTIONS] COMMAND`
    Opt("version", type="bool", default=False, flags=("--version",), help="Print the version and exit."),
    DEBUG,
    QUIET.but(help="No progress or info on stderr."),
)

# ----------------------------------------------------------------------------- shared by many

MODEL = Opt("model", default=REQUIRED, help="Model directory or Hub id.", flags=("--model", "-m"))
ADAPTER = Opt("adapter", default=None, help="A PEFT adapter to apply (trained on --model).")
TEMPLATE = Opt("template", default="auto",
               help="auto (what the model was trained with, else its chat template, else plain text), a template name, or none.")
INPUT = Opt("input", default="-", help="Dataset, or '-' for stdin.", argument=True)
OUTPUT = Opt("output", type="path", default=REQUIRED, help="Output directory (printed on stdout at the end).",
             flags=("--output", "-o"))
STREAM_OUTPUT = OUTPUT.but(default=None, help="Write here (atomically). Default: stdout, when it is not a terminal.")
OVERWRITE = Opt("overwrite", type="bool", default=False, help="Replace an existing output directory.")
SEED = Opt("seed", type="int", default=42, help="Random seed.")
DATA_SEED = SEED.but(help="Random seed; same inputs and seed give identical output.")
JSON_OUT = Opt("json_out", type="bool", default=False, help="Full results as JSON on stdout.", flags=("--json",))
PRECISION = Opt("precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                help="auto: bf16 on recent GPUs, fp16 on older ones, fp32 on CPU.")
TEMPERATURE = Opt("temperature", type="float", default=0.7, help="Sampling temperature (0: greedy).", min=0)
TOP_P = Opt("top_p", type="float", default=1.0, help="Nucleus sampling.", min=0, min_open=True, max=1)
MAX_NEW_TOKENS = Opt("max_new_tokens", type="int", default=256, help="Longest answer.", min=1)
BATCH_SIZE = Opt("batch_size", type="int", default=1, help="Rows per device per step (packed rows are long).")
MAX_SAMPLES = Opt("max_samples", type="int", default=None, help="Only the first N examples.", min=1)
REWARD = Opt("reward", default=REQUIRED, help="Reward model directory (`lmforge train rm`).")

# ----------------------------------------------------------------------------- data

STAGES = ("pt", "sft", "rm", "dpo", "kto", "ppo")

DATA_ALIGN = (
    Opt("inputs", default=None, many=True, argument=True, show_default=False,
        help="JSON, JSONL, CSV, Parquet, Arrow or TXT files, directories of them, datasets directories, "
             "or '-' for stdin (the default)."),
    STREAM_OUTPUT,
    Opt("format", choices=("auto", "alpaca", "sharegpt", "openai", "pairwise", "kto", "text"), default="auto",
        flags=("--format", "-f"), help="Source format; auto detects it from the columns and says so on stderr."),
    Opt("columns", default=None,
        help="Column names when yours differ: OURS=YOURS,... (instruction, input, output, system, history, messages, "
             "tools, chosen, rejected, label, prompt, completion, text)."),
    Opt("tags", default=None,
        help="Chat role tags: role=from,content=value,user=human,assistant=gpt,observation=...,function=...,system=..."),
    Opt("dataset_info", type="path", default=None,
        help="A LLaMA-Factory dataset_info.json (or its directory): align entries named by --name."),
    Opt("name", default=None, many=True, help="Entry of --dataset-info to align (repeat for several)."),
    Opt("skip_invalid", type="bool", default=False,
        help="Drop invalid rows (counted by reason on stderr) instead of failing on the first."),
    MAX_SAMPLES.but(help="Keep at most N examples from each input."),
    Opt("sample", choices=("first", "random"), default="first",
        help="With --max-samples: the first N rows, or a uniform random sample (by --seed)."),
    DATA_SEED,
)
DATA_MERGE = (
    Opt("inputs", default=REQUIRED, many=True, argument=True,
        help="Datasets to merge (one of them may be '-' for stdin)."),
    STREAM_OUTPUT,
    Opt("mix", choices=("concat", "interleave-under", "interleave-over"), default="concat",
        help="concat; interleave-under: stop when an input runs out; interleave-over: restart inputs that run out "
             "until all have been used up."),
    Opt("probs", default=None,
        help="With interleave: draw each row's input with these probabilities, e.g. 0.7,0.3 (default: round robin)."),
    DATA_SEED,
)
DATA_SPLIT = (
    INPUT.but(help="Dataset to split, or '-' for stdin."),
    OUTPUT.but(default=Path("split"), help="Directory to write train.arrow and val.arrow into."),
    Opt("val_size", type="float", default=0.1, min=0, min_open=True,
        help="Validation share: a fraction below 1 (0.1) or a row count (500)."),
    DATA_SEED,
)
DATA_SHOW = (
    INPUT.but(help="Dataset to show, or '-' for stdin."),
    Opt("rows", type="int", default=5, flags=("--rows", "-n"), min=0, help="How many rows to print (0: all)."),
    Opt("schema", type="bool", default=False, flags=("--schema",), help="Print the columns and the lmforge metadata."),
    Opt("stats", type="bool", default=False, flags=("--stats",), help="Print row count, kind, stage and provenance."),
    JSON_OUT.but(help="With --stats/--schema: one JSON object."),
)
DATA_PACK = (
    MODEL.but(help="Model directory or Hub id whose tokenizer to use."),
    INPUT.but(help="Aligned dataset, or '-' for stdin."),
    STREAM_OUTPUT,
    TEMPLATE.but(flags=("--template", "-t"),
                 help="Chat template name, or auto for the tokenizer's own (`lmforge data templates`)."),
    Opt("stage", choices=STAGES, default="sft", flags=("--stage", "-s"), help="Training stage the data is for."),
    Opt("cutoff", type="int", default=1024, help="Maximum tokens per example (and per packed row)."),
    Opt("packing", type="bool", default=False, help="Pack several examples per row (best-fit decreasing)."),
    Opt("neat_packing", type="bool", default=False,
        help="Pack, keeping each example's own positions so attention never crosses examples."),
    Opt("train_on_prompt", type="bool", default=False, help="Compute the loss on prompt tokens too."),
    Opt("mask_history", type="bool", default=False, help="Loss on the last assistant turn only."),
    # issue 16: reasoning (thinking) controls
    Opt("reasoning", choices=("auto", "keep", "drop"), default="auto",
        help="Reasoning of assistant turns: auto (the template's own rule for earlier turns), "
             "keep (every turn, named templates), drop (none)."),
    Opt("thinking", choices=("auto", "on", "off"), default="auto",
        help="The enable_thinking switch of hybrid thinking models (off: no reasoning, empty think blocks)."),
    Opt("mask_empty_think", type="bool", default=False, help="No loss on empty think blocks."),
    Opt("num_proc", type="int", default=1, help="Worker processes for tokenization."),
    DATA_SEED,
    # issue 17: vision-language data (images are resized before counting their image tokens)
    Opt("image_max_pixels", type="int", default=768 * 768, min=1,
        help="Images larger than this many pixels are scaled down (aspect kept) before packing."),
    Opt("image_min_pixels", type="int", default=32 * 32, min=1,
        help="Images smaller than this many pixels are scaled up (aspect kept) before packing."),
)
DATA_STATS = (INPUT.but(help="Packed dataset, or '-' for stdin."), JSON_OUT.but(help="One JSON object instead of a table."))
DATA_TEMPLATES = (JSON_OUT.but(help="As JSON."),)

# ----------------------------------------------------------------------------- model

# issue 22: every command that runs a model takes --attn, with train's choices
ATTENTION = Opt("attn", choices=("auto", "sdpa", "eager", "flash_attention_2"), default="auto",
                help="Attention kernel (auto: what transformers supports for the architecture: flash-attention on "
                     "CUDA when installed, else sdpa, else eager).")
QUANT_METHODS = ("bnb-nf4", "bnb-int8", "gptq", "awq")
ARCHS = ("llama", "qwen2", "qwen3", "mistral")

MODEL_QUANTIZE = (
    MODEL.but(flags=(), argument=True),
    OUTPUT.but(help="Directory for the quantized model (printed on stdout)."),
    Opt("method", choices=QUANT_METHODS, default="bnb-int8",
        help="bitsandbytes NF4/int8 (no calibration), GPTQ (GPTQModel; CPU or GPU), AWQ (GPTQModel; CUDA)."),
    Opt("bits", type="int", default=None, help="Bits per weight (gptq: 2, 3, 4, 8)."),
    Opt("group_size", type="int", default=128, help="gptq/awq: weights per quantization group (-1: per column)."),
    Opt("calib", default=None, help="Calibration data: an aligned or packed dataset."),
    Opt("calib_samples", type="int", default=128, help="Calibration rows to use."),
    Opt("eval_data", default=None,
        help="Held-out data for perplexity (default: the last rows of --calib, kept out of calibration)."),
    Opt("eval_samples", type="int", default=32, help="Held-out rows for perplexity."),
    Opt("max_length", type="int", default=512, help="Tokens per calibration/evaluation row."),
    ATTENTION,
    OVERWRITE,
    SEED,
)
MODEL_INIT = (
    OUTPUT.but(help="Directory for the new model (printed on stdout)."),
    Opt("arch", choices=ARCHS, default="llama", help="Architecture."),
    Opt("layers", type="int", default=4, help="Decoder layers."),
    Opt("hidden", type="int", default=128, help="Hidden size."),
    Opt("heads", type="int", default=4, help="Attention heads."),
    Opt("kv_heads", type="int", default=None, help="Key/value heads (default: --heads)."),
    Opt("intermediate", type="int", default=None, help="MLP width (default 4 x hidden)."),
    Opt("vocab_size", type="int", default=2048, help="With --train-tokenizer: the vocabulary size to learn."),
    Opt("max_position", type="int", default=1024, help="Context length."),
    Opt("tokenizer", default=None, help="Use this model's tokenizer (directory or Hub id)."),
    Opt("train_tokenizer", default=None,
        help="Train a byte-level BPE tokenizer (ChatML chat template) on this aligned dataset."),
    SEED.but(help="Random seed of the initial weights."),
    OVERWRITE,
)

# ----------------------------------------------------------------------------- model export (issue 24)

EXPORT_QUANTS = ("f16", "bf16", "f32", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s",
                 "q4_0", "q4_1", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")
MODEL_EXPORT = (
    MODEL.but(flags=(), argument=True, help="Model directory (a base model, a merged or fully trained one)."),
    ADAPTER.but(help="A PEFT adapter trained on MODEL: merged in on the way."),
    OUTPUT.but(help="The GGUF file to write, e.g. model.gguf (printed on stdout)."),
    Opt("format", choices=("gguf",), default="gguf", help="Output format: gguf (llama.cpp, Ollama, LM Studio)."),
    Opt("quant", choices=EXPORT_QUANTS, default="f16",
        help="Weights: f16/bf16/f32 as converted, or quantized by llama.cpp's quantizer (q8_0, q4_k_m, ...)."),
    TEMPLATE.but(help="Chat template written into the file: auto (what the model was trained with, else its own), "
                      "a template name, or none."),
    Opt("system", default=None, help="--ollama: the Modelfile's SYSTEM prompt (default: the template's own, if any)."),
    Opt("ollama", type="bool", default=False, help="Also write an Ollama Modelfile beside the file (OUT.Modelfile)."),
    OVERWRITE.but(help="Replace existing output files."),
)

# ----------------------------------------------------------------------------- adapter

MERGE_DTYPES = ("auto", "fp32", "bf16", "fp16")

ADAPTER_MERGE = (
    Opt("base", default=REQUIRED, argument=True,
        help="The base model the adapters were trained on (directory or Hub id)."),
    Opt("adapters", default=REQUIRED, many=True, argument=True, help="Adapter directories, applied in order."),
    OUTPUT.but(help="Directory for the merged model (printed on stdout)."),
    Opt("dtype", choices=MERGE_DTYPES, default="auto",
        help="Weights' dtype in the merged model (auto: as the base is stored)."),
    Opt("max_shard_size", default="5GB", help="Largest safetensors shard, e.g. 2GB."),
    OVERWRITE,
)

# ----------------------------------------------------------------------------- train

P, M, L, F, E, O, R, D = ("Model and data", "Method", "LoRA", "Freeze / LLaMA-Pro", "GaLore / BAdam", "Optimisation",
                          "Run", "Distributed")
METHODS = ("full", "freeze", "lora", "dora", "pissa", "llama-pro", "galore", "badam")

TRAIN_MODEL = MODEL.but(help="Base model: a directory or a Hub id.", panel=P)
TRAIN_OUTPUT = OUTPUT.but(panel=P)
TRAIN_OVERWRITE = OVERWRITE.but(help="Replace a non-empty output directory.", panel=P)
RESUME = Opt("resume", type="bool", default=False, help="Continue an interrupted run from its last checkpoint.", panel=P)
LORA_RANK = Opt("lora_rank", type="int", default=8, help="LoRA rank.", panel=L)
LORA_ALPHA = Opt("lora_alpha", type="float", default=None, help="LoRA alpha (default 2 x rank).", panel=L, min=0,
                 min_open=True)
LORA_TARGET = Opt("lora_target", default="all", panel=L,
                  help="Modules to adapt: all (every linear layer but the head) or names, e.g. q_proj,v_proj.")
LEARNING_RATE = Opt("learning_rate", type="float", default=None, flags=("--learning-rate", "--lr"), panel=O, min=0,
                    min_open=True,
                    help="Peak learning rate (default 1e-4 for adapters, 1e-5 otherwise).")
EPOCHS = Opt("epochs", type="float", default=3.0, help="Passes over the data.", panel=O, min=0)
MAX_STEPS = Opt("max_steps", type="int", default=-1, help="Stop after N optimizer steps (overrides --epochs).", panel=O)
MAX_GRAD_NORM = Opt("max_grad_norm", type="float", default=1.0, help="Gradient clipping (0: none).", panel=O, min=0)
SAVE_STEPS = Opt("save_steps", type="int", default=500, help="Checkpoint every N steps (for --resume).", panel=R)
KEEP_CHECKPOINTS = Opt("keep_checkpoints", type="bool", default=False, help="Keep checkpoints/ after a successful run.",
                       panel=R)
REPORT = Opt("report", choices=("none", "tensorboard", "wandb", "mlflow", "trackio", "swanlab"), default=None,
             many=True, panel=R,  # issue 24: through the Trainer's own integrations (shared/train/reporting.py)
             help="Report the run to trackers (repeat for several): tensorboard (OUT/tensorboard), wandb, mlflow, "
                  "trackio, swanlab; the run config holds the lmforge.json parameters.")
LOGGING_STEPS = Opt("logging_steps", type="int", default=10, help="Log every N steps to trainer_log.jsonl.", panel=R)

# ----------------------------------------------------------------------------- train: speed and memory (issue 21)

KERNELS = ("none", "liger", "unsloth")
CHECKPOINTING = ("full", "selective")
TRAIN_EFFICIENCY = (   # in TRAIN_COMMON's "how it trains" part (shared/train/shiftattn.py, kernels.py)
    Opt("shift_attn", type="bool", default=False, panel=O,
        help="S² attention (LongLoRA) while training: attention within groups of a quarter of the row, half the "
             "heads shifted by half a group; full attention in eval and generation. llama, qwen2, qwen3, mistral."),
    Opt("checkpointing", choices=CHECKPOINTING, default="full", panel=O,
        help="What --gradient-checkpointing keeps for backward: full (each layer's input; the whole layer runs "
             "again) or selective (also the LoRA layers' and attention's outputs; only cheap operations run again: "
             "near the speed without checkpointing at part of its memory). selective turns it on."),
    Opt("checkpoint_every", type="int", default=1, min=1, panel=O,
        help="With gradient checkpointing: checkpoint only every N-th decoder layer; the others keep their "
             "activations (2: half the recompute, about half the memory saved)."),
    Opt("kernels", choices=KERNELS, default="none", panel=O,
        help="Fused GPU kernels (CUDA only): liger (Liger-Kernel: RMSNorm, RoPE, SwiGLU, fused linear "
             "cross-entropy) or unsloth (Unsloth's LoRA path)."),
)

TRAIN_COMMON = (
    TRAIN_MODEL,
    Opt("data", default=REQUIRED, flags=("--data", "-d"), panel=P,
        help="Packed training data (`lmforge data pack`), or - for stdin."),
    TRAIN_OUTPUT,
    Opt("eval_data", default=None, help="Packed evaluation data: eval loss during and after training.", panel=P),
    TRAIN_OVERWRITE,
    RESUME,
    # what trains
    Opt("method", choices=METHODS, default="lora", panel=M,
        help="What trains: all weights, some layers, LoRA-family adapters, new blocks, or full training with GaLore/BAdam."),
    Opt("quant", type="int", default=None, panel=M,
        help="Load the base in 4 or 8 bits (bitsandbytes; QLoRA). Adapter methods only."),
    LORA_RANK,
    LORA_ALPHA,
    Opt("lora_dropout", type="float", default=0.0, help="Dropout on the LoRA path.", panel=L, min=0, max=1,
        max_open=True),
    LORA_TARGET,
    Opt("rslora", type="bool", default=False, help="Rank-stabilised scaling (alpha / sqrt(r)).", panel=L),
    Opt("loraplus_ratio", type="float", default=None, min=0, min_open=True, panel=L,
        help="LoRA+: learning rate of B = ratio x that of A (e.g. 16)."),
    Opt("freeze_layers", type="int", default=2, help="freeze: train the last N decoder layers (negative: the first N).",
        panel=F),
    Opt("freeze_modules", default="all", panel=F,
        help="freeze: within those layers, train only these submodules (e.g. mlp,self_attn; default all)."),
    Opt("freeze_extra", default="", help="freeze: also train these modules (e.g. embed_tokens,norm).", panel=F),
    Opt("expand_layers", type="int", default=0,
        help="llama-pro: number of new blocks to insert (must divide the layer count).", panel=F),
    Opt("galore_rank", type="int", default=16, help="galore: rank of the gradient projection.", panel=E),
    Opt("galore_scale", type="float", default=0.25, help="galore: scale of the projected update.", panel=E, min=0,
        min_open=True),
    Opt("galore_update_interval", type="int", default=200, help="galore: steps between projection updates.", panel=E),
    Opt("galore_target", default="all", help="galore: module name patterns (default: attention and MLP layers).",
        panel=E),
    Opt("badam_mode", choices=("ascending", "descending", "random"), default="ascending",
        help="badam: order of the blocks.", panel=E),
    Opt("badam_switch_interval", type="int", default=50, help="badam: steps before switching to the next block.",
        panel=E),
    # issue 17: vision-language models (the vision tower and projector are frozen by default)
    Opt("train_projector", type="bool", default=False, panel=M,
        help="Vision-language models: also train the projector between the vision tower and the language model."),
    Opt("train_vision_tower", type="bool", default=False, panel=M,
        help="Vision-language models: also train the vision tower."),
    # how it trains
    LEARNING_RATE,
    EPOCHS,
    MAX_STEPS,
    Opt("warmup", type="float", default=0.0, min=0, panel=O,
        help="Linear warm-up: a fraction of the steps (< 1) or a step count."),
    Opt("weight_decay", type="float", default=0.0, help="Weight decay.", panel=O, min=0),
    MAX_GRAD_NORM,
    BATCH_SIZE.but(panel=O),
    Opt("grad_accum", type="int", default=8, help="Gradient accumulation steps.", panel=O),
    Opt("scheduler", default="cosine", panel=O,
        help="Learning-rate schedule: cosine, linear, constant, constant_with_warmup, ..."),
    Opt("optim", default="adamw", panel=O,
        help="Optimizer: adamw, adamw8bit, paged_adamw8bit, adafactor, sgd, or any transformers name."),
    Opt("gradient_checkpointing", type="bool", default=False,
        help="Recompute activations in the backward pass (less memory).", panel=O),
    Opt("neftune_alpha", type="float", default=None, panel=O, min=0, min_open=True,
        help="NEFTune (pt/sft): uniform noise of scale alpha / sqrt(row length x hidden) on the input embeddings "
             "while training, e.g. 5."),
    PRECISION.but(panel=O),
    Opt("attn", choices=("auto", "sdpa", "eager", "flash_attention_2"), default="auto", panel=O,
        help="Attention kernel (auto: flash-attention on CUDA when installed, else sdpa)."),
    Opt("rope_scaling", choices=("auto", "linear", "dynamic", "yarn", "none"), default="auto", panel=O,
        help="RoPE scaling when the data's cutoff exceeds the model's context."),
    *TRAIN_EFFICIENCY,  # issue 21
    SEED.but(panel=O),
    # the run
    SAVE_STEPS,
    KEEP_CHECKPOINTS,
    LOGGING_STEPS,
    Opt("eval_steps", type="int", default=None, help="Evaluate every N steps (default: --save-steps).", panel=R),
    REPORT,
    Opt("deepspeed", default=None, panel=D,
        help="DeepSpeed: z2, z3, z3-offload, or a config JSON (launch with torchrun/deepspeed)."),
    Opt("fsdp", type="bool", default=False, help="PyTorch FSDP (CUDA GPUs; launch with torchrun or accelerate).",
        panel=D),
)

PREF = "Preference loss"
PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "orpo", "simpo", "kto")
TRAIN_PREFERENCE = (
    Opt("loss", choices=PREFERENCE_LOSSES, default="sigmoid", panel=PREF,
        help="sigmoid (DPO), ipo, hinge: with a reference model; orpo, simpo: without; kto: on KTO-labelled data."),
    Opt("beta", type="float", default=None, panel=PREF, min=0, min_open=True,
        help="Strength of the preference term (default 0.1; 2.0 for simpo; ORPO's lambda for orpo)."),
    Opt("ftx", type="float", default=0.0, panel=PREF, min=0,
        help="DPO-ftx: add FTX x the SFT loss on the chosen answer (logged as sft_loss)."),
    Opt("simpo_gamma", type="float", default=0.5, help="simpo: the target reward margin gamma.", panel=PREF),
    Opt("precompute_ref", type="bool", default=False, panel=PREF,
        help="Full tuning: compute reference log-probs once before training instead of keeping a frozen copy."),
    Opt("desirable_weight", type="float", default=1.0, help="kto: weight of desirable examples.", panel=PREF, min=0,
        min_open=True),
    Opt("undesirable_weight", type="float", default=1.0, help="kto: weight of undesirable examples.", panel=PREF,
        min=0, min_open=True),
)

G = "PPO"
TRAIN_PPO = (
    TRAIN_MODEL.but(help="Base model (directory or Hub id)."),
    REWARD.but(panel=P),
    Opt("data", default=REQUIRED, flags=("--data", "-d"), panel=P, help="Prompts packed with `data pack --stage ppo`."),
    TRAIN_OUTPUT.but(help="Output directory (printed on stdout)."),
    Opt("sft", default=None, panel=P,
        help="The SFT adapter (merged into the base in memory) or SFT model directory."),
    TRAIN_OVERWRITE,
    RESUME,
    Opt("layout", choices=("shared", "separate"), default="shared", panel=G,
        help="shared: one base model serves policy, reference and reward by switching adapters; separate: four models."),
    # a PPO step samples a batch of prompts: its own settings, defaults and help
    LORA_RANK.but(help="Rank of the policy's LoRA adapter.", panel=G),
    LORA_ALPHA.but(panel=G),
    LORA_TARGET.but(help="Modules to adapt (all, or names).", panel=G),
    LEARNING_RATE.but(default=1e-5, help="Learning rate.", panel=G),
    BATCH_SIZE.but(default=8, help="Prompts per PPO step (rollouts).", panel=G),
    Opt("mini_batch_size", type="int", default=4, help="Rollouts per gradient update.", panel=G),
    Opt("ppo_epochs", type="int", default=4, help="Passes over each batch of rollouts.", panel=G),
    MAX_STEPS.but(default=100, help="PPO steps.", panel=G),
    EPOCHS.but(default=None, help="Passes over the prompts (overrides --max-steps).", panel=G),
    MAX_NEW_TOKENS.but(default=64, help="Longest response sampled.", min=None, panel=G),
    TEMPERATURE.but(default=1.0, min=None, panel=G),
    Opt("top_k", type="int", default=0, help="Top-k sampling (0: off).", panel=G),
    TOP_P.but(panel=G),
    Opt("kl_coef", type="float", default=0.05, help="Initial per-token KL penalty coefficient.", panel=G, min=0),
    Opt("kl_target", type="float", default=6.0, help="Adaptive KL target (0: fixed coefficient).", panel=G, min=0),
    Opt("kl_horizon", type="int", default=10000, help="Adaptive KL horizon.", panel=G),
    Opt("gamma", type="float", default=1.0, help="Discount.", panel=G, min=0, max=1),
    Opt("lam", type="float", default=0.95, help="GAE lambda.", panel=G, min=0, max=1),
    Opt("clip_range", type="float", default=0.2, help="PPO ratio clipping.", panel=G, min=0, min_open=True, max=1,
        max_open=True),
    Opt("clip_range_value", type="float", default=0.2, help="Value clipping.", panel=G, min=0, min_open=True),
    Opt("vf_coef", type="float", default=0.1, help="Weight of the value loss.", panel=G, min=0),
    Opt("reward_scale", type="float", default=1.0, help="Multiply scores by this.", panel=G),
    Opt("reward_clip", type="float", default=None, help="Clip scores to +-this.", panel=G, min=0, min_open=True),
    Opt("reward_norm", type="bool", default=False, help="Normalise scores by their running mean and std.", panel=G),
    Opt("missing_eos_penalty", type="float", default=None, panel=G,
        help="Subtract this from the score of answers that never stop."),
    Opt("whiten_advantages", type="bool", default=True, help="Normalise advantages over each batch.", panel=G),
    MAX_GRAD_NORM.but(panel=G),
    PRECISION.but(help="Weights' precision.", panel=G),
    SEED.but(panel=R),
    SAVE_STEPS.but(default=50, help="Checkpoint every N steps."),
    KEEP_CHECKPOINTS.but(help="Keep checkpoints/ at the end."),
    LOGGING_STEPS.but(default=1, help="Log every N steps."),
    REPORT,  # issue 24
)

# ----------------------------------------------------------------------------- train grpo (issue 19)

GR = "GRPO"
GRPO_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo")
TRAIN_GRPO = (
    *[o.but(help="Prompts (with reference answers where the data has them) packed with `data pack --stage ppo`.")
      if o.name == "data" else o
      for o in TRAIN_COMMON if o.name not in ("eval_data", "eval_steps", "neftune_alpha", "loraplus_ratio",
                                              "batch_size", "grad_accum", "epochs", "max_steps", "save_steps",
                                              "logging_steps", "shift_attn", "checkpointing", "checkpoint_every",
                                              "kernels")],  # issue 21: not grpo
    REWARD.but(many=True, panel=GR, flags=("--reward", "-r"),
               help="A reward (repeat for several): exact, numeric, format, regex:PATTERN, length:N, "
                    "cmd:COMMAND (JSON lines in, one number per line out), module:function or file.py:function, "
                    "or a reward model directory (`train rm`)."),
    Opt("reward_weights", default=None, panel=GR,
        help="Weights of the --reward terms, comma-separated in their order (default: 1 each)."),
    Opt("reward_timeout", type="float", default=60.0, min=0, min_open=True, panel=GR,
        help="Seconds a cmd: reward may take per batch; one that takes longer is stopped with its children."),
    BATCH_SIZE.but(default=4, help="Prompts per device per micro-batch (each sampled --num-generations times).",
                   panel=GR),
    Opt("grad_accum", type="int", default=1, help="Gradient accumulation steps.", panel=GR),
    Opt("num_generations", type="int", default=4, min=2, panel=GR,
        help="Group size: completions sampled per prompt; advantages are relative to the group."),
    EPOCHS.but(default=1.0, panel=GR),
    MAX_STEPS.but(panel=GR),
    MAX_NEW_TOKENS.but(default=64, help="Longest completion sampled.", panel=GR),
    TEMPERATURE.but(default=1.0, min_open=True, help="Sampling temperature (above 0: GRPO samples).", panel=GR),
    TOP_P.but(panel=GR),
    Opt("top_k", type="int", default=0, help="Top-k sampling (0: off).", panel=GR),
    Opt("kl_coef", type="float", default=0.0, min=0, panel=GR,
        help="KL coefficient beta against the reference (the model without the adapter); 0: no reference pass."),
    Opt("loss_type", choices=GRPO_LOSSES, default="dapo", panel=GR,
        help="Loss aggregation (TRL): grpo (per sequence), dr_grpo (constant), dapo (per token), bnpo, cispo, sapo."),
    Opt("clip_range", type="float", default=0.2, help="Ratio clipping epsilon.", panel=GR, min=0, min_open=True,
        max=1, max_open=True),
    Opt("clip_range_high", type="float", default=None, min=0, min_open=True, panel=GR,
        help="Upper clipping epsilon (DAPO's clip-higher; default: --clip-range)."),
    Opt("num_iterations", type="int", default=1, min=1, help="Updates per batch of completions (mu).", panel=GR),
    Opt("scale_rewards", choices=("group", "batch", "none"), default="group", panel=GR,
        help="Divide advantages by the reward std of the group, of the batch, or not at all (Dr. GRPO)."),
    Opt("mask_truncated", type="bool", default=False, panel=GR,
        help="Leave completions that hit --max-new-tokens out of the loss (DAPO)."),
    Opt("vllm", type="bool", default=False, panel=GR,
        help="Generate with vLLM colocated on the training GPU (CUDA with vllm installed)."),
    SAVE_STEPS.but(default=50),
    LOGGING_STEPS.but(default=1),
)

# ----------------------------------------------------------------------------- eval

EVAL_MODEL = (MODEL, ADAPTER, ATTENTION)
EVAL_BENCHMARK = (
    *EVAL_MODEL,
    Opt("data", default=REQUIRED, flags=("--data", "-d"),
        help="The benchmark: a zip or directory of CSVs, with mapping.json beside it."),
    Opt("mapping", default=None, help="Subject mapping (default: mapping.json beside --data)."),
    Opt("split", choices=("test", "val", "dev"), default="test", help="Which questions to answer."),
    Opt("shots", type="int", default=5, min=0, help="Solved examples from the dev split in each prompt."),
    Opt("subjects", default=None, help="Only these subjects (comma-separated)."),
    BATCH_SIZE.but(default=4, help="Questions per forward pass.", min=1),
    TEMPLATE,
    Opt("cutoff", type="int", default=None, help="Longest prompt (default: the model's context); shots are dropped to fit."),
    Opt("predictions", type="path", default=None, help="Save every question's prediction as JSON lines here."),
    JSON_OUT,
)
EVAL_GENERATE = (
    *EVAL_MODEL,
    Opt("data", default=REQUIRED, flags=("--data", "-d"), help="Aligned sft data (prompts with reference answers)."),
    TEMPLATE.but(help="auto (what the model was trained with, else its chat template) or a name."),
    MAX_NEW_TOKENS,
    TEMPERATURE.but(default=0.0, help="Sampling temperature (0: greedy, the default)."),
    TOP_P,
    SEED.but(help="Sampling seed."),
    BATCH_SIZE.but(default=8, help="Prompts generated together.", min=1),
    MAX_SAMPLES,
    STREAM_OUTPUT.but(help="Save predictions: .jsonl (JSON lines) or .arrow."),
    JSON_OUT,
)
EVAL_PERPLEXITY = (
    *EVAL_MODEL,
    Opt("data", default=REQUIRED, flags=("--data", "-d"), help="Packed pt or sft data."),
    BATCH_SIZE.but(default=4, help="Rows per forward pass.", min=1),
    JSON_OUT,
)
EVAL_RM = (
    MODEL.but(help="The base model the reward model was trained on."),
    REWARD,
    Opt("data", default=REQUIRED, flags=("--data", "-d"), help="Pairs packed with `data pack --stage rm`."),
    BATCH_SIZE.but(default=8, help="Pairs per forward pass.", min=1),
    ATTENTION,
    JSON_OUT,
)

# ----------------------------------------------------------------------------- serve, chat

SERVE = (
    MODEL.but(panel="Model"),
    ADAPTER.but(help="A PEFT adapter to serve on the model.", panel="Model"),
    TEMPLATE.but(help="auto (what the model was trained with, else its chat template) or a template name.",
                 panel="Model"),
    Opt("name", default=None, help="Model id clients use (default: the directory name).", panel="Model"),
    Opt("host", default="127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    Opt("port", type="int", default=8000, help="Port to listen on.", min=1, max=65535),
    Opt("api_key", default=None, envvar="LMFORGE_API_KEY",
        help="Require 'Authorization: Bearer KEY' (also LMFORGE_API_KEY)."),
    Opt("backend", choices=("hf", "vllm"), default="hf", help="hf: transformers (CPU or GPU); vllm: vLLM (GPU)."),
    Opt("max_concurrency", type="int", default=32, min=1, help="Requests generated at once; more wait their turn."),
    Opt("max_batch", type="int", default=32, min=1, help="hf backend: most sequences in one generation batch."),
    ATTENTION.but(help="hf backend: attention kernel (auto: what transformers supports for the architecture).",
                  panel="Model"),
    Opt("max_request_bytes", type="int", default=8 << 20, min=1024,
        help="Largest request body accepted; a larger one gets HTTP 413."),
    Opt("media_dir", default=None,
        help="Let requests name images by local path or file:// URL inside this directory (vision models); "
             "without it only data: URLs are read."),
    Opt("max_images", type="int", default=8, min=1, help="Most images one request may carry; more get HTTP 400."),
    Opt("max_image_bytes", type="int", default=20 << 20, min=1024,
        help="Largest image file a request may carry; a larger one gets HTTP 413."),
    Opt("max_image_pixels", type="int", default=4096 * 4096, min=1,
        help="Largest image (width x height) a request may carry, read from its header before anything is "
             "decoded; a larger one gets HTTP 413."),
)
CHAT = (
    MODEL,
    ADAPTER.but(help="A PEFT adapter to use."),
    TEMPLATE.but(help="auto or a template name."),
    Opt("system", default="", help="A system prompt."),
    Opt("max_tokens", type="int", default=512, min=1, help="Longest answer."),
    TEMPERATURE,
    ATTENTION,
)

# ----------------------------------------------------------------------------- board (issue 18)

BOARD = (
    Opt("host", default="127.0.0.1",
        help="Address to listen on (127.0.0.1: this machine only; any other address needs --token)."),
    Opt("port", type="int", default=7860, help="Port to listen on.", min=1, max=65535),
    Opt("workspace", type="path", default=Path("."),
        help="Directory the board works in: data, models and runs/ live there; every path the page names "
             "must stay inside it."),
    Opt("token", default=None, envvar="LMFORGE_BOARD_TOKEN",
        help="Require this token on every request (open http://HOST:PORT/?token=TOKEN once; also "
             "LMFORGE_BOARD_TOKEN)."),
)

COMMANDS: dict[str, tuple[Opt, ...]] = {
    "data align": DATA_ALIGN,
    "data merge": DATA_MERGE,
    "data split": DATA_SPLIT,
    "data show": DATA_SHOW,
    "data pack": DATA_PACK,
    "data stats": DATA_STATS,
    "data templates": DATA_TEMPLATES,
    "model quantize": MODEL_QUANTIZE,
    "model init": MODEL_INIT,
    "model export": MODEL_EXPORT,  # issue 24
    "adapter merge": ADAPTER_MERGE,
    "train pt": TRAIN_COMMON,
    "train sft": TRAIN_COMMON,
    "train rm": TRAIN_COMMON,
    "train dpo": (*TRAIN_COMMON, *TRAIN_PREFERENCE),
    "train ppo": TRAIN_PPO,
    "train grpo": TRAIN_GRPO,  # issue 19
    "eval mmlu": EVAL_BENCHMARK,
    "eval cmmlu": EVAL_BENCHMARK,
    "eval ceval": EVAL_BENCHMARK,
    "eval generate": EVAL_GENERATE,
    "eval perplexity": EVAL_PERPLEXITY,
    "eval rm": EVAL_RM,
    "serve": SERVE,
    "chat": CHAT,
    "board": BOARD,  # issue 18
    "completion": (Opt("shell", choices=("bash", "zsh", "fish"), default=REQUIRED, argument=True, help="The shell."),),
}


def options(command: str) -> tuple[Opt, ...]:
    return COMMANDS[command]


def defaults(command: str) -> dict[str, Any]:
    """Each option's default as `command` takes it (REQUIRED for those that must be given)."""
    return {o.name: o.default for o in COMMANDS[command]}


def commands_taking(name: str) -> list[str]:
    """Which commands take the option `name`."""
    return [c for c, opts in COMMANDS.items() if any(o.name == name for o in opts)]
