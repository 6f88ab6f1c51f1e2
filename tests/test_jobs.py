"""`lmforge run`: job files run make-style on stories260K and the demo data (a second run skips
every step, a touched input reruns the steps that depend on it, changed options rerun their step),
the same job as a Makefile that `make` reads, bad job files refused with one line naming the step,
and LLaMA-Factory training YAMLs (written as its examples write them) translated, one run end to
end on LLaMA-Factory's own demo datasets."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, bad, ok, shared_path

from lmforge.shared.core import catalog, jobs
from lmforge.shared.core.errors import BadInput

STORIES = "models/stories260K"
TRAIN = {"max-steps": 2, "batch-size": 2, "grad-accum": 1, "lr": "1e-3", "logging-steps": 1}


def _write(path: Path, data: dict) -> Path:
    unshared = json.loads(json.dumps(data))   # a step used twice is written out twice, not as a YAML alias
    path.write_text(yaml.safe_dump(unshared, sort_keys=False), encoding="utf-8")
    return path


def _job(model: Path) -> dict:
    """align -> pack -> train sft -> eval perplexity, and a second branch: the held-out rows
    aligned and packed for the evaluation."""
    return {"steps": [
        {"name": "align", "command": "data align",
         "options": {"inputs": ["raw/tasks.jsonl"], "output": "work/tasks.arrow", "max-samples": 48}},
        {"name": "align eval", "command": "data align",
         "options": {"inputs": "raw/eval.jsonl", "output": "work/eval.arrow", "max_samples": 16}},
        {"name": "pack", "command": "lmforge data pack",
         "options": {"input": "work/tasks.arrow", "model": str(model), "template": "default", "cutoff": 64,
                     "output": "work/tasks.packed"}},
        {"name": "pack eval", "command": "data pack",   # keys in flag spellings
         "options": {"input": "work/eval.arrow", "--model": str(model), "template": "default", "cutoff": 64,
                     "output": "work/eval.packed"}},
        {"name": "sft", "command": "train sft",
         "options": {"model": str(model), "data": "work/tasks.packed", "output": "runs/sft", **TRAIN}},
        {"name": "perplexity", "command": "eval perplexity",
         "options": {"model": str(model), "adapter": "runs/sft", "data": "work/eval.packed"},
         "stdout": "runs/perplexity.json"},
    ]}


def _ran(stderr: bytes) -> list[str]:
    return re.findall(r"^run: \[\d+/\d+\] (.+?): runs \(", stderr.decode(), re.M)


def _touch(path: Path, root: Path) -> None:
    """`touch path`, with everything else under `root` moved 10 s into the past, so that the
    file system's time granularity cannot hide the change (and what runs next is newer still)."""
    for other in root.rglob("*"):
        if other.is_file() and not other.is_symlink() and other != path:
            stat = other.stat()
            os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10 * 10**9))
    now = time.time()
    os.utime(path, (now, now))


@pytest.fixture
def demo_job(tmp_path, monkeypatch):
    import demo

    model = shared_path(STORIES)
    monkeypatch.chdir(tmp_path)
    demo.write(tmp_path / "raw", rows=120)
    return _write(tmp_path / "job.yaml", _job(model))


