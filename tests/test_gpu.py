"""Every CUDA-only path of lmforge, run for real on a CUDA GPU (`make gpu-check`; marker `gpu`).

Without CUDA the `gpu` tests skip, saying why. What pure logic decides about CUDA (the dtype by
compute capability, the attention kernel, the optimizer names) is tested here on the CPU too,
with the real capability numbers of the GPUs people train on. The inventory in the README
("CUDA-only paths") names the test for each path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import ROOT, ok, shared_path

sys.path.insert(0, str(Path(__file__).parent / "bench"))

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none here): run `make gpu-check` on one")
STORIES = "models/stories260K"
FAST = ["--batch-size", "4", "--grad-accum", "1", "--logging-steps", "2", "--save-steps", "1000"]

# (compute capability, the GPUs that have it, --precision auto, flash-attention 2 possible)
GPUS = [((7, 0), "V100", "fp16", False), ((7, 5), "T4", "fp16", False), ((8, 0), "A100", "bf16", True),
        ((8, 6), "A10/RTX 3090", "bf16", True), ((8, 9), "L4/L40S", "bf16", True),
        ((9, 0), "H100/H200", "bf16", True), ((10, 0), "B200", "bf16", True)]


# ----------------------------------------------------------------------------- pure logic, on the CPU

@pytest.mark.parametrize("capability, name, dtype, _flash", GPUS, ids=[g[1] for g in GPUS])
def test_auto_precision_by_compute_capability(capability, name, dtype, _flash):
    from lmforge.shared.model.models import dtype_for

    assert dtype_for("cuda", capability) == dtype
    assert dtype_for("cpu") == "fp32" and dtype_for("mps") == "fp16"


@pytest.mark.parametrize("capability, name, dtype, flash", GPUS, ids=[g[1] for g in GPUS])
def test_flash_attention_needs_ampere_and_half_precision(capability, name, dtype, flash):
    from lmforge.shared.model.models import flash_attention_fits

    assert flash_attention_fits("cuda", dtype, capability) is flash
    assert not flash_attention_fits("cuda", "fp32", capability)
    assert not flash_attention_fits("cpu", dtype, None)


def test_auto_attention_on_cuda_gpus(monkeypatch):
    """--attn auto as a CUDA machine sees it: flash-attention 2 where installed and the GPU has it,
    else sdpa; eager for architectures with neither (gemma2)."""
    from lmforge.shared.model import models
    from transformers import Gemma2Config, LlamaConfig

    llama, gemma2 = LlamaConfig(), Gemma2Config()
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))   # as if installed
    monkeypatch.setattr(models, "_cuda_capability", lambda: (9, 0))
    assert models.attention_for(llama, "auto", "cuda", "bf16") == "flash_attention_2"
    assert models.attention_for(llama, "auto", "cuda", "fp32") == "sdpa"
    assert models.attention_for(gemma2, "auto", "cuda", "bf16") in ("flash_attention_2", "eager")
    monkeypatch.setattr(models, "_cuda_capability", lambda: (7, 5))   # a T4: no flash-attention kernel
    assert models.attention_for(llama, "auto", "cuda", "fp16") == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", None)   # not installed: import fails
    monkeypatch.setattr(models, "_cuda_capability", lambda: (9, 0))
    assert models.attention_for(llama, "auto", "cuda", "bf16") == "sdpa"
    assert models.attention_for(gemma2, "auto", "cuda", "bf16") == "eager"


def test_8bit_and_paged_optimizer_names():
    pytest.importorskip("bitsandbytes", reason="8-bit optimizers need bitsandbytes")
    from lmforge.shared.train.optimizers import optimizer_name

    assert optimizer_name("adamw8bit", "full") == "adamw_bnb_8bit"
    assert optimizer_name("paged_adamw8bit", "lora") == "paged_adamw_8bit"
    assert optimizer_name("adamw8bit", "galore") == "galore_adamw_8bit"


def test_gpu_check_plans_what_to_install(tmp_path):
    import gpu_check

    for name in ("pytest-9.0-py3-none-any.whl", "surely_not_installed_lmforge_probe-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    assert [w.name.split("-")[0] for w in gpu_check.missing(tmp_path)] == ["surely_not_installed_lmforge_probe"]
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("pydantic_core==2.50.5\ntrl==1.16.0\n")
    assert gpu_check.pinned(["trl", "pydantic-core", "flash-attn"], constraints) == [
        "trl==1.16.0", "pydantic-core==2.50.5", "flash-attn"]


@pytest.mark.slow   # about 25 s: pytest and the benchmark in fresh processes
@pytest.mark.skipif(CUDA, reason="checks the skipping, which happens only without CUDA")
def test_gpu_check_skips_cleanly_without_cuda(tmp_path):
    """`make gpu-check` on this CPU machine: it runs through, the gpu tests skip with the reason,
    the benchmark says it needs CUDA, one log is written."""
    env = {**os.environ, "OUT": str(tmp_path), "LMFORGE_BENCH_DIR": str(tmp_path / "bench")}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_check.py"), "check"], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "gpu-check.log").read_text()
    assert "no CUDA GPU" in log and "needs a CUDA GPU (none here)" in log
    assert " failed" not in log and "error" not in log.lower(), log[-3000:]
    assert "bench_gpu: skipped: needs a CUDA GPU" in log


# ----------------------------------------------------------------------------- on a CUDA GPU

@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The demo task aligned and packed for stories260K."""
    import demo

    base = shared_path(STORIES)
    work = tmp_path_factory.mktemp("gputask")
    demo.write(work / "raw", rows=400)
    ok(["data", "align", work / "raw" / "tasks.jsonl", "-o", work / "aligned.arrow"])
    ok(["data", "pack", work / "aligned.arrow", "-m", base, "-t", "default", "--cutoff", "128", "-o",
        work / "train.packed"])
    return {"base": base, "train": work / "train.packed", "dir": work}


