"""The GPU benchmark's and `make gpu-check`'s plumbing, on the CPU: `make bench-gpu` and
`make gpu-check` only run for real where CUDA exists, so this keeps their option lists in step
with `lmforge train`, and checks what decides their figures and their robustness: the steady-state
timing, the FLOPs counted, the GPU's peak, the rows written as they finish, the import preflight,
the wheel plan, and the process groups killed on a timeout."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run, shared_path

sys.path.insert(0, str(Path(__file__).parent / "bench"))

BENCH = Path(__file__).parent / "bench"


def in_this_process(cmd: list, allow_failure: bool = False, **kwargs) -> dict:
    """The benchmark's `measure_isolated`, with its `lmforge` command run in this process (the
    commands are what is checked here; a fresh process each cost ~10 s of imports). A timed
    training run (bench_gpu.train_command) runs under bench_gpu.timing, as its process would."""
    import bench_gpu

    words = [str(c) for c in cmd]
    if words[1:3] == [str(BENCH.resolve() / "bench_gpu.py"), "train"]:
        with bench_gpu.timing(Path(words[3])):
            result = run(["train", *words[4:]])
    else:
        result = run(words[1:])
    stderr = result.stderr.decode()[-3000:]
    if result.returncode and not allow_failure:
        raise RuntimeError(f"{' '.join(words)} failed ({result.returncode}):\n{stderr}")
    return {"rc": result.returncode, "seconds": 0.0, "peak_mib": 0.0, "stderr": stderr}


@pytest.mark.slow  # three training runs
def test_gpu_benchmark_trains_every_method(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes", reason="the qlora row needs bitsandbytes")
    model = shared_path("models/stories260K")
    shared_path("data/llamafactory/alpaca_en_demo.json")
    import bench_gpu
    from lmforge.shared.train import training

    precision = []
    default_builder = training.build_default_trainer

    def noting_precision(o, model, tokenizer, args, data, eval_data):
        precision.append(o.precision)
        return default_builder(o, model, tokenizer, args, data, eval_data)

    monkeypatch.setattr(training, "build_default_trainer", noting_precision)
    monkeypatch.setattr(bench_gpu, "WORK", tmp_path)
    monkeypatch.setattr(bench_gpu, "measure_isolated", in_this_process)
    monkeypatch.setenv("LMFORGE_BENCH_ROWS", str(tmp_path / "rows.jsonl"))
    rows = bench_gpu.train_methods(str(model), bench_gpu.pack(str(model), 64, "chatml"), steps=3, batch=2, peak=989.0,
                                   label="stories260K", warmup=1)
    assert [r[0] for r in rows] == list(bench_gpu.METHODS)
    for name, tokens_per_second, _memory, loss, mfu in rows:
        assert not tokens_per_second.startswith("failed"), (name, tokens_per_second)
        assert float(tokens_per_second.replace(",", "")) > 0 and float(loss) > 0 and mfu.endswith("%")
    logged = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["method"] for r in logged] == list(bench_gpu.METHODS)
    assert all(r["timed_steps"] == 2 and r["warmup_steps"] == 1 for r in logged), logged
    assert precision[0] == "bf16"   # full: --precision bf16 (fp32 masters under autocast on a GPU: test_models)


# ----------------------------------------------------------------------------- the figures

def test_peak_tflops_from_the_gpu_name(monkeypatch):
    import bench_gpu

    monkeypatch.delenv("LMFORGE_PEAK_TFLOPS", raising=False)
    names = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H200": 989.0, "NVIDIA H200 SXM": 989.0, "NVIDIA H200 NVL": 835.0,
             "NVIDIA H100 NVL": 835.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA GH200 480GB": 989.0,
             "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA L40S": 362.0, "NVIDIA L40": 181.0, "NVIDIA L4": 121.0,
             "NVIDIA GeForce GTX 1080": None}
    assert {name: bench_gpu.peak_tflops(name) for name in names} == names
    monkeypatch.setenv("LMFORGE_PEAK_TFLOPS", "100")
    assert bench_gpu.peak_tflops("NVIDIA GeForce GTX 1080") == 100.0
    for bad in ("0", "-5", "nan", "inf", "fast"):
        monkeypatch.setenv("LMFORGE_PEAK_TFLOPS", bad)
        with pytest.raises(SystemExit, match="LMFORGE_PEAK_TFLOPS"):
            bench_gpu.peak_tflops("NVIDIA H200")


def test_mfu_counts_causal_attention():
    """SmolLM2-135M at 1,024 tokens: the attention scores add about 13% to 6N."""
    import bench_gpu

    n, layers, heads, head_dim, seq = bench_gpu.PARAMS, 30, 9, 64, 1024
    full = bench_gpu.flops_per_token(n, layers, heads, head_dim, seq, weight_grads=True)
    assert full == 6 * n + 6 * layers * heads * head_dim * seq
    assert 1.12 < full / (6 * n) < 1.14
    adapter = bench_gpu.flops_per_token(n, layers, heads, head_dim, seq, weight_grads=False)
    assert adapter == 4 * n + 6 * layers * heads * head_dim * seq   # no weight gradients; attention the same
    assert bench_gpu.flops_per_token(n, layers, heads, head_dim, 2 * seq, True) - full == full - 6 * n


def test_attention_shape_from_the_config(tmp_path):
    import bench_gpu

    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 30, "num_attention_heads": 9,
                                                      "hidden_size": 576}))
    assert bench_gpu.attention_shape(tmp_path) == (30, 9, 64)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 4, "num_attention_heads": 8,
                                                                      "hidden_size": 512, "head_dim": 128}}))
    assert bench_gpu.attention_shape(tmp_path) == (4, 8, 128)


def test_steady_state_leaves_the_warm_up_out():
    import bench_gpu

    # a first step of 5 s (CUDA context, cuBLAS), then 0.1 s a step; 1,000 tokens each
    ends = [5.0 + 0.1 * i for i in range(10)]
    tokens = [1000] * 10
    steady = bench_gpu.steady_state(ends, tokens, warmup=1)
    assert steady["tokens_per_second"] == pytest.approx(10_000)
    assert steady["steps"] == 9 and steady["warmup_steps"] == 1 and steady["tokens"] == 9000
    assert 10_000 / 5.9 == pytest.approx(sum(tokens) / ends[-1])   # what the whole run would have said
    later = bench_gpu.steady_state(ends, tokens, warmup=3)
    assert later["tokens_per_second"] == pytest.approx(10_000) and later["steps"] == 7
    short = bench_gpu.steady_state([4.0, 4.5], [100, 100], warmup=5)   # one step is always kept
    assert short["steps"] == 1 and short["tokens_per_second"] == pytest.approx(200)
    assert bench_gpu.steady_state([2.0], [100], warmup=0)["tokens_per_second"] == pytest.approx(50)
    with pytest.raises(ValueError):
        bench_gpu.steady_state([1.0, 2.0], [100])
    with pytest.raises(ValueError):
        bench_gpu.steady_state([1.0, 1.0], [100, 100], warmup=1)


def test_timing_adds_the_step_timer_to_the_stages_trainer(tmp_path, monkeypatch):
    """bench_gpu.timing: the step timer on the trainer the stage builds, and lmforge's own
    builder lookup restored after."""
    import bench_gpu
    from lmforge.shared.train import hfstage

    class Collator:
        counts = [7]   # a batch collated before training began: not counted

    class Trainer:
        def __init__(self):
            self.callbacks: list = []

        def add_callback(self, callback):
            self.callbacks.append(callback)

    original = hfstage.builder_of
    monkeypatch.setattr(hfstage, "builder_of", lambda o: (lambda *a: (Trainer(), Collator())))
    patched = hfstage.builder_of
    times = tmp_path / "times.json"
    with bench_gpu.timing(times):
        trainer, _ = hfstage.builder_of(None)(None, None, None, type("A", (), {"gradient_accumulation_steps": 2})(),
                                              None, None)
    assert hfstage.builder_of is patched and patched is not original
    timer = trainer.callbacks[-1]
    timer.on_train_begin(None, None, None)
    Collator.counts = [7, 10, 20, 30, 40, 50]   # two batches a step (accumulation 2); the last read ahead
    for _ in range(2):
        time.sleep(0.01)
        timer.on_step_end(None, None, None)
    timer.on_train_end(None, None, None)
    recorded = json.loads(times.read_text())
    assert recorded["step_tokens"] == [30, 70]
    assert 0 < recorded["step_end_s"][0] < recorded["step_end_s"][1]


def _tiny_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "num_attention_heads": 2,
                                                    "hidden_size": 8}))
    return folder


def test_rows_are_logged_as_they_finish_and_survive_a_cut_run(tmp_path):
    """The benchmark cut in its second run (its step's budget spent): the first row is in the
    rows file, with the steady-state figures."""
    import gpu_check

    model, work, rows = _tiny_config(tmp_path / "model"), tmp_path / "work", tmp_path / "rows.jsonl"
    script = f"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, {str(BENCH)!r})
import bench_gpu
bench_gpu.WORK = Path({str(work)!r})
calls = []
def fake(cmd, allow_failure=False, **kwargs):
    calls.append(cmd)
    if len(calls) > 1:
        print("second run", flush=True)
        time.sleep(60)
    out = bench_gpu.WORK / "gpu_run"
    out.mkdir(parents=True, exist_ok=True)
    metrics = {{"train_loss": 1.5, "runtime_seconds": 9.0, "peak_gpu_memory_mib": 100.0}}
    (out / "lmforge.json").write_text(json.dumps({{"metrics": metrics}}))
    Path(cmd[3]).write_text(json.dumps({{"step_end_s": [3.0, 3.5, 4.0], "step_tokens": [64, 64, 64]}}))
    return {{"rc": 0, "stderr": ""}}
bench_gpu.measure_isolated = fake
bench_gpu.train_methods({str(model)!r}, "packed", 3, 2, 989.0, 1000, label="tiny", warmup=1)
"""
    lines: list[str] = []
    env = {**os.environ, "LMFORGE_BENCH_ROWS": str(rows)}
    started = time.monotonic()
    code = gpu_check.run_step([sys.executable, "-c", script], 6, env, lines.append, cwd=tmp_path)
    assert code == 124 and time.monotonic() - started < 30
    assert "second run\n" in lines
    logged = [json.loads(line) for line in rows.read_text().splitlines()]
    assert len(logged) == 1
    row = logged[0]
    assert row["model"] == "tiny" and row["method"].startswith("full")
    assert row["tokens_per_second"] == 128.0 and row["timed_steps"] == 2 and row["warmup_steps"] == 1
    assert row["peak_gpu_memory_mib"] == 100.0
    # 128 tokens/s x (6 x 1,000 + 6 x 2 layers x 2 heads x 4 x 32-token rows) FLOPs / 989 TFLOP/s
    assert row["mfu_percent"] == pytest.approx(100 * 128 * (6000 + 6 * 2 * 2 * 4 * 32) / 989e12, rel=1e-3)
    assert any(line.startswith("bench_gpu: {") for line in lines)   # printed too: the gpu-check log has it


def test_a_failed_run_is_a_row_not_an_abort(tmp_path, monkeypatch):
    import bench_gpu

    monkeypatch.setattr(bench_gpu, "WORK", tmp_path)
    monkeypatch.setenv("LMFORGE_BENCH_ROWS", str(tmp_path / "rows.jsonl"))
    monkeypatch.setattr(bench_gpu, "measure_isolated",
                        lambda cmd, allow_failure=False: {"rc": 1, "stderr": "Traceback...\nout of memory while training\n"})
    rows = bench_gpu.train_methods(str(_tiny_config(tmp_path / "model")), "packed", 3, 2, None, 1000, label="tiny")
    assert [r[1] for r in rows] == ["failed: out of memory while training"] * len(bench_gpu.METHODS)
    logged = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["failed"] for r in logged] == ["out of memory while training"] * len(bench_gpu.METHODS)


