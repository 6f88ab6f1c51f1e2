"""A table like the seed's Table 3 on SmolLM2-135M-Instruct, CPU: for full, freeze, GaLore, BAdam,
LoRA and QLoRA (int8 base; nf4 needs a GPU) - peak RSS, bytes of memory per model parameter,
tokens/s, and perplexity on held-out data after the same number of steps on the same data.

Memory per parameter is given two ways: the whole process's peak RSS / parameters, and the part
training adds over inference ((peak RSS of training - peak RSS of `eval perplexity` on the same
model with the same batch shape) / parameters), which is the closest CPU analogue of the seed's GPU figure."""

from __future__ import annotations

import json
import os

from bench_train import smollm2
from common import LMFORGE, WORK, measure_isolated, record, shared, table, versions

STEPS, CUTOFF, BATCH = 20, 512, 2
PARAMS = 134_515_008  # SmolLM2-135M
METHODS = {
    "full": ["--method", "full", "--lr", "2e-5"],
    "freeze (last 2 layers)": ["--method", "freeze", "--freeze-layers", "2", "--lr", "1e-4"],
    "galore (rank 16)": ["--method", "galore", "--galore-rank", "16", "--lr", "1e-4"],
    "badam (layer-wise)": ["--method", "badam", "--badam-switch-interval", "5", "--lr", "1e-4"],
    "lora (r 8)": ["--method", "lora", "--lora-rank", "8", "--lr", "1e-4"],
    "qlora (int8 base, r 8)": ["--method", "lora", "--lora-rank", "8", "--quant", "8", "--lr", "1e-4"],
}


def main() -> None:
    model = smollm2()
    WORK.mkdir(parents=True, exist_ok=True)
    aligned = WORK / "alpaca_aligned.arrow"
    measure_isolated([LMFORGE, "data", "align", shared("data/llamafactory/alpaca_en_demo.json"), "-o", aligned, "-q"])
    measure_isolated([LMFORGE, "data", "split", aligned, "--val-size", "64", "-o", WORK / "mem_split", "-q"])
    packed, val = WORK / "mem_train.packed", WORK / "mem_val.packed"
    for src, dst in ((WORK / "mem_split" / "train.arrow", packed), (WORK / "mem_split" / "val.arrow", val)):
        measure_isolated([LMFORGE, "data", "pack", src, "-m", model, "-t", "smollm", "--cutoff", CUTOFF,
                          "--packing", "-o", dst, "-q"])

    def perplexity(model_dir, adapter=None) -> tuple[float, float]:
        out = WORK / "mem_ppl.json"
        cmd = [LMFORGE, "eval", "perplexity", "-m", model_dir, "-d", val, "--batch-size", BATCH, "--json", "-q"]
        if adapter:
            cmd += ["--adapter", adapter]
        run = measure_isolated(["sh", "-c", " ".join(f"'{c}'" for c in cmd) + f" > '{out}'"])
        return json.loads(out.read_text())["perplexity"], run["peak_mib"]

    base_ppl, inference_peak = perplexity(model)
    rows = []
    for name, args in METHODS.items():
        out = WORK / "mem_run"
        run = measure_isolated([LMFORGE, "train", "sft", "-m", model, "-d", packed, "-o", out, "--overwrite",
                                "--max-steps", STEPS, "--batch-size", BATCH, "--grad-accum", 1, "--logging-steps", 5,
                                "--gradient-checkpointing", "--save-steps", 10**6, *args, "-q"], allow_failure=True)
        if run["rc"] != 0:
            rows.append([name, "failed: " + run["stderr"].strip().splitlines()[-1][:120], "", "", "", "", ""])
            continue
        metrics = json.loads((out / "lmforge.json").read_text())["metrics"]
        adapter = (out / "adapter_config.json").exists()
        ppl, _ = perplexity(model if adapter else out, out if adapter else None)
        peak = run["peak_mib"]
        rows.append([name, f"{peak:,.0f}", f"{peak * 2**20 / PARAMS:.1f}",
                     f"{(peak - inference_peak) * 2**20 / PARAMS:.2f}",
                     f"{metrics['tokens'] / metrics['runtime_seconds']:,.0f}", f"{metrics['train_loss']:.3f}",
                     f"{ppl:.2f}"])
    body = table(["method", "peak RSS MiB", "bytes/param (whole process)", "bytes/param over inference",
                  "tokens/s", "train loss", f"val perplexity (base {base_ppl:.2f})"], rows)
    body += (f"\n\nSmolLM2-135M-Instruct ({PARAMS:,} parameters), alpaca_en_demo packed to {CUTOFF} tokens, "
             f"{STEPS} steps of {BATCH} rows, gradient checkpointing, fp32 weights on the CPU "
             f"({os.cpu_count()} threads). Inference baseline (`eval perplexity` on the base model, same "
             f"{BATCH}-row batches): "
             f"{inference_peak:,.0f} MiB. The seed's 0.6 bytes/param for QLoRA is 4-bit weights on a GPU; "
             f"on the CPU only int8 is available (bitsandbytes), and fp32 activations dominate at this size. "
             f"{versions('torch', 'transformers', 'peft', 'bitsandbytes', 'galore-torch')}.")
    record("memory", "Memory per method (Table 3 analogue) on SmolLM2-135M, CPU",
           "python tests/bench/run.py bench_memory", body)


if __name__ == "__main__":
    main()
