"""GPU figures (`make bench-gpu`, on a machine with a CUDA GPU): tokens/s, peak GPU memory and model
FLOPs utilisation of `train sft` with full, LoRA and QLoRA (nf4) on SmolLM2-135M-Instruct and on a
~1B Llama made by `lmforge model init` (Llama-3.2-1B's shape: 16 layers, hidden 2048, 32 heads,
8 KV heads, MLP 8192) with SmolLM2's tokenizer. Where SmolLM2's weights cannot travel (the GPU
machine gets only its tokenizer and config: `make gpu-wheels`), a model of exactly its shape is
made by `model init` instead, which the table says: the speed and memory are the same, the loss is
a random model's.

Same data (alpaca_en_demo packed to 1024 tokens), 50 steps of 8 rows, bf16 where the GPU has it.
Peak memory is torch.cuda.max_memory_allocated() inside the training run (lmforge.json's
peak_gpu_memory_mib). MFU = tokens/s x FLOPs per token / the GPU's dense bf16 peak, with FLOPs
per token = 6 x parameters for full training and 4 x parameters for adapter methods (frozen
weights need no weight gradients); attention FLOPs are left out, as is usual. The peak comes
from the GPU's name (H100/H200/A100/L40S/L4) or LMFORGE_PEAK_TFLOPS.
On a machine without CUDA this benchmark skips, saying so."""

from __future__ import annotations

import json
import os
import sys

from bench_train import smollm2
from common import LMFORGE, WORK, measure_isolated, record, shared, table, versions

STEPS, CUTOFF, BATCH = 50, 1024, 8
PARAMS = 134_515_008  # SmolLM2-135M
METHODS = {
    "full": (["--method", "full", "--lr", "2e-5"], 6),
    "lora (r 8, all linear)": (["--method", "lora", "--lora-rank", "8", "--lora-target", "all", "--lr", "1e-4"], 4),
    "qlora (nf4, r 8, all linear)": (["--method", "lora", "--lora-rank", "8", "--lora-target", "all", "--quant", "4",
                                      "--lr", "1e-4"], 4),
}
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}  # dense bf16


def peak_tflops(name: str) -> float | None:
    if os.environ.get("LMFORGE_PEAK_TFLOPS"):
        return float(os.environ["LMFORGE_PEAK_TFLOPS"])
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def train_methods(model: str, packed, steps: int, batch: int, peak: float | None,
                  params: int = PARAMS) -> list[list[str]]:
    """One `train sft` per method on `packed`; a table row each (a failure is a row, not an abort)."""
    rows = []
    for name, (args, flops_per_param) in METHODS.items():
        out = WORK / "gpu_run"
        run = measure_isolated([LMFORGE, "train", "sft", "-m", model, "-d", packed, "-o", out, "--overwrite",
                                "--max-steps", steps, "--batch-size", batch, "--grad-accum", 1, "--save-steps", 10**6,
                                "--logging-steps", 10, *args, "-q"], allow_failure=True)
        if run["rc"] != 0:
            rows.append([name, "failed: " + (run["stderr"].strip().splitlines() or ["?"])[-1][:120], "", "", ""])
            continue
        metrics = json.loads((out / "lmforge.json").read_text())["metrics"]
        tps = metrics["tokens"] / metrics["runtime_seconds"]
        mfu = f"{100 * tps * flops_per_param * params / (peak * 1e12):.1f}%" if peak else "n/a"
        rows.append([name, f"{tps:,.0f}", f"{metrics.get('peak_gpu_memory_mib', float('nan')):,.0f}",
                     f"{metrics['train_loss']:.3f}", mfu])
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
    body = ""
    for label, model, params in models():
        rows = train_methods(model, pack(model, CUTOFF), STEPS, BATCH, peak, params)
        body += f"**{label}**\n\n" + table(["method", "tokens/s", "peak GPU memory MiB", "train loss", "MFU"], rows)
        body += "\n\n"
    body += (f"{gpu}; alpaca_en_demo packed to {CUTOFF} tokens, {STEPS} steps of {BATCH} rows. MFU against "
             f"{peak or 'unknown'} TFLOP/s dense bf16. "
             f"{versions('torch', 'transformers', 'peft', 'bitsandbytes', 'flash-attn')}.")
    record("gpu", "GPU: sft full / lora / qlora on SmolLM2-135M and a ~1B model", "make gpu-check (bench_gpu)", body)


if __name__ == "__main__":
    main()