# ----------------------------------------------------------------------------- running lmforge

def test_lmforge_command_falls_back_to_the_module(tmp_path, monkeypatch):
    """Where pip put no `lmforge` script beside the Python (a system Python), the benchmarks run
    `python -m lmforge.tools.main`, as tests/conftest.py does."""
    import common

    assert common.lmforge_command(tmp_path) == [sys.executable, "-m", "lmforge.tools.main"]
    (tmp_path / "lmforge").write_text("#!/bin/sh\n")
    assert common.lmforge_command(tmp_path) == [str(tmp_path / "lmforge")]
    monkeypatch.setattr(common, "LMFORGE", "lmforge")
    monkeypatch.setattr(common, "LMFORGE_CMD", [sys.executable, "-m", "lmforge.tools.main"])
    assert common.command(["lmforge", "data", 3]) == [sys.executable, "-m", "lmforge.tools.main", "data", "3"]
    assert common.command(["python", "x"]) == ["python", "x"]
    result = common.measure_isolated(["lmforge", "--help"])
    assert result["rc"] == 0
    with pytest.raises(RuntimeError, match="could not run"):
        common.measure_isolated([str(tmp_path / "no-such-program")])


# ----------------------------------------------------------------------------- gpu_check: what travels

def _metadata(table: dict):
    from importlib.metadata import PackageNotFoundError

    def requires(name):
        key = name.replace("-", "_").lower()
        if key not in table:
            raise PackageNotFoundError(name)
        return table[key]
    return requires