def test_a_job_runs_then_skips_what_is_up_to_date_and_reruns_what_changed(demo_job, tmp_path):
    first = ok(["run", demo_job])
    assert _ran(first.stderr) == ["align", "align eval", "pack", "pack eval", "sft", "perplexity"]
    assert first.stdout == b""
    report = json.loads((tmp_path / "runs" / "perplexity.json").read_text())
    assert report["perplexity"] > 1 and report["adapter"] == "runs/sft"
    record = json.loads((tmp_path / "runs" / "sft" / "lmforge.json").read_text())
    assert record["kind"] == "adapter"
    made = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and "raw" not in p.parts}

    again = ok(["run", demo_job])
    assert _ran(again.stderr) == [] and "0 of 6 steps ran (all up to date)" in again.stderr.decode()
    assert {p: p.stat().st_mtime_ns for p in made} == made

    _touch(tmp_path / "raw" / "eval.jsonl", tmp_path)   # only the evaluation branch depends on it
    dry = ok(["run", demo_job, "--dry-run"]).stdout.decode()
    assert "align eval: runs (raw/eval.jsonl is newer than work/eval.arrow)" in dry
    assert "pack eval: runs (step 'align eval' is remade)" in dry and "sft: up to date" in dry
    assert "    lmforge eval perplexity --model=" in dry
    assert _ran(ok(["run", demo_job]).stderr) == ["align eval", "pack eval", "perplexity"]

    data = yaml.safe_load(demo_job.read_text())   # an option changed: its step and what depends on it
    data["steps"][4]["options"]["max-steps"] = 3
    _write(demo_job, data)
    assert _ran(ok(["run", demo_job]).stderr) == ["sft", "perplexity"]
    assert json.loads((tmp_path / "runs" / "sft" / "lmforge.json").read_text())["metrics"]["steps"] == 3
    assert _ran(ok(["run", demo_job, "--force"]).stderr) == ["align", "align eval", "pack", "pack eval", "sft",
                                                             "perplexity"]


