"""The GPU benchmark's commands, run on the CPU with a tiny model: `make bench-gpu` only runs where
CUDA exists, so this keeps its option lists in step with `lmforge train` everywhere else."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import run, shared_path

sys.path.insert(0, str(Path(__file__).parent / "bench"))


def in_this_process(cmd: list, allow_failure: bool = False, **kwargs) -> dict:
    """The benchmark's `measure_isolated`, with its `lmforge` command run in this process (the
    commands are what is checked here; a fresh process each cost ~10 s of imports)."""
    result = run([str(c) for c in cmd[1:]])
    stderr = result.stderr.decode()[-3000:]
    if result.returncode and not allow_failure:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{stderr}")
    return {"rc": result.returncode, "seconds": 0.0, "peak_mib": 0.0, "stderr": stderr}


@pytest.mark.slow  # three training runs
def test_gpu_benchmark_trains_every_method(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes", reason="the qlora row needs bitsandbytes")
    model = shared_path("models/stories260K")
    shared_path("data/llamafactory/alpaca_en_demo.json")
    import bench_gpu

    monkeypatch.setattr(bench_gpu, "WORK", tmp_path)
    monkeypatch.setattr(bench_gpu, "measure_isolated", in_this_process)
    rows = bench_gpu.train_methods(str(model), bench_gpu.pack(str(model), 64, "chatml"), steps=2, batch=2, peak=989.0)
    assert [r[0] for r in rows] == list(bench_gpu.METHODS)
    for name, tokens_per_second, _memory, loss, mfu in rows:
        assert not tokens_per_second.startswith("failed"), (name, tokens_per_second)
        assert float(tokens_per_second.replace(",", "")) > 0 and float(loss) > 0 and mfu.endswith("%")


def test_peak_tflops_from_the_gpu_name(monkeypatch):
    import bench_gpu

    monkeypatch.delenv("LMFORGE_PEAK_TFLOPS", raising=False)
    assert bench_gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench_gpu.peak_tflops("NVIDIA GeForce GTX 1080") is None
    monkeypatch.setenv("LMFORGE_PEAK_TFLOPS", "100")
    assert bench_gpu.peak_tflops("NVIDIA GeForce GTX 1080") == 100.0