FAKE = {"trl": ["datasets>=4.7", "pandas>=2.1", "accelerate>=1.10", "jinja2", "deepspeed>=0.18; extra == 'deepspeed'"],
        "datasets": ["pyarrow>=24.0.0", "xxhash", "dill<0.4.2,>=0.3.0", "multiprocess<0.70.20", "pandas",
                     "huggingface-hub>=1.31", "tomli; python_version < '3.11'"],
        "dill": [], "multiprocess": ["dill>=0.4.1"], "xxhash": [],
        "accelerate": ["torch>=2.0", "psutil"], "pandas": ["numpy>=1.26"],
        "typer": ["click>=8", "colorama; platform_system == 'Windows'"], "fastapi": ["starlette>=1.6", "anyio>=4"],
        "starlette": ["anyio>=3.6"], "huggingface_hub": ["httpx2>=2"], "httpx2": []}


def test_wheel_plan_carries_what_the_image_lacks_and_its_needs():
    import gpu_check

    image = {"pandas": None, "pyarrow": "23.0.1", "accelerate": "1.15.0", "torch": "2.11.0", "jinja2": None,
             "anyio": None, "huggingface_hub": "1.33.0", "typer": None}
    carried = gpu_check.plan(["trl>=1.0", "fastapi>=0.110", "typer>=0.16"], image, _metadata(FAKE))
    assert set(carried) == {"trl", "datasets", "dill", "multiprocess", "xxhash", "fastapi", "starlette", "pyarrow"}
    assert carried["pyarrow"] == "the GPU image has 23.0.1; needed: >=24.0.0 (datasets)"
    assert carried["dill"] == "not on the GPU image; needed by datasets, multiprocess"
    # the image's own needs are the image's: accelerate's torch/psutil, pandas's numpy are not walked
    found = gpu_check.walk(["trl>=1.0"], _metadata(FAKE), stop=set(image))
    assert "torch" not in found and "numpy" not in found and "tomli" not in found and "deepspeed" not in found
    assert "colorama" not in gpu_check.walk(["typer"], _metadata(FAKE))