def test_the_job_as_a_makefile_and_as_shell_commands(demo_job, tmp_path):
    makefile = ok(["run", demo_job, "--print", "make"]).stdout.decode()
    (tmp_path / "Makefile").write_text(makefile)
    assert "all: runs/perplexity.json" in makefile
    assert "runs/sft/lmforge.json: work/tasks.packed " in makefile
    assert "runs/perplexity.json: runs/sft/lmforge.json work/eval.packed " in makefile
    assert "--json > runs/perplexity.json.part && mv runs/perplexity.json.part runs/perplexity.json" in makefile
    shell = ok(["run", demo_job, "--print", "shell"]).stdout.decode()
    assert shell.count(" && \\\n  ") == 5 and "lmforge train sft --model=" in shell
    assert subprocess.run(["sh", "-n"], input=shell.encode(), capture_output=True).returncode == 0
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(["make", "-n"], cwd=tmp_path, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    commands = [line for line in dry.stdout.splitlines() if "lmforge " in line]
    assert len(commands) == 6 and commands[-1].startswith("mkdir -p runs && lmforge eval perplexity")
    ok(["run", demo_job])
    # what `lmforge run` made is what the Makefile would make: make finds it up to date
    assert subprocess.run(["make", "-q"], cwd=tmp_path).returncode == 0
    _touch(tmp_path / "raw" / "eval.jsonl", tmp_path)
    again = subprocess.run(["make", "-n"], cwd=tmp_path, capture_output=True, text=True).stdout
    assert [re.search(r"lmforge (\w+ \w+)", line).group(1) for line in again.splitlines() if "lmforge" in line] == \
        ["data align", "data pack", "eval perplexity"]


def test_a_failed_step_stops_the_job_naming_the_step(demo_job, tmp_path):
    data = yaml.safe_load(demo_job.read_text())
    data["steps"][2]["options"]["template"] = "no-such-template"
    _write(demo_job, data)
    line = bad(["run", demo_job])
    assert line.startswith("error: step 'pack' (data pack): unknown template 'no-such-template'"), line
    assert (tmp_path / "work" / "tasks.arrow").exists()   # what ran before it stays made
    assert not (tmp_path / "work" / "tasks.packed").exists() and not (tmp_path / "runs" / "sft").exists()


def test_the_python_api_runs_a_job(demo_job, tmp_path):
    from lmforge.shared import api

    data = yaml.safe_load(demo_job.read_text())
    data["steps"] = data["steps"][:1]
    _write(demo_job, data)
    assert api.jobs.run(job=demo_job) == ["align"]
    assert api.jobs.run(job=demo_job) == []
    with pytest.raises(BadInput, match="--force reruns steps"):
        api.jobs.run(job=demo_job, force=True, emit="yaml")


# ----------------------------------------------------------------------------- bad job files


def _bad_job(tmp_path: Path, steps, name: str = "job.yaml") -> str:
    _write(tmp_path / name, {"steps": steps})
    return bad(["run", name])


@pytest.fixture
def model():
    return str(shared_path(STORIES))


def test_bad_job_files_are_refused_with_one_line_naming_the_step(tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    align = {"name": "align", "command": "data align", "options": {"inputs": ["a.jsonl"], "output": "a.arrow"}}
    cases = {
        "step 1: no command": [{"options": {"inputs": ["a.jsonl"]}}],
        "step 'pack': 'data pak' is not a command a job can run; did you mean 'data pack'": [
            {"name": "pack", "command": "data pak", "options": {}}],
        "step 'serve': 'serve' is not a command a job can run; a job runs commands that make files": [
            {"command": "serve", "options": {"model": model}}],
        "step 'sft' (train sft): train sft has no option 'lrate'": [
            align, {"name": "sft", "command": "train sft", "options": {"model": model, "data": "a.arrow",
                                                                        "output": "o", "lrate": 1}}],
        "step 'sft' (train sft): train sft: 'data' must be given": [
            {"name": "sft", "command": "train sft", "options": {"model": model, "output": "o"}}],
        "step 'pack' (data pack): --cutoff 'many': expected a whole number": [
            align, {"name": "pack", "command": "data pack", "options": {"input": "a.arrow", "model": model,
                                                                          "cutoff": "many", "output": "p"}}],
        "step 'sft' (train sft): --learning-rate inf: must be a finite number": [
            {"name": "sft", "command": "train sft", "options": {"model": model, "data": "a.jsonl", "output": "o",
                                                                "lr": float("inf")}}],
        "step 'pack' (data pack): option 'model' is given twice": [
            {"name": "pack", "command": "data pack", "options": {"model": model, "--model": model}}],
        "step 'pack' (data pack): reads missing.arrow (--input), which no step makes and which does not exist": [
            {"name": "pack", "command": "data pack", "options": {"input": "missing.arrow", "model": model,
                                                                   "output": "p"}}],
        "step 'pack' (data pack): reads ./nowhere (--model), which no step makes": [
            align, {"name": "pack", "command": "data pack", "options": {"input": "a.arrow", "model": "./nowhere",
                                                                          "output": "p"}}],
        "step 'pack' (data pack): no output": [align, {"name": "pack", "command": "data pack",
                                                      "options": {"input": "a.arrow", "model": model}}],
        "step 'align' (data align): reads stdin ('-')": [
            {"name": "align", "command": "data align", "options": {"inputs": "-", "output": "x"}}],
        "step 'again': unknown key 'cutoff'": [align, {"name": "again", "command": "data pack", "cutoff": 3}],
        "step 'align 2' writes a.arrow, which step 'align' writes too": [align, {**align, "name": "align 2"}],
        "step 'align': two steps have this name": [align, align],
        "step 'stats': data pack prints no result to keep": [
            align, {"name": "stats", "command": "data pack", "stdout": "s.json",
                    "options": {"input": "a.arrow", "model": model, "output": "p"}}],
        "step 'a' depends on itself: a -> b -> a": [
            {"name": "a", "command": "data merge", "options": {"inputs": ["b.arrow"], "output": "a.arrow"}},
            {"name": "b", "command": "data merge", "options": {"inputs": ["a.arrow"], "output": "b.arrow"}}],
        "step 'self' depends on itself: self -> self": [
            {"name": "self", "command": "data merge", "options": {"inputs": ["s.arrow"], "output": "s.arrow"}}],
    }
    for expected, steps in cases.items():
        line = _bad_job(tmp_path, steps)
        assert line.startswith(f"error: job file job.yaml: {expected}"), (expected, line)
    assert "job file e.yaml: no steps" in _bad_job(tmp_path, [], "e.yaml")
    _write(tmp_path / "k.yaml", {"stages": []})
    assert "job file k.yaml: unknown key 'stages'" in bad(["run", "k.yaml"])
    assert "job file nope.yaml not found" in bad(["run", "nope.yaml"])
    assert "--dry-run and --print" in bad(["run", "nope.yaml", "-n", "--print", "make"])
    assert not list(tmp_path.glob("*.arrow"))   # refused before anything ran


def test_every_file_option_of_a_job_command_says_what_it_is():
    """Make-style skipping knows each step's inputs and outputs from FILES: an option naming a
    file that FILES leaves out would go unnoticed, so each one is listed."""
    filelike = {"model", "data", "input", "inputs", "output", "adapter", "adapters", "base", "reward", "sft",
                "eval_data", "calib", "tokenizer", "train_tokenizer", "mapping", "predictions", "dataset_info"}
    for command, roles in jobs.FILES.items():
        names = {o.name: o for o in catalog.options(command)}
        assert set(roles) <= set(names), (command, set(roles) - set(names))
        for name, opt in names.items():
            if opt.type == "path" or name in filelike:
                assert name in roles, f"{command} --{name}: add it to jobs.FILES"
    runnable = {c for c in catalog.COMMANDS if c not in ("serve", "chat", "board", "completion", "run",
                                                          "data show", "data templates")}
    assert set(jobs.FILES) == runnable


def test_keys_are_option_names_or_flag_spellings(tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.packed").write_text("")
    steps = [{"command": "train sft", "options": {"m": model}}]
    spelled = {"model": model, "--data": "d.packed", "output": "o", "lr": "5e-5", "learning-rate": None,
               "lora-rank": 4, "gradient_checkpointing": True, "report": "tensorboard"}
    del spelled["learning-rate"]
    job = jobs.make(Path("j.yaml"), {"steps": [{"command": "train sft", "options": spelled}]})
    o = job.steps[0].options
    assert (o.learning_rate, o.lora_rank, o.gradient_checkpointing, o.report) == (5e-5, 4, True, ["tensorboard"])
    assert o.overwrite is True and job.steps[0].inputs[0] == (model, None)
    assert "--learning-rate=5e-05" in job.steps[0].argv() and "--overwrite" in job.steps[0].argv()
    with pytest.raises(BadInput, match="has no option 'm'"):
        jobs.make(Path("j.yaml"), {"steps": steps})
    resumed = jobs.make(Path("j.yaml"), {"steps": [{"command": "train sft", "options": {**spelled, "resume": True}}]})
    assert "--overwrite" not in resumed.steps[0].argv()   # a resumed run continues, it is not replaced


# ----------------------------------------------------------------------------- LLaMA-Factory files

# LLaMA-Factory's examples (examples/train_lora/llama3_lora_sft.yaml, llama3_lora_dpo.yaml,
# llama3_lora_ppo.yaml, qwen3_lora_kto.yaml, qwen3_lora_pretrain.yaml, qwen3_lora_reward.yaml,
# train_full/llama3_full_sft.yaml, extras/galore, extras/badam), their keys as written there
COMMON = """
trust_remote_code: true
do_train: true
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""
EXAMPLES = {
    "llama3_lora_sft.yaml": """model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
stage: sft
finetuning_type: lora
lora_rank: 8
lora_target: all
dataset: identity,alpaca_en_demo
template: llama3
output_dir: saves/llama3-8b/lora/sft
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
""",
    "llama3_lora_dpo.yaml": """model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
stage: dpo
finetuning_type: lora
lora_rank: 8
lora_target: all
pref_beta: 0.1
pref_loss: sigmoid  # choices: [sigmoid (dpo), orpo, simpo]
dataset: dpo_en_demo
template: llama3
output_dir: saves/llama3-8b/lora/dpo
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 5.0e-6
""",
    "llama3_full_sft.yaml": """model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
stage: sft
finetuning_type: full
deepspeed: examples/deepspeed/ds_z3_config.json  # choices: [ds_z0_config.json, ds_z2_config.json, ds_z3_config.json]
dataset: identity,alpaca_en_demo
template: llama3
output_dir: saves/llama3-8b/full/sft
per_device_train_batch_size: 1
gradient_accumulation_steps: 2
learning_rate: 1.0e-5
""",
    "qwen3_lora_kto.yaml": """model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
stage: kto
finetuning_type: lora
lora_rank: 8
lora_target: all
pref_beta: 0.1
dataset: kto_en_demo
template: qwen3_nothink
output_dir: saves/qwen3-4b/lora/kto
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 5.0e-6
""",
    "qwen3_lora_pretrain.yaml": """model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
stage: pt
finetuning_type: lora
lora_rank: 8
lora_target: all
dataset: c4_demo
output_dir: saves/qwen3-4b/lora/pretrain
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
""",
    "qwen3_lora_reward.yaml": """model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
stage: rm
finetuning_type: lora
lora_rank: 8
lora_target: all
dataset: dpo_en_demo
template: qwen3_nothink
output_dir: saves/qwen3-4b/lora/reward
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
""",
    "llama3_lora_ppo.yaml": """model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
reward_model: saves/llama3-8b/lora/reward
stage: ppo
finetuning_type: lora
lora_rank: 8
lora_target: all
dataset: identity,alpaca_en_demo
template: llama3
output_dir: saves/llama3-8b/lora/ppo
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-5
max_new_tokens: 512
top_k: 0
top_p: 0.9
""",
    "llama3_galore_sft.yaml": """model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
stage: sft
finetuning_type: full
use_galore: true
galore_layerwise: true  # choices: [true, false], use false for DDP training
galore_target: all
galore_rank: 128
galore_scale: 2.0
dataset: identity,alpaca_en_demo
template: llama3
output_dir: saves/llama3-8b/full/sft
per_device_train_batch_size: 1
gradient_accumulation_steps: 1  # use 1 for layerwise galore
learning_rate: 1.0e-5
pure_bf16: true
""",
    "llama3_badam_sft.yaml": """model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
stage: sft
finetuning_type: full
use_badam: true
badam_mode: layer
badam_switch_mode: ascending
badam_switch_interval: 50
badam_verbose: 2
dataset: identity,alpaca_en_demo
template: llama3
output_dir: saves/llama3-8b/full/sft
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-5
""",
}


@pytest.fixture
def lf_dir(tmp_path, monkeypatch):
    """A directory as LLaMA-Factory's examples expect: data/ holds dataset_info.json."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(shared_path("data/llamafactory"), target_is_directory=True)
    return tmp_path


def _translated(path: Path) -> tuple[dict[str, dict], str]:
    result = ok(["run", "--from-llamafactory", path.name, "--print", "yaml"])   # run in its directory
    job = yaml.safe_load(result.stdout)
    return {s["name"]: s for s in job["steps"]}, result.stderr.decode()


def test_llamafactory_examples_translate_into_jobs(lf_dir):
    for name, text in EXAMPLES.items():
        (lf_dir / name).write_text(text + COMMON)
    steps, err = _translated(lf_dir / "llama3_lora_sft.yaml")
    assert list(steps) == ["align train", "pack", "train"]
    assert steps["align train"]["options"] == {"dataset_info": "data/dataset_info.json", "max_samples": 1000,
                                               "name": ["identity", "alpaca_en_demo"],
                                               "output": "saves/llama3-8b/lora/sft.data/train.arrow"}
    pack = steps["pack"]["options"]
    assert (pack["template"], pack["cutoff"], pack["stage"], pack["num_proc"]) == ("llama3", 2048, "sft", 16)
    train = steps["train"]
    assert train["command"] == "train sft" and train["options"]["output"] == "saves/llama3-8b/lora/sft"
    assert {k: train["options"][k] for k in ("method", "lora_rank", "lora_target", "learning_rate", "batch_size",
                                            "grad_accum", "epochs", "scheduler", "warmup", "precision",
                                            "gradient_checkpointing", "logging_steps", "save_steps")} == {
        "method": "lora", "lora_rank": 8, "lora_target": "all", "learning_rate": 1e-4, "batch_size": 1,
        "grad_accum": 8, "epochs": 3.0, "scheduler": "cosine", "warmup": 0.1, "precision": "bf16",
        "gradient_checkpointing": True, "logging_steps": 10, "save_steps": 500}
    assert "report" not in train["options"]
    warned = re.findall(r"^warning: llama3_lora_sft.yaml: (\w+) left out", err, re.M)
    assert warned == ["trust_remote_code", "dataloader_num_workers", "ddp_timeout"]

    steps, _ = _translated(lf_dir / "llama3_lora_dpo.yaml")
    dpo = steps["train"]["options"]
    assert steps["train"]["command"] == "train dpo" and steps["pack"]["options"]["stage"] == "dpo"
    assert (dpo["loss"], dpo["beta"], dpo["learning_rate"]) == ("sigmoid", 0.1, 5e-6)
    assert steps["align train"]["options"]["name"] == ["dpo_en_demo"]

    steps, err = _translated(lf_dir / "llama3_full_sft.yaml")
    full = steps["train"]["options"]
    assert (full["method"], full["deepspeed"], full["learning_rate"], full["grad_accum"]) == ("full", "z3", 1e-5, 2)
    assert "lora_rank" not in full and "read as lmforge's z3" in err

    steps, _ = _translated(lf_dir / "qwen3_lora_kto.yaml")
    assert steps["train"]["command"] == "train dpo" and steps["train"]["options"]["loss"] == "kto"
    assert steps["pack"]["options"]["stage"] == "kto" and steps["pack"]["options"]["template"] == "qwen3-nothink"

    steps, _ = _translated(lf_dir / "qwen3_lora_pretrain.yaml")
    assert steps["train"]["command"] == "train pt" and "template" not in steps["pack"]["options"]
    assert steps["pack"]["options"]["stage"] == "pt"

    steps, _ = _translated(lf_dir / "qwen3_lora_reward.yaml")
    assert steps["train"]["command"] == "train rm" and steps["pack"]["options"]["stage"] == "rm"

    (lf_dir / "saves/llama3-8b/lora/reward").mkdir(parents=True)   # stage rm made it
    steps, err = _translated(lf_dir / "llama3_lora_ppo.yaml")
    ppo = steps["train"]["options"]
    assert steps["train"]["command"] == "train ppo" and steps["pack"]["options"]["stage"] == "ppo"
    assert (ppo["reward"], ppo["batch_size"], ppo["mini_batch_size"], ppo["top_p"], ppo["max_new_tokens"]) == \
        ("saves/llama3-8b/lora/reward", 8, 1, 0.9, 512)
    assert "gradient_checkpointing" not in ppo
    assert "lr_scheduler_type left out: train ppo has no such setting" in err

    steps, err = _translated(lf_dir / "llama3_galore_sft.yaml")
    galore = steps["train"]["options"]
    assert (galore["method"], galore["galore_rank"], galore["galore_scale"], galore["precision"]) == \
        ("galore", 128, 2.0, "bf16")
    assert "galore_layerwise left out" in err and "pure_bf16 read as bf16" in err

    steps, err = _translated(lf_dir / "llama3_badam_sft.yaml")
    badam = steps["train"]["options"]
    assert (badam["method"], badam["badam_mode"], badam["badam_switch_interval"]) == ("badam", "ascending", 50)
    assert "badam_verbose left out: logging only" in err


def test_llamafactory_keys_that_change_meaning_are_refused_and_unknown_ones_named(lf_dir):
    base = EXAMPLES["llama3_lora_sft.yaml"] + COMMON
    (lf_dir / "x.yaml").write_text(base + "adapter_name_or_path: saves/old\nuse_llama_pro: true\nuse_apollo: false\n")
    line = bad(["run", "--from-llamafactory", "x.yaml"])
    assert line.startswith("error: x.yaml: LLaMA-Factory keys that lmforge cannot honour: adapter_name_or_path: "
                           "'saves/old': continuing an adapter"), line
    assert "use_llama_pro: True" in line and "use_apollo" not in line
    (lf_dir / "y.yaml").write_text(base + "my_own_key: 3\nlora_dropout: 0.05\npref_beta: 0.2\n")
    steps, err = _translated(lf_dir / "y.yaml")
    assert "warning: y.yaml: my_own_key left out: not a key lmforge knows" in err
    assert "warning: y.yaml: pref_beta left out: applies to stage dpo and kto" in err
    assert steps["train"]["options"]["lora_dropout"] == 0.05
    (lf_dir / "z.yaml").write_text(base.replace("dataset: identity,alpaca_en_demo", "dataset: identiti"))
    assert "data/dataset_info.json has no entry 'identiti'; did you mean 'identity'" in \
        bad(["run", "--from-llamafactory", "z.yaml"])
    (lf_dir / "t.yaml").write_text(base.replace("template: llama3", "template: gemma3"))
    steps, err = _translated(lf_dir / "t.yaml")
    assert steps["pack"]["options"]["template"] == "auto" and "template 'gemma3' left out" in err
    (lf_dir / "o.yaml").write_text(base.replace("finetuning_type: lora", "finetuning_type: oft"))
    assert "finetuning_type: 'oft'" in bad(["run", "--from-llamafactory", "o.yaml"])
    (lf_dir / "m.yaml").write_text(base + "mix_strategy: interleave_under\ninterleave_probs: 0.3,0.7\nval_size: 0.1\n")
    steps, _ = _translated(lf_dir / "m.yaml")
    assert list(steps) == ["align train identity", "align train alpaca_en_demo", "merge train", "split", "pack",
                           "pack eval", "train"]
    assert steps["merge train"]["options"]["mix"] == "interleave-under"
    assert steps["train"]["options"]["eval_data"].endswith("eval.packed")


def test_a_llamafactory_file_runs_end_to_end_on_its_demo_datasets(lf_dir):
    model = shared_path(STORIES)
    (lf_dir / "sft.yaml").write_text(f"""### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 4
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: default
cutoff_len: 64
max_samples: 12
val_size: 0.25

### output
output_dir: saves/stories/lora/sft
logging_steps: 1
overwrite_output_dir: true

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
learning_rate: 1.0e-3
max_steps: 2
disable_gradient_checkpointing: true
eval_steps: 1
""")
    first = ok(["run", "--from-llamafactory", "sft.yaml"])
    assert _ran(first.stderr) == ["align train", "split", "pack", "pack eval", "train"]
    record = json.loads((lf_dir / "saves/stories/lora/sft/lmforge.json").read_text())
    assert record["kind"] == "adapter"
    assert (lf_dir / "saves/stories/lora/sft.data/eval.packed").exists()
    assert _ran(ok(["run", "--from-llamafactory", "sft.yaml"]).stderr) == []
    (lf_dir / "job.yaml").write_bytes(ok(["run", "--from-llamafactory", "sft.yaml", "--print", "yaml"]).stdout)
    assert "# trust_remote_code left out" in (lf_dir / "job.yaml").read_text()
    # the kept translation is the same job: its steps' outputs are up to date
    assert "align train: up to date" in ok(["run", "job.yaml", "--dry-run"]).stdout.decode()


# ----------------------------------------------------------------------------- the guide


GUIDE = ROOT / "docs" / "guides" / "job-files.md"


def test_the_guide_names_every_key_the_translation_knows():
    from lmforge.shared.api import llamafactory as lf
    from lmforge.shared.data.templates import TEMPLATES

    text = GUIDE.read_text(encoding="utf-8")
    for key in (*lf.MAPPED, *lf.SAME, *lf.IGNORED, *lf.REFUSED):
        assert re.search(rf"`{key}[`:]", text), f"docs/guides/job-files.md does not name {key}"
    for lf_name, ours in lf.TEMPLATES.items():
        assert ours in TEMPLATES and f"| `{lf_name}` " in text
    assert all(name in TEMPLATES for name in lf.TEMPLATE_SAME)


def test_the_guides_example_is_what_the_translation_prints(lf_dir):
    text = GUIDE.read_text(encoding="utf-8")
    example = re.search(r"examples/train_lora/llama3_lora_sft.yaml.*?```yaml\n(.*?)```.*?this\nbecomes\n\n(.*?)\n\n",
                        text, re.S)
    (lf_dir / "llama3_lora_sft.yaml").write_text(example.group(1))
    shell = ok(["run", "--from-llamafactory", "llama3_lora_sft.yaml", "--print", "shell"]).stdout.decode()
    printed = [re.sub(r"^(mkdir -p \S+ && )", "", line.strip().rstrip(" \\").removesuffix(" &&"))
               for line in shell.splitlines()[1:]]
    assert printed == [line.strip() for line in example.group(2).splitlines()]