def _train(task, out: Path, *args: str) -> dict:
    ok(["train", "sft", "-m", task["base"], "-d", task["train"], "-o", out, *FAST, *args], fresh=True)
    return json.loads((out / "lmforge.json").read_text())


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "trainer_log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _launch(nproc: int, args: list) -> subprocess.CompletedProcess:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
           "-m", "lmforge.tools.main", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.gpu
@needs_cuda
def test_cuda_device_precision_and_attention():
    from lmforge.shared.model.models import choose_device, dtype_for, load_model

    device = choose_device()
    assert device.kind == "cuda"
    assert device.dtype_name == dtype_for("cuda", torch.cuda.get_device_capability())
    model = load_model(str(shared_path(STORIES)), device, for_training=False)
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == device.dtype
    try:
        import flash_attn  # noqa: F401

        expected = "flash_attention_2" if torch.cuda.get_device_capability()[0] >= 8 else "sdpa"
    except ImportError:
        expected = "sdpa"
    assert model.config._attn_implementation == expected == device.attn


@pytest.mark.gpu
@needs_cuda
def test_sft_full_on_gpu_loss_falls_peak_memory_reported_and_loads(task, tmp_path):
    from lmforge.shared.model.models import dtype_for, load_for_inference

    out = tmp_path / "full"
    record = _train(task, out, "--method", "full", "--max-steps", "30", "--lr", "2e-3")
    losses = _losses(out)
    assert losses[-1] < losses[0] * 0.9, losses
    assert record["device"]["kind"] == "cuda"
    assert record["hyperparameters"]["precision"] == dtype_for("cuda", torch.cuda.get_device_capability())
    assert record["metrics"]["peak_gpu_memory_mib"] > 0
    model, tokenizer = load_for_inference(str(out), None)
    assert next(model.parameters()).device.type == "cuda"
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids.cuda()
    assert model.generate(ids, max_new_tokens=8, do_sample=False).shape[1] > ids.shape[1]


