"""`train dpo --method lora` memory and speed on SmolLM2-135M, side by side with LLaMA-Factory 0.9.5
(the reference pass can double a DPO run's cost); with `kto`, the KTO loss on kto_en_demo
(LLaMA-Factory's stage kto), where a step also scores each prompt with a neighbour's answer (the KL
rows) under the policy and the reference.

Both train a LoRA adapter (r 8, alpha 16, all linear layers) with the sigmoid loss, beta 0.1, on
dpo_en_demo, cutoff 512, 2 pairs per step, the reference being the base model with the adapter
switched off (no second copy of the weights), bf16 base weights (the dtype LLaMA-Factory loads
SmolLM2 in) and fp32 adapters: lmforge `--precision bf16` (bf16 products, its fused LoRA path),
LLaMA-Factory both with `bf16: true` (its autocast) and without, the ratios against the faster of
the two; gradient checkpointing on and off. Runs interleaved, the median
of REPEATS each. pairs/s = pairs trained / the Trainer's train_runtime; peak = the process's max
RSS. With no LLaMA-Factory virtualenv (`make lf-venv`) only lmforge runs.

    python tests/bench/bench_dpo.py [STEPS [REPEATS]] [kto]     # defaults 6 and 2, the sigmoid loss
"""

from __future__ import annotations

import json
import shutil
import sys

from bench_train import LF_VENV, _median, smollm2
from common import LMFORGE, WORK, measure_isolated, record, shared, table, versions

STEPS, REPEATS, CUTOFF, BATCH, LR = 6, 2, 512, 2, 5e-6
LOSS = "sigmoid"   # or kto
DATA = {"sigmoid": "dpo_en_demo", "kto": "kto_en_demo"}


def ours(model, packed, gc: bool) -> dict:
    out = WORK / "dpo_lmforge"
    run = measure_isolated([LMFORGE, "train", "dpo", "-m", model, "-d", packed, "-o", out, "--overwrite",
                            "--method", "lora", "--lora-rank", 8, "--lora-alpha", 16, "--loss", LOSS,
                            "--beta", 0.1, "--max-steps", STEPS, "--batch-size", BATCH, "--grad-accum", 1,
                            "--lr", LR, "--precision", "bf16",
                            "--gradient-checkpointing" if gc else "--no-gradient-checkpointing", "-q"])
    metrics = json.loads((out / "lmforge.json").read_text())["metrics"]
    return {"runtime": metrics["runtime_seconds"], "peak": run["peak_mib"], "loss": metrics.get("train_loss")}


