"""`train sft --method lora` throughput and memory on SmolLM2-135M, side by side with TRL's
SFTTrainer at its best and LLaMA-Factory 0.9.5 (goals: peak memory at or below LLaMA-Factory's,
tokens/s at least 1.3x its).

Same data (alpaca_en_demo), model, LoRA (r 8, alpha 16, all linear layers), learning rate, cutoff
512, 2 sequences of up to 512 tokens per step, no accumulation, the same precision, for:
- lmforge: `data pack --neat-packing` then `train sft`;
- TRL SFTTrainer at its best: its own packing (best-fit decreasing, padding-free rows);
- LLaMA-Factory 0.9.5 (its own virtualenv, `make lf-venv`) with neat packing;
so in all three each example attends only to itself. Each with gradient checkpointing on and off.
The runs are interleaved (lmforge, TRL, LLaMA-Factory, then again) because the machine is noisy,
and the table gives the median of REPEATS runs each.

Precision: LLaMA-Factory loads a model in the dtype its config names (`torch_dtype="auto"`), and
SmolLM2's is bf16, whatever the device; so `bf16` (the default) runs all three in bf16 mixed
precision: bf16 base weights, fp32 LoRA weights that the optimizer updates, the products in bf16
-- LLaMA-Factory with `bf16: true` and TRL with `bf16=True` (their autocast, which ran 1.1-1.3x
faster on this CPU than without), lmforge with `--precision bf16` (its fused LoRA path,
shared/train/lorafused.py). `fp32` runs all three in fp32 (LLaMA-Factory on a copy of the model
whose config says float32).

tokens/s = real (non-padding) tokens trained / the Trainer's train_runtime (start-up excluded):
lmforge and TRL count them themselves; LLaMA-Factory's own count includes its padding, so its
training step is wrapped to count the positions its attention mask keeps. Peak memory = the
whole process's max RSS.

    python tests/bench/bench_train.py [STEPS [REPEATS [bf16|fp32]]]      # defaults 10, 3, bf16
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

STEPS, CUTOFF, BATCH, LR = 10, 512, 2, 1e-4
REPEATS = 3
PRECISION = "bf16"
LF_VENV = ROOT / ".bench" / "lf-venv"

TRL = r'''
import json, sys, time
import datasets, torch
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, data_path, out, steps, cutoff, batch, lr, gc, precision = sys.argv[1:10]
torch.manual_seed(0)
rows = datasets.Dataset.from_file(data_path)
def to_messages(r):
    return {"messages": [*r["prompt"], *r["response"]]}
ds = rows.map(to_messages, remove_columns=rows.column_names)
tok = AutoTokenizer.from_pretrained(model_dir)
dtype = torch.bfloat16 if precision == "bf16" else torch.float32
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
# TRL at its best: its own packing (best-fit decreasing into padding-free rows of max_length)
args = SFTConfig(output_dir=out, max_length=int(cutoff), packing=True, per_device_train_batch_size=int(batch),
                 gradient_checkpointing=gc == "on",
                 gradient_accumulation_steps=1, max_steps=int(steps), learning_rate=float(lr), logging_steps=5,
                 report_to="none", use_cpu=True, bf16=precision == "bf16", fp16=False, save_strategy="no", seed=42, disable_tqdm=True,
                 include_num_input_tokens_seen="non_padding", assistant_only_loss=False)
peft = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft)
result = trainer.train()
print(json.dumps({"tokens": trainer.state.num_input_tokens_seen, "runtime": result.metrics["train_runtime"],
                  "loss": result.training_loss}))
'''

# LLaMA-Factory's run, its training step wrapped to count the real tokens of each batch: with
# neat packing its collator turns the attention mask into a 4D block-diagonal one in which a pad
# may not even attend to itself, so the real tokens are the allowed diagonal entries
LF_RUN = r'''
import json, sys, transformers, yaml
real = [0]
step = transformers.Trainer.training_step
def counted(self, model, inputs, *args, **kwargs):
    mask = inputs["attention_mask"]
    if mask.dim() == 4:
        diagonal = mask[:, 0].diagonal(dim1=-2, dim2=-1)
        real[0] += int((diagonal == 0).sum() if mask.is_floating_point() else diagonal.sum())
    else:
        real[0] += int((mask != 0).sum())
    return step(self, model, inputs, *args, **kwargs)
transformers.Trainer.training_step = counted
from llamafactory.train.tuner import run_exp
config = yaml.safe_load(open(sys.argv[1]))
run_exp(config)
json.dump({"real_tokens": real[0]}, open(sys.argv[2], "w"))
'''


def smollm2() -> Path:
    folder = shared("models/smollm2-135m-instruct")
    if folder is None:
        sys.exit("needs ../shared/models/smollm2-135m-instruct")
    target = WORK / "smollm2"
    if not (target / "model.safetensors").exists():
        subprocess.run([sys.executable, str(folder / "materialize.py"), str(target)], check=True, capture_output=True)
    return target


def fp32_copy(model: Path) -> Path:
    """The model with float32 in its config (LLaMA-Factory loads the config's dtype): links to the files."""
    target = WORK / "smollm2-fp32"
    target.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.name != "config.json" and not (target / f.name).exists():
            (target / f.name).symlink_to(f.resolve())
    config = json.loads((model / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "float32"
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


# lmforge's checkpointing choices beside the all-or-nothing of the others (--checkpointing,
# --checkpoint-every: shared/train/checkpointing.py)
OURS_GC = {"on": ["--gradient-checkpointing"], "off": ["--no-gradient-checkpointing"],
           "on, selective": ["--checkpointing", "selective"],
           "on, every 3rd layer": ["--gradient-checkpointing", "--checkpoint-every", 3]}


def ours(model: Path, aligned: Path, gc: str) -> dict:
    packed = WORK / "train_neat.arrow"
    if not packed.exists():
        measure_isolated([LMFORGE, "data", "pack", aligned, "-m", model, "-t", "smollm", "--cutoff", CUTOFF,
                          "--neat-packing", "-o", packed, "-q"])
    out = WORK / "train_lmforge"
    run = measure_isolated([LMFORGE, "train", "sft", "-m", model, "-d", packed, "-o", out, "--overwrite",
                            "--method", "lora", "--lora-rank", 8, "--lora-alpha", 16, "--max-steps", STEPS,
                            "--batch-size", BATCH, "--grad-accum", 1, "--lr", LR, "--logging-steps", 5,
                            "--precision", PRECISION,
                            *OURS_GC[gc], "-q"])
    metrics = json.loads((out / "lmforge.json").read_text())["metrics"]
    return {"tokens": metrics["tokens"], "runtime": metrics["runtime_seconds"], "peak": run["peak_mib"],
            "wall": run["seconds"], "loss": metrics["train_loss"]}


def trl(model: Path, aligned: Path, gc: str) -> dict:
    out = WORK / "train_trl"
    shutil.rmtree(out, ignore_errors=True)
    helper = ("import subprocess,sys,resource,json,time\nt=time.perf_counter()\n"
              "p=subprocess.run(sys.argv[1:], capture_output=True)\nw=time.perf_counter()-t\n"
              "print(p.stdout.decode().strip().splitlines()[-1] if p.returncode==0 else json.dumps({'error': p.stderr.decode()[-2000:]}))\n"
              "print(json.dumps({'peak': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024, 'wall': w}))")
    res = subprocess.run([sys.executable, "-c", helper, sys.executable, "-c", TRL, str(model), str(aligned), str(out),
                          str(STEPS), str(CUTOFF), str(BATCH), str(LR), gc, PRECISION],
                         capture_output=True,
                         timeout=3600)
    lines = res.stdout.decode().strip().splitlines()
    result, usage = json.loads(lines[-2]), json.loads(lines[-1])
    if "error" in result:
        raise RuntimeError(result["error"])
    return {**result, **usage}


def llamafactory(model: Path, gc: str) -> dict | None:
    python = LF_VENV / "bin" / "python"
    if not (LF_VENV / "bin" / "llamafactory-cli").exists():
        return None
    if PRECISION == "fp32":
        model = fp32_copy(model)
    import yaml

    work = WORK / "train_lf"
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    shutil.copy(shared("data/llamafactory/alpaca_en_demo.json"), work / "data" / "alpaca.json")
    (work / "data" / "dataset_info.json").write_text(json.dumps({"alpaca": {"file_name": "alpaca.json"}}))
    config = {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
              "lora_rank": 8, "lora_alpha": 16, "lora_target": "all", "dataset": "alpaca",
              "dataset_dir": str(work / "data"), "template": "smollm2", "cutoff_len": CUTOFF, "packing": True,
              "neat_packing": True,
              "per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1, "max_steps": STEPS,
              "learning_rate": LR, "logging_steps": 5, "output_dir": str(work / "out"), "overwrite_output_dir": True,
              "report_to": "none", "save_strategy": "no", "use_cpu": True, "seed": 42,
              "include_num_input_tokens_seen": True, "preprocessing_num_workers": 1, "plot_loss": False,
              "disable_gradient_checkpointing": gc == "off", "bf16": PRECISION == "bf16"}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    run = measure_isolated([python, "-c", LF_RUN, work / "config.yaml", work / "real.json"], cwd=work,
                           env={"HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "CUDA_VISIBLE_DEVICES": ""})
    results = json.loads((work / "out" / "all_results.json").read_text())
    real = json.loads((work / "real.json").read_text())["real_tokens"]
    return {"tokens": real, "runtime": results["train_runtime"],
            "peak": run["peak_mib"], "wall": run["seconds"], "loss": results.get("train_loss")}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    global STEPS, REPEATS, PRECISION
    numbers = [int(a) for a in sys.argv[1:] if a.isdigit()]   # (run.py passes benchmark names: ignored)
    STEPS = numbers[0] if numbers else STEPS
    REPEATS = numbers[1] if len(numbers) > 1 else REPEATS
    PRECISION = next((a for a in sys.argv[1:] if a in ("bf16", "fp32")), PRECISION)
    model = smollm2()
    WORK.mkdir(parents=True, exist_ok=True)
    aligned = WORK / "alpaca_aligned.arrow"
    measure_isolated([LMFORGE, "data", "align", shared("data/llamafactory/alpaca_en_demo.json"), "-o", aligned, "-q"])
    (WORK / "train_neat.arrow").unlink(missing_ok=True)
    have_lf = (LF_VENV / "bin" / "llamafactory-cli").exists()
    ours_name, lf_name = "lmforge train sft (--neat-packing)", "LLaMA-Factory 0.9.5 (neat_packing)"
    runners = [(ours_name, "on", lambda: ours(model, aligned, "on")),
               (ours_name, "on, selective", lambda: ours(model, aligned, "on, selective")),
               (ours_name, "on, every 3rd layer", lambda: ours(model, aligned, "on, every 3rd layer")),
               ("TRL SFTTrainer (packing, padding-free)", "on", lambda: trl(model, aligned, "on"))]
    if have_lf:
        runners.append((lf_name, "on", lambda: llamafactory(model, "on")))
    runners += [(ours_name, "off", lambda: ours(model, aligned, "off")),
                ("TRL SFTTrainer (packing, padding-free)", "off", lambda: trl(model, aligned, "off"))]
    if have_lf:
        runners.append((lf_name, "off", lambda: llamafactory(model, "off")))
    runs: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(REPEATS):          # interleaved: every configuration once, then again
        for name, gc, run in runners:
            result = run()
            runs.setdefault((name, gc), []).append(result)
            print(f"[{repeat + 1}/{REPEATS}] {name} gc={gc}: "
                  f"{result['tokens'] / result['runtime']:,.0f} tokens/s, {result['peak']:.0f} MiB",
                  file=sys.stderr, flush=True)
    rows = []
    for name, gc, _ in runners:
        lf_gc = "off" if gc == "off" else "on"   # each against LLaMA-Factory with or without its checkpointing
        lf_tps = _median([r["tokens"] / r["runtime"] for r in runs[(lf_name, lf_gc)]]) if have_lf else None
        lf_peak = _median([r["peak"] for r in runs[(lf_name, lf_gc)]]) if have_lf else None
        got = runs[(name, gc)]
        tps = _median([r["tokens"] / r["runtime"] for r in got])
        peak = _median([r["peak"] for r in got])
        loss = _median([r["loss"] for r in got if r.get("loss") is not None] or [float("nan")])
        rows.append([name, gc, f"{_median([r['tokens'] for r in got]):,.0f}",
                     f"{tps:,.0f}", f"{tps / lf_tps:.2f}x" if lf_tps else "", f"{peak:,.0f}",
                     f"{peak / lf_peak:.2f}x" if lf_peak else "", f"{loss:.3f}",
                     " / ".join(f"{r['tokens'] / r['runtime']:,.0f}" for r in got)])
    if not have_lf:
        rows.append(["LLaMA-Factory 0.9.5", "", "not run (`make lf-venv` first)", "", "", "", "", "", ""])
    body = table(["trainer", "grad. ckpt", "tokens trained", "tokens/s (median)", "vs LLaMA-Factory",
                  "peak MiB (median)", "vs LLaMA-Factory", "final loss", "tokens/s of each run"], rows)
    weights = ("bf16 mixed precision: bf16 base weights (the model's stored dtype, which LLaMA-Factory loads), "
               "fp32 LoRA weights, bf16 products (LLaMA-Factory bf16: true and TRL bf16=True: their autocast; "
               "lmforge --precision bf16: its fused LoRA path)" if PRECISION == "bf16" else "fp32 throughout")
    body += (f"\n\nSmolLM2-135M-Instruct, alpaca_en_demo, LoRA r 8 / alpha 16 on all linear layers, lr {LR}, "
             f"cutoff {CUTOFF}, {BATCH} packed rows per step, {STEPS} steps, on the CPU: {weights}; gradient "
             f"checkpointing on and off for each (lmforge also with --checkpointing selective and --checkpoint-every 3, against LLaMA-Factory's checkpointing of every layer); runs interleaved, median of {REPEATS} each. All three pack so that "
             "each example attends only to itself: lmforge --neat-packing, TRL its best-fit decreasing packing into "
             "padding-free rows (its recommended setting), LLaMA-Factory neat_packing. Each trainer's real "
             "(non-padding) tokens are counted; tokens/s is the fair rate. "
             f"Versions (ours): {versions('torch', 'transformers', 'peft', 'trl')}.")
    key = "train" if PRECISION == "bf16" else "train-fp32"
    record(key, f"`train sft --method lora` on SmolLM2-135M ({PRECISION}): lmforge, TRL at its best, LLaMA-Factory",
           f"python tests/bench/bench_train.py {STEPS} {REPEATS} {PRECISION}", body)

if __name__ == "__main__":
    main()
