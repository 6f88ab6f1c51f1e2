"""Options many commands take, as one `Opt` each; a command that reads one differently (another
default or help text) says so with `.but(...)` where it declares the field."""

from __future__ import annotations

from lmforge.shared.core.options import REQUIRED, Opt

MODEL = Opt(default=REQUIRED, help="Model directory or Hub id.", flags=("--model", "-m"))
ADAPTER = Opt(default=None, help="A PEFT adapter to apply (trained on --model).")
TEMPLATE = Opt(default="auto",
               help="auto (what the model was trained with, else its chat template, else plain text), a template "
                    "name, or none.")
INPUT = Opt(default="-", help="Dataset, or '-' for stdin.", argument=True)
OUTPUT = Opt(default=REQUIRED, help="Output directory (printed on stdout at the end).", flags=("--output", "-o"))
STREAM_OUTPUT = OUTPUT.but(default=None, help="Write here (atomically). Default: stdout, when it is not a terminal.")
OVERWRITE = Opt(default=False, help="Replace an existing output directory.")
SEED = Opt(default=42, help="Random seed.")
DATA_SEED = SEED.but(help="Random seed; same inputs and seed give identical output.")
JSON_OUT = Opt(default=False, help="Full results as JSON on stdout.", flags=("--json",))
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PRECISION = Opt(choices=PRECISIONS, default="auto", help="auto: bf16 on recent GPUs, fp16 on older ones, fp32 on CPU.")
TEMPERATURE = Opt(default=0.7, help="Sampling temperature (0: greedy).", min=0)
TOP_P = Opt(default=1.0, help="Nucleus sampling.", min=0, min_open=True, max=1)
MAX_NEW_TOKENS = Opt(default=256, help="Longest answer.", min=1)
BATCH_SIZE = Opt(default=1, help="Rows per device per step (packed rows are long).")
MAX_SAMPLES = Opt(default=None, help="Only the first N examples.", min=1)
REWARD = Opt(default=REQUIRED, help="Reward model directory (`lmforge train rm`).")
ATTENTIONS = ("auto", "sdpa", "eager", "flash_attention_2")
ATTENTION = Opt(choices=ATTENTIONS, default="auto",
                help="Attention kernel (auto: what transformers supports for the architecture: flash-attention on "
                     "CUDA when installed, else sdpa, else eager).")