def llamafactory(model, gc: bool, bf16: bool = True) -> dict | None:
    if not (LF_VENV / "bin" / "llamafactory-cli").exists():
        return None
    import yaml

    work = WORK / "dpo_lf"
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    shutil.copy(shared(f"data/llamafactory/{DATA[LOSS]}.json"), work / "data" / "dpo.json")
    info = json.loads(shared("data/llamafactory/dataset_info.json").read_text())[DATA[LOSS]]
    (work / "data" / "dataset_info.json").write_text(json.dumps({"dpo": {**info, "file_name": "dpo.json"}}))
    config = {"model_name_or_path": str(model), "stage": "kto" if LOSS == "kto" else "dpo", "do_train": True,
              "finetuning_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_target": "all", "pref_beta": 0.1,
              **({} if LOSS == "kto" else {"pref_loss": "sigmoid"}),
              "dataset": "dpo", "dataset_dir": str(work / "data"), "template": "smollm2", "cutoff_len": CUTOFF,
              "per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1, "max_steps": STEPS,
              "learning_rate": LR, "logging_steps": 5, "output_dir": str(work / "out"), "overwrite_output_dir": True,
              "report_to": "none", "save_strategy": "no", "use_cpu": True, "seed": 42,
              "preprocessing_num_workers": 1, "plot_loss": False, "disable_gradient_checkpointing": not gc,
              "bf16": bf16}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    run = measure_isolated([LF_VENV / "bin" / "llamafactory-cli", "train", work / "config.yaml"], cwd=work,
                           env={"HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "CUDA_VISIBLE_DEVICES": ""})
    results = json.loads((work / "out" / "all_results.json").read_text())
    return {"runtime": results["train_runtime"], "peak": run["peak_mib"], "loss": results.get("train_loss")}


def main() -> None:
    global STEPS, REPEATS, LOSS
    LOSS = "kto" if "kto" in sys.argv[1:] else "sigmoid"
    numbers = [int(a) for a in sys.argv[1:] if a.isdigit()]   # (run.py passes benchmark names: ignored)
    STEPS = numbers[0] if numbers else STEPS
    REPEATS = numbers[1] if len(numbers) > 1 else REPEATS
    model = smollm2()
    WORK.mkdir(parents=True, exist_ok=True)
    aligned, packed = WORK / "dpo_aligned.arrow", WORK / "dpo_packed.arrow"
    measure_isolated([LMFORGE, "data", "align", shared(f"data/llamafactory/{DATA[LOSS]}.json"), "-o", aligned, "-q"])
    measure_isolated([LMFORGE, "data", "pack", aligned, "-m", model, "-t", "smollm", "--stage",
                      "kto" if LOSS == "kto" else "dpo",
                      "--cutoff", CUTOFF, "-o", packed, "-q"])
    ours_name = f"lmforge train dpo{' --loss kto' if LOSS == 'kto' else ''}"
    stage = "kto" if LOSS == "kto" else "dpo"
    lfs = [f"LLaMA-Factory 0.9.5 (stage {stage}, bf16: true)", f"LLaMA-Factory 0.9.5 (stage {stage}, no autocast)"]
    tools = {ours_name: lambda gc: ours(model, packed, gc)}
    if (LF_VENV / "bin" / "llamafactory-cli").exists():
        tools[lfs[0]] = lambda gc: llamafactory(model, gc, bf16=True)
        tools[lfs[1]] = lambda gc: llamafactory(model, gc, bf16=False)
    runs: dict[tuple[str, bool], list[dict]] = {}
    for repeat in range(REPEATS):
        for gc in (True, False):
            for name, fn in tools.items():
                result = fn(gc)
                runs.setdefault((name, gc), []).append(result)
                print(f"[{repeat + 1}/{REPEATS}] {name} gc={'on' if gc else 'off'}: {STEPS * BATCH / result['runtime']:.2f}"
                      f" {'answers' if LOSS == 'kto' else 'pairs'}/s, {result['peak']:.0f} MiB", file=sys.stderr,
                      flush=True)
    rows = []
    for gc in (True, False):
        # the baseline: LLaMA-Factory's faster setting (its autocast, or none: fp32 adapter products)
        measured = [runs[(lf, gc)] for lf in lfs if (lf, gc) in runs]
        base = max(measured, key=lambda got: _median([STEPS * BATCH / r["runtime"] for r in got]), default=None)
        lf_rate = _median([STEPS * BATCH / r["runtime"] for r in base]) if base else None
        lf_peak = _median([r["peak"] for r in base]) if base else None
        for name in tools:
            got = runs[(name, gc)]
            rate = _median([STEPS * BATCH / r["runtime"] for r in got])
            peak = _median([r["peak"] for r in got])
            rows.append([name, "on" if gc else "off", f"{rate:.3f}", f"{rate / lf_rate:.2f}x" if lf_rate else "",
                         f"{peak:,.0f}", f"{peak / lf_peak:.2f}x" if lf_peak else "",
                         " / ".join(f"{r['peak']:,.0f}" for r in got)])
    unit = "answers" if LOSS == "kto" else "pairs"
    body = table(["trainer", "grad. ckpt", f"{unit}/s (median)", "vs LLaMA-Factory's faster", "peak MiB (median)",
                  "vs the same", "peak of each run"], rows)
    body += (f"\n\nSmolLM2-135M-Instruct, {DATA[LOSS]}, LoRA r 8 / alpha 16 on all linear layers, {LOSS} loss, "
             f"beta 0.1, lr {LR}, cutoff {CUTOFF}, {BATCH} {unit} per step, {STEPS} steps, on the CPU with bf16 base weights and fp32 "
             "adapters: lmforge --precision bf16 (bf16 products, its fused LoRA path), LLaMA-Factory both with bf16: true "
             "(its autocast: bf16 products) and without (fp32 adapter products), the ratios against the faster of the two; "
             "the reference is the base with the adapter off in both; runs interleaved, median of "
             f"{REPEATS}. Versions (ours): {versions('torch', 'transformers', 'peft', 'trl')}.")
    if LOSS == "kto":
        record("kto-memory", "`train dpo --loss kto --method lora` on SmolLM2-135M: memory and speed against "
               "LLaMA-Factory", f"python tests/bench/bench_dpo.py {STEPS} {REPEATS} kto", body)
    else:
        record("dpo-memory", "`train dpo --method lora` on SmolLM2-135M: memory and speed against LLaMA-Factory",
               f"python tests/bench/bench_dpo.py {STEPS} {REPEATS}", body)


if __name__ == "__main__":
    main()
