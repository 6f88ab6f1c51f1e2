"""`train sft --method lora` throughput and memory on SmolLM2-135M (goal >= 1.5x TRL's tokens/s,
faster than LLaMA-Factory, at no more peak memory).

Same data (alpaca_en_demo), model, LoRA (r 8, alpha 16, all linear layers), learning rate, cutoff
512, 2 sequences per step, no accumulation, 30 steps, fp32 on the CPU, gradient checkpointing on
(TRL's SFTConfig and LLaMA-Factory both turn it on by default), for:
- lmforge: `data pack --packing` then `train sft`;
- TRL SFTTrainer on the same conversations without packing (its default padding collator);
- LLaMA-Factory 0.9.5 (its own virtualenv) with packing, when `make lf-venv` has been run.
tokens/s = real (non-padding) tokens trained / the Trainer's train_runtime (start-up excluded);
peak memory = the whole process's max RSS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from common import (
    LMFORGE,
    ROOT,
    WORK,
    measure_isolated,
    record,
    shared,
    table,
    versions,
)

STEPS, CUTOFF, BATCH, LR = 30, 512, 2, 1e-4
LF_VENV = ROOT / ".bench" / "lf-venv"

TRL = r'''
import json, sys, time
import datasets, torch
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, data_path, out, steps, cutoff, batch, lr = sys.argv[1:8]
torch.manual_seed(0)
rows = datasets.Dataset.from_file(data_path)
def to_messages(r):
    return {"messages": [*r["prompt"], *r["response"]]}
ds = rows.map(to_messages, remove_columns=rows.column_names)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
args = SFTConfig(output_dir=out, max_length=int(cutoff), packing=False, per_device_train_batch_size=int(batch),
                 gradient_accumulation_steps=1, max_steps=int(steps), learning_rate=float(lr), logging_steps=5,
                 report_to="none", use_cpu=True, save_strategy="no", seed=42, disable_tqdm=True,
                 include_num_input_tokens_seen="non_padding", assistant_only_loss=False)
peft = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft)
result = trainer.train()
print(json.dumps({"tokens": trainer.state.num_input_tokens_seen, "runtime": result.metrics["train_runtime"],
                  "loss": result.training_loss}))
'''


def smollm2() -> Path:
    folder = shared("models/smollm2-135m-instruct")
    if folder is None:
        sys.exit("needs ../shared/models/smollm2-135m-instruct")
    target = WORK / "smollm2"
    if not (target / "model.safetensors").exists():
        subprocess.run([sys.executable, str(folder / "materialize.py"), str(target)], check=True, capture_output=True)
    return target


def ours(model: Path, aligned: Path) -> dict:
    packed = WORK / "train_packed.arrow"
    measure_isolated([LMFORGE, "data", "pack", aligned, "-m", model, "-t", "smollm", "--cutoff", CUTOFF,
                      "--packing", "-o", packed, "-q"])
    out = WORK / "train_lmforge"
    run = measure_isolated([LMFORGE, "train", "sft", "-m", model, "-d", packed, "-o", out, "--overwrite",
                            "--method", "lora", "--lora-rank", 8, "--lora-alpha", 16, "--max-steps", STEPS,
                            "--batch-size", BATCH, "--grad-accum", 1, "--lr", LR, "--logging-steps", 5,
                            "--gradient-checkpointing", "-q"])
    metrics = json.loads((out / "lmforge.json").read_text())["metrics"]
    return {"tokens": metrics["tokens"], "runtime": metrics["runtime_seconds"], "peak": run["peak_mib"],
            "wall": run["seconds"], "loss": metrics["train_loss"]}


def trl(model: Path, aligned: Path) -> dict:
    out = WORK / "train_trl"
    shutil.rmtree(out, ignore_errors=True)
    helper = ("import subprocess,sys,resource,json,time\nt=time.perf_counter()\n"
              "p=subprocess.run(sys.argv[1:], capture_output=True)\nw=time.perf_counter()-t\n"
              "print(p.stdout.decode().strip().splitlines()[-1] if p.returncode==0 else json.dumps({'error': p.stderr.decode()[-2000:]}))\n"
              "print(json.dumps({'peak': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024, 'wall': w}))")
    res = subprocess.run([sys.executable, "-c", helper, sys.executable, "-c", TRL, str(model), str(aligned), str(out),
                          str(STEPS), str(CUTOFF), str(BATCH), str(LR)], capture_output=True, timeout=3600)
    lines = res.stdout.decode().strip().splitlines()
    result, usage = json.loads(lines[-2]), json.loads(lines[-1])
    if "error" in result:
        raise RuntimeError(result["error"])
    return {**result, **usage}


def llamafactory(model: Path) -> dict | None:
    cli = LF_VENV / "bin" / "llamafactory-cli"
    if not cli.exists():
        return None
    import yaml

    work = WORK / "train_lf"
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    shutil.copy(shared("data/llamafactory/alpaca_en_demo.json"), work / "data" / "alpaca.json")
    (work / "data" / "dataset_info.json").write_text(json.dumps({"alpaca": {"file_name": "alpaca.json"}}))
    config = {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
              "lora_rank": 8, "lora_alpha": 16, "lora_target": "all", "dataset": "alpaca",
              "dataset_dir": str(work / "data"), "template": "smollm2", "cutoff_len": CUTOFF, "packing": True,
              "per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1, "max_steps": STEPS,
              "learning_rate": LR, "logging_steps": 5, "output_dir": str(work / "out"), "overwrite_output_dir": True,
              "report_to": "none", "save_strategy": "no", "use_cpu": True, "seed": 42,
              "include_num_input_tokens_seen": True, "preprocessing_num_workers": 1, "plot_loss": False}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    run = measure_isolated([cli, "train", work / "config.yaml"], cwd=work,
                           env={"HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "CUDA_VISIBLE_DEVICES": ""})
    results = json.loads((work / "out" / "all_results.json").read_text())
    state = json.loads((work / "out" / "trainer_state.json").read_text())
    return {"tokens": state.get("num_input_tokens_seen", 0), "runtime": results["train_runtime"],
            "peak": run["peak_mib"], "wall": run["seconds"], "loss": results.get("train_loss")}


def main() -> None:
    model = smollm2()
    WORK.mkdir(parents=True, exist_ok=True)
    aligned = WORK / "alpaca_aligned.arrow"
    measure_isolated([LMFORGE, "data", "align", shared("data/llamafactory/alpaca_en_demo.json"), "-o", aligned, "-q"])
    runs = {"lmforge train sft (lora, --packing)": ours(model, aligned),
            "TRL SFTTrainer (lora, no packing)": trl(model, aligned)}
    lf = llamafactory(model)
    if lf:
        runs["LLaMA-Factory 0.9.5 (lora, packing)"] = lf
    base = runs["lmforge train sft (lora, --packing)"]
    speed = base["tokens"] / base["runtime"]
    rows = []
    for name, r in runs.items():
        tps = r["tokens"] / r["runtime"]
        rows.append([name, f"{r['tokens']:,}", f"{r['runtime']:.1f}", f"{tps:,.0f}", f"{speed / tps:.2f}x",
                     f"{r['peak']:.0f}", f"{r['wall']:.0f}"])
    if not lf:
        rows.append(["LLaMA-Factory 0.9.5", "not run (`make lf-venv` first)", "", "", "", "", ""])
    body = table(["trainer", "tokens trained", "train s", "tokens/s", "lmforge speed-up", "peak MiB", "wall s"], rows)
    body += (f"\n\nSmolLM2-135M-Instruct, alpaca_en_demo, LoRA r 8 / alpha 16 on all linear layers, lr {LR}, "
             f"cutoff {CUTOFF}, {BATCH} sequences per step, {STEPS} steps, fp32 on the CPU, gradient checkpointing on "
             "for all three (the peers' default). Packed rows are full, so "
             "lmforge trains more tokens per step; tokens/s is the fair rate. "
             f"Versions (ours): {versions('torch', 'transformers', 'peft', 'trl')}.")
    record("train", "`train sft --method lora` on SmolLM2-135M: tokens/s and peak memory",
           "python tests/bench/bench_train.py", body)


if __name__ == "__main__":
    main()