def test_unmet_requirements_are_named():
    from importlib.metadata import PackageNotFoundError

    import gpu_check

    installed = {"trl": "1.16.0", "datasets": "5.2.0", "pyarrow": "23.0.1", "pandas": "3.0", "accelerate": "1.15.0",
                 "jinja2": "3.1", "xxhash": "3.0", "dill": "0.4.1", "multiprocess": "0.70.19",
                 "huggingface_hub": "1.33.0", "torch": "2.11.0+cu130", "psutil": "7.0", "numpy": "2.5.2"}

    def version(name):
        if name not in installed:
            raise PackageNotFoundError(name)
        return installed[name]

    found = gpu_check.walk(["trl>=1.0"], _metadata(FAKE))
    assert gpu_check.unmet(found, version) == ["httpx2 is not installed (needed by huggingface_hub)",
                                               "datasets needs pyarrow>=24.0.0; 23.0.1 is installed"]


def test_real_wheel_plan_covers_the_needs_of_what_it_carries():
    """With this environment's metadata: every need of a carried distribution is carried or on the
    GPU image, and the packages the GPU machine is known to lack are among those carried."""
    import gpu_check
    from packaging.requirements import Requirement

    carried = gpu_check.plan(gpu_check.roots())
    for must in ("trl", "datasets", "dill", "multiprocess", "bitsandbytes", "fastapi", "starlette", "uvicorn",
                 "pydantic", "pydantic_core", "openai"):
        assert must in carried, (must, carried)
    assert not {"torch", "transformers", "pandas", "pyarrow", "typer"} & set(carried)
    from importlib.metadata import requires

    for name in carried:
        for line in requires(name) or []:
            need = Requirement(line)
            if need.marker is None or need.marker.evaluate({**gpu_check.TARGET, "extra": ""}):
                assert gpu_check._norm(need.name) in set(carried) | set(gpu_check.IMAGE), (name, line)


def test_missing_wheels_are_those_absent_or_older_here(tmp_path):
    import gpu_check

    for name in ("pytest-1.0-py3-none-any.whl", "pytest-999.0-py3-none-any.whl",
                 "surely_not_installed_lmforge_probe-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    assert [w.name for w in gpu_check.missing(tmp_path)] == ["pytest-999.0-py3-none-any.whl",
                                                            "surely_not_installed_lmforge_probe-1.0-py3-none-any.whl"]


# ----------------------------------------------------------------------------- gpu_check: before and while running

