"""GPU figures (`make bench-gpu`, on a machine with a CUDA GPU): tokens/s, peak GPU memory and model
FLOPs utilisation of `train sft` with full, LoRA and QLoRA (nf4) on SmolLM2-135M-Instruct and on a
~1B Llama made by `lmforge model init` (Llama-3.2-1B's shape: 16 layers, hidden 2048, 32 heads,
8 KV heads, MLP 8192) with SmolLM2's tokenizer. Where SmolLM2's weights cannot travel (the GPU
machine gets only its tokenizer and config: `make gpu-wheels`), a model of exactly its shape is
made by `model init` instead, which the table says: the speed and memory are the same, the loss is
a random model's.

Same data (alpaca_en_demo packed to 1024 tokens), 50 steps of 8 rows, each method as a user runs
it: `--precision bf16`, which for full fine-tuning on a GPU keeps fp32 weights and optimizer state
under bf16 autocast (at lr 2e-5 most updates to bf16 weights would round away), and for LoRA and
QLoRA a bf16 (or nf4) base with fp32 adapter weights under bf16 autocast.

tokens/s and MFU are the steady state: each run is `lmforge train sft` in a process of its own
with a callback that notes the end of every optimizer step (CUDA synchronised), and the figures
count the steps after the first WARMUP (CUDA context, cuBLAS heuristics, allocator growth and the
first data batches fall there), not the whole `trainer.train()`. Peak memory is
torch.cuda.max_memory_allocated() over the whole run (lmforge.json's peak_gpu_memory_mib).
MFU = tokens/s x training FLOPs per token / the GPU's dense bf16 peak (flops_per_token says what
is counted; the peak comes from the GPU's name, or LMFORGE_PEAK_TFLOPS). Each row is appended to a
JSON-lines file (LMFORGE_BENCH_ROWS, else WORK/gpu_rows.jsonl) and printed as it finishes, so a
run cut short still leaves its figures. On a machine without CUDA this benchmark skips, saying so.

    python tests/bench/bench_gpu.py                                   # the benchmark
    python tests/bench/bench_gpu.py train TIMES ARGS...               # one timed `lmforge train ARGS`
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench_train import smollm2
from common import LMFORGE, WORK, measure_isolated, record, shared, table, versions

STEPS, CUTOFF, BATCH = 50, 1024, 8
WARMUP = 5   # optimizer steps left out of tokens/s and MFU
PARAMS = 134_515_008  # SmolLM2-135M


@dataclass(frozen=True)
class Method:
    args: list[str]
    weight_grads: bool   # full training computes weight gradients; adapters' frozen weights need none


METHODS = {
    "full (fp32 weights, bf16 autocast)": Method(["--method", "full", "--lr", "2e-5", "--precision", "bf16"], True),
    "lora (r 8, all linear)": Method(["--method", "lora", "--lora-rank", "8", "--lora-target", "all", "--lr", "1e-4"],
                                     False),
    "qlora (nf4, r 8, all linear)": Method(["--method", "lora", "--lora-rank", "8", "--lora-target", "all",
                                            "--quant", "4", "--lr", "1e-4"], False),
}
# Dense bf16 tensor-core peaks, TFLOP/s: NVIDIA's datasheets give them with 2:4 sparsity, so these
# are half of those. The SXM parts (H100/H200 SXM, whose CUDA name is plain "NVIDIA H100 80GB HBM3"
# or "NVIDIA H200") 989; the PCIe H100 756; the NVL cards (H100 NVL, H200 NVL: 1,671 sparse on
# NVIDIA's product pages as we read them) 835 -- not re-checked against NVIDIA's own pages here,
# so set LMFORGE_PEAK_TFLOPS where it matters. The first name found in the GPU's name wins, so a
# variant comes before its family.
PEAK_TFLOPS = [("H200 NVL", 835.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H800 PCIe", 756.0),
               ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0),
               ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0)]


def peak_tflops(name: str) -> float | None:
    if os.environ.get("LMFORGE_PEAK_TFLOPS"):
        try:
            value = float(os.environ["LMFORGE_PEAK_TFLOPS"])
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            sys.exit(f"LMFORGE_PEAK_TFLOPS={os.environ['LMFORGE_PEAK_TFLOPS']}: give the GPU's dense bf16 peak "
                     "in TFLOP/s (a positive number)")
        return value
    return next((v for k, v in PEAK_TFLOPS if re.search(rf"\b{re.escape(k)}\b", name, re.I)), None)


def flops_per_token(params: int, layers: int, heads: int, head_dim: int, seq: float, weight_grads: bool) -> float:
    """Training FLOPs per token (as in the PaLM paper's appendix B, with a causal mask).

    Dense: 2N forward + 2N for the activation gradients + 2N for the weight gradients = 6N, or 4N
    when the weights are frozen (adapters: their own weights are a rounding error). Attention
    scores: per layer and token, QK^T and AV are 2·2·H·Q·T FLOPs forward over the whole T×T square,
    12·L·H·Q·T with the backward (which needs both activation gradients, frozen weights or not);
    a causal mask keeps half the square, and the kernels (sdpa, flash-attention) skip the other
    half, so 6·L·H·Q·T. N: parameters, L: layers, H: query heads, Q: head size, T: row length."""
    return (6 if weight_grads else 4) * params + 6 * layers * heads * head_dim * seq


def attention_shape(model: str | Path) -> tuple[int, int, int]:
    """(layers, query heads, head size) from a model folder's config.json."""
    config = json.loads((Path(model) / "config.json").read_text())
    config = config.get("text_config", config)
    heads = int(config["num_attention_heads"])
    return int(config["num_hidden_layers"]), heads, int(config.get("head_dim") or config["hidden_size"] // heads)


def steady_state(step_end_s: list[float], step_tokens: list[int], warmup: int = WARMUP) -> dict:
    """Tokens/s over the optimizer steps after the first `warmup` (at least one step is kept).
    step_end_s: seconds from the start of training to the end of each step; step_tokens: the
    tokens each step trained."""
    if not step_end_s or len(step_end_s) != len(step_tokens):
        raise ValueError(f"{len(step_end_s)} step times for {len(step_tokens)} steps")
    skip = min(warmup, len(step_end_s) - 1)
    seconds = step_end_s[-1] - (step_end_s[skip - 1] if skip else 0.0)
    if not seconds > 0:
        raise ValueError(f"the timed steps took {seconds} s")
    tokens = sum(step_tokens[skip:])
    return {"tokens_per_second": tokens / seconds, "seconds": seconds, "steps": len(step_end_s) - skip,
            "warmup_steps": skip, "tokens": tokens}


# ----------------------------------------------------------------------------- one timed training run

def _step_timer(collator, path: Path, accumulation: int):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """The end of each optimizer step (after the GPU finished it), and its tokens, to `path`."""

        def on_train_begin(self, args, state, control, **kw):
            self.batches_at_start = len(collator.counts)
            self.ends: list[float] = []
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter() - self.start)

        def on_train_end(self, args, state, control, **kw):
            counts = collator.counts[self.batches_at_start:]   # the loader reads ahead: what trained is a prefix
            tokens = [sum(counts[i * accumulation:(i + 1) * accumulation]) for i in range(len(self.ends))]
            path.write_text(json.dumps({"step_end_s": self.ends, "step_tokens": tokens}))

    return StepTimer()


@contextlib.contextmanager
def timing(times: Path):
    """While inside: `lmforge train` (any stage the Trainer runs) notes its step times in `times`:
    the stage's own trainer builder, with a step timer added to what it builds."""
    from lmforge.shared.train import hfstage

    builder_of = hfstage.builder_of

    def timed_builder_of(o):
        builder = builder_of(o)

        def build(o, model, tokenizer, args, data, eval_data):
            trainer, collator = builder(o, model, tokenizer, args, data, eval_data)
            trainer.add_callback(_step_timer(collator, times, args.gradient_accumulation_steps))
            return trainer, collator

        return build

    hfstage.builder_of = timed_builder_of
    try:
        yield
    finally:
        hfstage.builder_of = builder_of


def train_command(times: Path, args: list) -> list[str]:
    """`lmforge train ARGS` timed by this file in a fresh process."""
    return [sys.executable, str(Path(__file__).resolve()), "train", str(times), *map(str, args)]


def timed_train(argv: list[str]) -> None:
    from lmforge.tools.main import main as lmforge

    with timing(Path(argv[0])):
        lmforge(["train", *argv[1:]])


# ----------------------------------------------------------------------------- the benchmark

def rows_path() -> Path:
    return Path(os.environ.get("LMFORGE_BENCH_ROWS") or WORK / "gpu_rows.jsonl")


def log_row(row: dict) -> None:
    """One finished row, appended and printed at once: a run cut short keeps what it measured."""
    path = rows_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    print("bench_gpu: " + json.dumps(row), flush=True)


def train_methods(model: str, packed, steps: int, batch: int, peak: float | None, params: int = PARAMS, *,
                  label: str = "", warmup: int = WARMUP) -> list[list[str]]:
    """One timed `train sft` per method on `packed`; a table row each (a failure is a row, not an abort)."""
    layers, heads, head_dim = attention_shape(model)
    rows = []
    for name, method in METHODS.items():
        out, times = WORK / "gpu_run", WORK / "gpu_step_times.json"
        times.unlink(missing_ok=True)
        args = ["sft", "-m", model, "-d", packed, "-o", out, "--overwrite", "--max-steps", steps, "--batch-size", batch,
                "--grad-accum", 1, "--save-steps", 10**6, "--logging-steps", 10, *method.args, "-q"]
        run = measure_isolated(train_command(times, args), allow_failure=True)
        row: dict = {"model": label or str(model), "method": name}
        if run["rc"] != 0 or not times.exists():
            last = (run["stderr"].strip().splitlines() or ["?"])[-1] if run["rc"] else "no step times written"
            row["failed"] = last[:120]
            log_row(row)
            rows.append([name, "failed: " + row["failed"], "", "", ""])
            continue
        metrics = json.loads((out / "lmforge.json").read_text())["metrics"]
        steady = steady_state(**json.loads(times.read_text()), warmup=warmup)
        tps = steady["tokens_per_second"]
        seq = steady["tokens"] / (steady["steps"] * batch)   # the rows' mean length
        flops = flops_per_token(params, layers, heads, head_dim, seq, method.weight_grads)
        mfu = 100 * tps * flops / (peak * 1e12) if peak else None
        row.update({"tokens_per_second": round(tps, 1), "timed_steps": steady["steps"],
                    "warmup_steps": steady["warmup_steps"], "run_seconds": metrics.get("runtime_seconds"),
                    "peak_gpu_memory_mib": metrics.get("peak_gpu_memory_mib"), "train_loss": metrics["train_loss"],
                    "mfu_percent": float(f"{mfu:.4g}") if mfu is not None else None})
        log_row(row)
        memory = row["peak_gpu_memory_mib"]
        rows.append([name, f"{tps:,.0f}", f"{memory:,.0f}" if memory is not None else "n/a",
                     f"{metrics['train_loss']:.3f}", f"{mfu:.1f}%" if mfu is not None else "n/a"])
    return rows


def pack(model: str, cutoff: int, template: str = "smollm"):
    WORK.mkdir(parents=True, exist_ok=True)
    aligned, packed = WORK / "gpu_aligned.arrow", WORK / "gpu_train.packed"
    measure_isolated([LMFORGE, "data", "align", shared("data/llamafactory/alpaca_en_demo.json"), "-o", aligned, "-q"])
    measure_isolated([LMFORGE, "data", "pack", aligned, "-m", model, "-t", template, "--cutoff", cutoff,
                      "--packing", "-o", packed, "-q"])
    return packed


SMOLLM2_SHAPE = ["--arch", "llama", "--layers", 30, "--hidden", 576, "--heads", 9, "--kv-heads", 3,
                 "--intermediate", 1536, "--max-position", 8192]
ONE_B_SHAPE = ["--arch", "llama", "--layers", 16, "--hidden", 2048, "--heads", 32, "--kv-heads", 8,
               "--intermediate", 8192, "--max-position", 4096]


def initialised(name: str, shape: list, tokenizer) -> tuple[str, int]:
    """`lmforge model init` of that shape with the tokenizer of `tokenizer`: (directory, parameters)."""
    out = WORK / name
    WORK.mkdir(parents=True, exist_ok=True)
    if not (out / "lmforge.json").exists():
        measure_isolated([LMFORGE, "model", "init", "-o", out, *shape, "--tokenizer", tokenizer, "--overwrite", "-q"])
    return str(out), int(json.loads((out / "lmforge.json").read_text())["parameters"])


def models() -> list[tuple[str, str, int]]:
    """(label, directory, parameters): SmolLM2-135M (its real weights when the GGUF is here), ~1B."""
    folder = shared("models/smollm2-135m-instruct")
    if folder is None:
        sys.exit("needs models/smollm2-135m-instruct (its tokenizer at least) under LMFORGE_SHARED")
    if (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").exists():
        smol = (f"SmolLM2-135M-Instruct ({PARAMS:,} parameters)", str(smollm2()), PARAMS)
    else:
        path, n = initialised("gpu_smollm2_shape", SMOLLM2_SHAPE, folder)
        smol = (f"SmolLM2-135M's shape, random weights (`model init`; {n:,} parameters)", path, n)
    path, n = initialised("gpu_1b", ONE_B_SHAPE, folder)
    return [smol, (f"~1B Llama (`model init`, Llama-3.2-1B's shape; {n:,} parameters)", path, n)]


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (run `make bench-gpu` on a GPU machine)")
    gpu = torch.cuda.get_device_name(0)
    peak = peak_tflops(gpu)
    rows_path().unlink(missing_ok=True)   # this run's rows only
    body = ""
    for label, model, params in models():
        rows = train_methods(model, pack(model, CUTOFF), STEPS, BATCH, peak, params, label=label)
        body += f"**{label}**\n\n" + table(["method", "tokens/s", "peak GPU memory MiB", "train loss", "MFU"], rows)
        body += "\n\n"
    body += (f"{gpu}; alpaca_en_demo packed to {CUTOFF} tokens, {STEPS} steps of {BATCH} rows. tokens/s and MFU: "
             f"steady state, steps {WARMUP + 1}-{STEPS} of each run (the first {WARMUP}, with CUDA and cuBLAS "
             f"warm-up, left out). MFU: 6N (full) or 4N (adapters) + 6·L·H·Q·T (causal attention) FLOPs per "
             f"token against {peak or 'unknown'} TFLOP/s dense bf16. Full fine-tuning: fp32 weights under bf16 "
             f"autocast. {versions('torch', 'transformers', 'peft', 'bitsandbytes', 'flash-attn')}.")
    record("gpu", "GPU: sft full / lora / qlora on SmolLM2-135M and a ~1B model", "make gpu-check (bench_gpu)", body)


if __name__ == "__main__":
    if sys.argv[1:2] == ["train"]:
        timed_train(sys.argv[2:])
    else:
        main()