@pytest.mark.gpu
@needs_cuda
def test_lora_merged_on_gpu_equals_the_adapter_in_bf16(task, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    _train(task, out, "--method", "lora", "--max-steps", "12", "--lr", "1e-2")
    merged = tmp_path / "merged"
    ok(["adapter", "merge", task["base"], out, "-o", merged, "--dtype", "bf16"])
    x = torch.tensor([[1, 60, 70, 80, 90, 100, 200, 300]], device="cuda")

    def load(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).cuda().eval()

    with torch.no_grad():
        adapted = PeftModel.from_pretrained(load(task["base"]), str(out)).eval()(x).logits.float()
        folded = load(merged)(x).logits.float()
        plain = load(task["base"])(x).logits.float()
    scale = max(1.0, float(adapted.abs().max()))
    gap = float((adapted - folded).abs().max())
    assert gap <= scale * 2 ** -5, (gap, scale)          # a few bf16 roundings (2^-8 each) of the logits' size
    assert float((plain - folded).abs().max()) > 2 * gap  # and the adapter did something


@pytest.mark.gpu
@needs_cuda
def test_qlora_nf4_weights_are_4bit_on_the_gpu_and_train(task, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    import bitsandbytes as bnb
    from lmforge.shared.model.models import choose_device, load_model

    model = load_model(str(task["base"]), choose_device(), quant=4)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for layer in layers:
        assert layer.weight.device.type == "cuda" and layer.weight.dtype == torch.uint8
        assert layer.weight.quant_state.quant_type == "nf4"
        assert layer.weight.numel() * 2 == layer.in_features * layer.out_features   # two weights a byte
    out = tmp_path / "qlora"
    record = _train(task, out, "--method", "lora", "--quant", "4", "--max-steps", "20", "--lr", "1e-2")
    losses = _losses(out)
    assert losses[-1] < losses[0], losses
    assert record["hyperparameters"]["quant"] == 4 and record["metrics"]["peak_gpu_memory_mib"] > 0
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.gpu
@needs_cuda
def test_int8_loading_trains_an_adapter_on_gpu(task, tmp_path):
    pytest.importorskip("bitsandbytes", reason="8-bit loading needs bitsandbytes")
    out = tmp_path / "int8"
    record = _train(task, out, "--method", "lora", "--quant", "8", "--max-steps", "6", "--lr", "1e-2")
    assert record["hyperparameters"]["quant"] == 8 and (out / "adapter_model.safetensors").exists()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("optim", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_and_paged_optimizers_on_gpu(task, tmp_path, optim):
    pytest.importorskip("bitsandbytes", reason="8-bit optimizers need bitsandbytes")
    out = tmp_path / optim
    record = _train(task, out, "--method", "full", "--optim", optim, "--max-steps", "20", "--lr", "2e-3")
    losses = _losses(out)
    assert losses[-1] < losses[0] * 0.9, losses
    assert record["hyperparameters"]["optim"] == optim


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("zero, method", [("z2", "lora"), ("z3", "full")])
def test_deepspeed_zero_on_gpu(task, tmp_path, zero, method):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (PyPI has only its source; it cannot be "
                                            "carried as a wheel)")
    out = tmp_path / zero
    result = _launch(1, ["train", "sft", "-m", task["base"], "-d", task["train"], "-o", out, "--deepspeed", zero,
                         "--method", method, "--max-steps", "6", *FAST])
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    record = json.loads((out / "lmforge.json").read_text())
    assert record["hyperparameters"]["deepspeed"] == zero and record["device"]["kind"] == "cuda"


@pytest.mark.gpu
@needs_cuda
def test_fsdp_on_gpu(task, tmp_path):
    out = tmp_path / "fsdp"
    nproc = min(2, torch.cuda.device_count())
    result = _launch(nproc, ["train", "sft", "-m", task["base"], "-d", task["train"], "-o", out, "--fsdp", "full",
                             "--method", "full", "--max-steps", "6", "--lr", "2e-3", *FAST])
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))   # whole weights, not shards
    assert sum(p.numel() for p in model.parameters()) == 260_032
    record = json.loads((out / "lmforge.json").read_text())
    assert record["hyperparameters"]["fsdp"] == "full" and record["device"]["kind"] == "cuda"


@pytest.mark.gpu
@needs_cuda
def test_fsdp_lora_on_two_gpus_merges_exactly(task, tmp_path):
    """FSDP2 over nccl (bf16 compute from fp32 adapters), its sharded checkpoint, and the merge of the
    gathered adapter: exactly what PEFT's own merge of that adapter gives."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs ({torch.cuda.device_count()} here)")
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    result = _launch(2, ["train", "sft", "-m", task["base"], "-d", task["train"], "-o", out, "--fsdp", "full",
                         "--method", "lora", "--max-steps", "4", "--lr", "1e-2", "--precision", "bf16",
                         "--keep-checkpoints", *FAST[:4], "--logging-steps", "1", "--save-steps", "2"])
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    marker = json.loads((out / "checkpoints" / "checkpoint-2" / "lmforge_sharded.json").read_text())
    assert marker["world_size"] == 2 and marker["fsdp"] == "full"
    merged = tmp_path / "merged"
    ok(["adapter", "merge", task["base"], out, "-o", merged])
    base = AutoModelForCausalLM.from_pretrained(str(task["base"]), dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, str(out)).merge_and_unload().state_dict()
    got = {k: v for f in merged.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert got and set(got) <= set(expected)
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name].to(tensor.dtype)), name


@pytest.mark.gpu
@needs_cuda
def test_multi_gpu_ddp_launch(task, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs ({torch.cuda.device_count()} here)")
    out = tmp_path / "ddp"
    result = _launch(2, ["train", "sft", "-m", task["base"], "-d", task["train"], "-o", out, "--max-steps", "4",
                         *FAST])
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    record = json.loads((out / "lmforge.json").read_text())
    assert record["hyperparameters"]["world_size"] == 2 and record["metrics"]["peak_gpu_memory_mib"] > 0


@pytest.mark.gpu
@needs_cuda
def test_flash_attention_2_trains_on_gpu(task, tmp_path):
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (a CUDA build; it cannot be carried)")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("flash-attention 2 needs compute capability >= 8.0")
    record = _train(task, tmp_path / "fa2", "--method", "lora", "--attn", "flash_attention_2", "--max-steps", "4")
    assert record["device"]["attention"] == "flash_attention_2"


@pytest.mark.gpu
@needs_cuda
def test_serve_answers_on_gpu():
    pytest.importorskip("fastapi", reason="serve needs fastapi")
    from test_serve import Server

    s = Server("-m", str(shared_path(STORIES)), "--template", "default")
    try:
        r = s.client().chat.completions.create(model="stories260K", messages=[{"role": "user", "content": "Once"}],
                                               max_tokens=8, temperature=0)
        assert r.usage.completion_tokens == 8 and r.choices[0].message.content
    finally:
        s.stop()


@pytest.mark.gpu
@needs_cuda
def test_gpu_benchmark_reports_peak_memory_and_mfu(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes", reason="the qlora row needs bitsandbytes")
    import bench_gpu

    model = shared_path(STORIES)
    shared_path("data/llamafactory/alpaca_en_demo.json")
    monkeypatch.setattr(bench_gpu, "WORK", tmp_path)
    rows = bench_gpu.train_methods(str(model), bench_gpu.pack(str(model), 64, "chatml"), steps=3, batch=2, peak=989.0,
                                   params=260_032)
    for name, tokens_per_second, memory, _loss, mfu in rows:
        assert not tokens_per_second.startswith("failed"), (name, tokens_per_second)
        assert float(memory.replace(",", "")) > 0 and mfu.endswith("%"), (name, memory, mfu)



@pytest.fixture(scope="module")
def prompts(task):
    """The demo task's prompts packed for GRPO (stage ppo)."""
    packed = task["dir"] / "ppo.packed"
    if not packed.exists():
        ok(["data", "pack", task["dir"] / "aligned.arrow", "-m", task["base"], "-t", "default", "-s", "ppo",
            "--cutoff", "64", "-o", packed])
    return packed


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_grpo_generates_on_gpu(task, prompts, tmp_path, engine):
    pytest.importorskip("trl", reason="grpo needs trl")
    extra = []
    if engine == "vllm":
        pytest.importorskip("vllm", reason="vllm is not installed (a CUDA build; it cannot be carried)")
        extra = ["--vllm"]
    out = tmp_path / engine
    ok(["train", "grpo", "-m", task["base"], "-d", prompts, "-o", out, "--max-steps", "2", "--reward", "exact",
        "--num-generations", "4", "--batch-size", "4", "--max-new-tokens", "8", *extra], fresh=True)
    record = json.loads((out / "lmforge.json").read_text())
    assert record["metrics"]["steps"] == 2 and record["device"]["kind"] == "cuda"
    assert record["metrics"]["peak_gpu_memory_mib"] > 0


# ----------------------------------------------------------------------------- --kernels, --shift-attn

@pytest.mark.gpu
@needs_cuda
def test_liger_kernels_train_on_gpu(task, tmp_path):
    """Liger's kernels patched into the model (its RMSNorm modules, fused linear cross-entropy in
    place of the chunked loss): the loss falls, the adapter loads."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (pip install liger-kernel)")
    from lmforge.shared.model.models import choose_device, load_model
    from lmforge.shared.train.patches import kernels

    model = load_model(str(task["base"]), choose_device())
    kernels.apply_liger(model)
    assert any("Liger" in type(m).__name__ for m in model.modules())
    out = tmp_path / "liger"
    record = _train(task, out, "--method", "lora", "--kernels", "liger", "--max-steps", "20", "--lr", "1e-2")
    losses = _losses(out)
    assert losses[-1] < losses[0], losses
    assert record["hyperparameters"]["kernels"] == "liger" and (out / "adapter_model.safetensors").exists()


@pytest.mark.gpu
@needs_cuda
def test_unsloth_lora_trains_on_gpu(task, tmp_path):
    pytest.importorskip("unsloth", reason="unsloth is not installed (pip install unsloth)")
    out = tmp_path / "unsloth"
    record = _train(task, out, "--method", "lora", "--kernels", "unsloth", "--max-steps", "20", "--lr", "1e-2")
    losses = _losses(out)
    assert losses[-1] < losses[0], losses
    assert record["hyperparameters"]["kernels"] == "unsloth" and (out / "adapter_config.json").exists()


@pytest.mark.gpu
@needs_cuda
def test_shift_attn_trains_on_gpu(task, tmp_path):
    record = _train(task, tmp_path / "s2", "--method", "lora", "--shift-attn", "--max-steps", "6")
    assert record["hyperparameters"]["shift_attn"] is True and record["device"]["attention"] == "sdpa"


@pytest.mark.gpu
@needs_cuda
def test_selective_checkpointing_trains_on_gpu(task, tmp_path):
    """Selective checkpointing on CUDA (the fused LoRA path under the Trainer's autocast to the base's
    dtype, the attention kernels' outputs kept): the loss falls."""
    out = tmp_path / "selective"
    record = _train(task, out, "--method", "lora", "--checkpointing", "selective", "--checkpoint-every", "2",
                    "--max-steps", "20", "--lr", "1e-2")
    losses = _losses(out)
    assert losses[-1] < losses[0], losses
    assert record["hyperparameters"]["checkpointing"] == "selective"