def test_preflight_names_each_failing_import_and_why(tmp_path):
    import gpu_check

    (tmp_path / "broken_lmforge_probe.py").write_text("raise ImportError('datasets needs pyarrow >= 24')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    found = gpu_check.preflight(env, ["json", "surely_missing_lmforge_probe", "broken_lmforge_probe"])
    assert found["imports"] == 3
    assert found["failed"] == {
        "surely_missing_lmforge_probe": "ModuleNotFoundError: No module named 'surely_missing_lmforge_probe'",
        "broken_lmforge_probe": "ImportError: datasets needs pyarrow >= 24"}
    assert found["unmet"] == []   # this environment meets lmforge's requirements


def test_check_logs_the_preflight_before_running_anything(tmp_path, monkeypatch):
    import gpu_check

    steps: list[list[str]] = []
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(gpu_check, "install", lambda env, log: log("install: (skipped here)"))
    monkeypatch.setattr(gpu_check, "preflight", lambda env: {
        "imports": 2, "failed": {"datasets": "ModuleNotFoundError: No module named 'xxhash'"},
        "unmet": ["datasets needs pyarrow>=24.0.0; 23.0.1 is installed"]})

    def fake_step(cmd, budget, env, sink, cwd=ROOT):
        steps.append(cmd)
        sink(f"ran {cmd[-1]}\n")
        assert env["LMFORGE_BENCH_ROWS"] == str(tmp_path / "bench_gpu_rows.jsonl")
        return 0
    monkeypatch.setattr(gpu_check, "run_step", fake_step)
    assert gpu_check.check() == 0
    log = (tmp_path / "gpu-check.log").read_text().splitlines()
    failing = log.index("gpu-check: preflight: import datasets fails: ModuleNotFoundError: No module named 'xxhash'")
    unmet = log.index("gpu-check: preflight: unmet requirement: datasets needs pyarrow>=24.0.0; 23.0.1 is installed")
    first_step = next(i for i, line in enumerate(log) if line.startswith("gpu-check: $ "))
    assert failing < unmet < first_step and len(steps) == 2 and "ran bench_gpu" in log


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")   # a zombie has ended; only its parent's wait is left


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_step_past_its_budget_is_killed_with_its_children(tmp_path):
    import gpu_check

    child = ("import subprocess, os, time\n"
             "p = subprocess.Popen(['sleep', '60'])\n"
             "print(os.getpid(), p.pid, flush=True)\n"
             "time.sleep(60)\n")
    lines: list[str] = []
    started = time.monotonic()
    code = gpu_check.run_step([sys.executable, "-c", child], 2, dict(os.environ), lines.append, cwd=tmp_path)
    assert code == 124 and time.monotonic() - started < 30
    parent, grandchild = map(int, lines[0].split())
    assert _gone(parent) and _gone(grandchild)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_what_a_finished_step_leaves_running_is_killed(tmp_path):
    import gpu_check

    child = ("import subprocess\n"
             "p = subprocess.Popen(['sleep', '60'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
             "print(p.pid, flush=True)\n")
    lines: list[str] = []
    assert gpu_check.run_step([sys.executable, "-c", child], 60, dict(os.environ), lines.append, cwd=tmp_path) == 0
    assert _gone(int(lines[0]))
    assert gpu_check.run_step([sys.executable, "-c", "import sys; sys.exit(3)"], 60, dict(os.environ),
                              lines.append, cwd=tmp_path) == 3


def test_roots_name_what_lmforge_and_the_gpu_tests_import():
    import gpu_check

    names = {gpu_check._norm(r.split(">")[0].split("<")[0].split("=")[0]) for r in gpu_check.roots()}
    assert {"typer", "pyarrow", "trl", "datasets", "fastapi", "uvicorn", "bitsandbytes", "openai", "httpx"} <= names
    assert "deepspeed" not in names and "vllm" not in names
    mods = gpu_check.modules(gpu_check.roots())
    assert "yaml" in mods and "pyyaml" not in mods and "lmforge.tools.main" in mods and "trl.trainer.grpo_trainer" in mods


def test_full_tuning_in_half_precision_keeps_fp32_masters_on_a_gpu():
    """--precision bf16 (or fp16) with every weight training: fp32 weights on a GPU (the Trainer's
    autocast computes in half precision); adapters keep a half-precision base; a CPU has no
    autocast in lmforge's runs, so its weights stay as asked."""
    import torch
    from lmforge.shared.model.models import Device, weights_dtype

    assert weights_dtype(Device("cuda", "bf16", "sdpa"), masters=True) is torch.float32
    assert weights_dtype(Device("cuda", "fp16", "sdpa"), masters=True) is torch.float32
    assert weights_dtype(Device("cuda", "bf16", "sdpa"), masters=False) is torch.bfloat16
    assert weights_dtype(Device("cuda", "bf16", "sdpa"), masters=True, quantized=True) is torch.bfloat16
    assert weights_dtype(Device("cpu", "bf16", "sdpa"), masters=True) is torch.bfloat16
