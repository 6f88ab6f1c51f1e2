"""`--shift-attn` (S² attention) against plain attention at a long cutoff: peak memory and tokens/s.

    python tests/bench/bench_shiftattn.py [CUTOFF] [STEPS]     # default 16384 (2x SmolLM2's 8k context,
                                                               # linear RoPE scaling), 4 steps

SmolLM2-135M-Instruct (`materialize.py` makes the HF directory), LoRA r 8 on all linear layers,
gradient checkpointing, one packed row of CUTOFF tokens per step (`train pt` on synthetic text:
seeded random words), the same run with and without `--shift-attn`. A cutoff above the model's
8,192 positions turns on linear RoPE scaling (`--rope-scaling auto`), LongLoRA's setting.
tokens/s is the Trainer's (start-up excluded); peak memory is the process's max RSS, or the GPU's
peak allocation (lmforge.json) on CUDA.
"""

from __future__ import annotations

import json
import random
import sys

from bench_train import smollm2
from common import LMFORGE, WORK, measure_isolated, record, shared, table, versions

CUTOFF, STEPS = 16384, 4


def text_data(cutoff: int, steps: int):
    """Plain text enough for `steps` rows of `cutoff` tokens, aligned for `train pt`."""
    rng = random.Random(0)
    source = shared("data/llamafactory/alpaca_en_demo.json")
    words = [w for w in (source.read_text() if source else "the cat sat on the mat").split() if w.isalpha()]
    raw = WORK / f"s2_text_{cutoff}_{steps}.txt"
    lines = [" ".join(rng.choices(words, k=400)) for _ in range(max(4, cutoff * (steps + 1) // 300))]
    raw.write_text("\n".join(lines) + "\n")
    aligned = WORK / f"s2_text_{cutoff}_{steps}.arrow"
    measure_isolated([LMFORGE, "data", "align", raw, "--format", "text", "-o", aligned, "-q"])
    return aligned


def main() -> None:
    args = [a for a in sys.argv[1:] if a.isdigit()]
    cutoff = int(args[0]) if args else CUTOFF
    steps = int(args[1]) if len(args) > 1 else STEPS
    model = smollm2()
    WORK.mkdir(parents=True, exist_ok=True)
    aligned = text_data(cutoff, steps)
    packed = WORK / f"s2_packed_{cutoff}.arrow"
    measure_isolated([LMFORGE, "data", "pack", aligned, "-m", model, "--stage", "pt", "--cutoff", cutoff, "--packing",
                      "-o", packed, "-q"])
    rows, results = [], {}
    for name, extra in (("plain attention (sdpa)", []), ("--shift-attn (S², groups of cutoff/4)", ["--shift-attn"])):
        out = WORK / "s2_run"
        run = measure_isolated([LMFORGE, "train", "pt", "-m", model, "-d", packed, "-o", out, "--overwrite",
                                "--method", "lora", "--lora-rank", 8, "--max-steps", steps, "--batch-size", 1,
                                "--grad-accum", 1, "--logging-steps", 1, "--save-steps", 10**6,
                                "--gradient-checkpointing", *extra, "-q"])
        metrics = json.loads((out / "lmforge.json").read_text())["metrics"]
        results[name] = {"peak": metrics.get("peak_gpu_memory_mib") or run["peak_mib"],
                         "tps": metrics["tokens"] / metrics["runtime_seconds"], "loss": metrics["train_loss"],
                         "gpu": "peak_gpu_memory_mib" in metrics}
    base = results["plain attention (sdpa)"]
    for name, r in results.items():
        rows.append([name, f"{r['peak']:,.0f}", f"{r['peak'] / base['peak']:.2f}x", f"{r['tps']:,.0f}",
                     f"{r['tps'] / base['tps']:.2f}x", f"{r['loss']:.4f}"])
    where = "GPU peak allocated" if base["gpu"] else "process max RSS"
    body = table(["run", f"peak MiB ({where})", "vs plain", "tokens/s", "vs plain", "train loss"], rows)
    body += (f"\n\nSmolLM2-135M-Instruct, `train pt --method lora` (r 8, all linear layers), gradient checkpointing, "
             f"1 row of {cutoff:,} tokens per step, {steps} steps; "
             + ("linear RoPE scaling x" + f"{-(-cutoff // 8192)} (the model has 8,192 positions); "
                if cutoff > 8192 else "no RoPE scaling needed (the model has 8,192 positions); ")
             + f"synthetic text. {versions('torch', 'transformers', 'peft')}.")
    record("shiftattn", f"`--shift-attn` (S² attention) vs plain attention at cutoff {cutoff:,} (SmolLM2-135M)",
           f"python tests/bench/bench_shiftattn.py {cutoff} {steps}", body)


if __name__ == "__main__":
    main()
