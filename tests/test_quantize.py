"""`model quantize`, `model init`, QLoRA, LoRA on GPTQ weights, GaLore, BAdam, 8-bit AdamW."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl, bad, ok, run, shared_path

STORIES = "models/stories260K"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Project data (the demo corpus and tasks), a tiny model with kernel-friendly widths, and
    packed training rows for stories260K and the tiny model."""
    import demo

    work = tmp_path_factory.mktemp("quant")
    demo.write(work / "raw", rows=300)
    ok(["data", "align", work / "raw" / "corpus.jsonl", "-o", work / "corpus.arrow"])
    ok(["data", "align", work / "raw" / "tasks.jsonl", "-o", work / "tasks.arrow"])
    tiny = work / "tiny"
    ok(["model", "init", "-o", tiny, "--layers", "2", "--hidden", "64", "--heads", "4", "--intermediate", "128",
        "--train-tokenizer", work / "tasks.arrow", "--vocab-size", "512"])
    stories = shared_path(STORIES)
    for name, model, template in (("stories", stories, "default"), ("tiny", tiny, "chatml")):
        ok(["data", "pack", work / "tasks.arrow", "-m", model, "-t", template, "--cutoff", "128", "--packing",
            "-o", work / f"{name}.packed"])
    return {"dir": work, "stories": stories, "tiny": tiny, "corpus": work / "corpus.arrow"}


def _losses(directory):
    return [json.loads(line)["loss"] for line in (directory / "trainer_log.jsonl").read_text().splitlines()
            if '"loss"' in line]


def _generates(model_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), device_map="cpu")
    out = model.generate(torch.tensor([[1, 20, 30]]), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 3


def test_int8_quantization_keeps_perplexity(data, tmp_path):
    out = tmp_path / "int8"
    result = ok(["model", "quantize", data["stories"], "-o", out, "--method", "bnb-int8", "--eval-data",
                 data["corpus"], "--eval-samples", "32"])
    assert result.stdout.decode() == f"{out}\n"
    record = json.loads((out / "lmforge.json").read_text())
    assert record["method"] == "quantize-bnb-int8" and record["bits"] == 8
    assert abs(record["perplexity"]["change"]) < 0.03  # within a few percent of the original
    err = result.stderr.decode()
    assert "perplexity before" in err and "perplexity after" in err
    _generates(out)


def test_int8_needs_no_data(data, tmp_path):
    """bitsandbytes needs no calibration: without --eval-data the model is quantized, unmeasured."""
    out = tmp_path / "int8"
    result = ok(["model", "quantize", data["stories"], "-o", out, "--method", "bnb-int8"])
    record = json.loads((out / "lmforge.json").read_text())
    assert record["bits"] == 8 and record["perplexity"] is None
    assert "without measuring perplexity" in result.stderr.decode()
    _generates(out)


def test_nf4_and_gptq_quantize_load_and_generate(data, tmp_path):
    nf4 = tmp_path / "nf4"
    ok(["model", "quantize", data["tiny"], "-o", nf4, "--method", "bnb-nf4", "--eval-data", data["corpus"],
        "--eval-samples", "16"])
    assert json.loads((nf4 / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    _generates(nf4)
    pytest.importorskip("gptqmodel")
    gptq = tmp_path / "gptq"
    ok(["model", "quantize", data["tiny"], "-o", gptq, "--method", "gptq", "--calib", data["corpus"],
        "--calib-samples", "32", "--eval-samples", "16", "--group-size", "32"])
    record = json.loads((gptq / "lmforge.json").read_text())
    assert record["bits"] == 4 and record["calibration"]["rows"] == 32
    assert json.loads((gptq / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    _generates(gptq)
    # LoRA trains on the GPTQ weights, and the adapter reloads on them
    lora = tmp_path / "gptq-lora"
    ok(["train", "sft", "-m", gptq, "-d", data["dir"] / "tiny.packed", "-o", lora, "--max-steps", "8",
        "--lr", "1e-2", "--batch-size", "4", "--grad-accum", "1", "--logging-steps", "1"])
    losses = _losses(lora)
    assert losses[-1] < losses[0]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(gptq), device_map="cpu"), str(lora))
    assert "adapters only" in bad(["train", "sft", "-m", gptq, "-d", data["dir"] / "tiny.packed", "-o",
                                   tmp_path / "x", "--method", "full"])
    assert "quantized weights" in bad(["adapter", "merge", gptq, lora, "-o", tmp_path / "m"])


@pytest.mark.parametrize("method, extra", [
    ("lora", ["--quant", "8", "--lr", "5e-3"]),
    ("lora", ["--quant", "4", "--lr", "5e-3"]),
    ("galore", ["--galore-rank", "4", "--galore-update-interval", "2", "--lr", "1e-2"]),
    ("badam", ["--badam-switch-interval", "2", "--badam-mode", "random", "--lr", "1e-2"]),
    ("full", ["--optim", "adamw8bit", "--lr", "3e-3"]),
])
def test_memory_efficient_methods_train_and_reload(data, tmp_path, method, extra):
    out = tmp_path / method
    ok(["train", "sft", "-m", data["stories"], "-d", data["dir"] / "stories.packed", "-o", out, "--method", method,
        "--max-steps", "10", "--batch-size", "4", "--grad-accum", "1", "--logging-steps", "1",
        "--gradient-checkpointing", *extra])
    losses = _losses(out)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    record = json.loads((out / "lmforge.json").read_text())
    assert record["method"] == method and record["hyperparameters"]["gradient_checkpointing"] is True
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").exists():
        from peft import PeftModel

        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(data["stories"])), str(out))
    else:
        AutoModelForCausalLM.from_pretrained(str(out))


@pytest.mark.parametrize("method, extra", [("full", []), ("freeze", []), ("dora", []), ("pissa", []),
                                           ("llama-pro", ["--expand-layers", "1"])])
def test_gradient_checkpointing_with_the_other_methods(data, tmp_path, method, extra):
    out = tmp_path / method
    ok(["train", "sft", "-m", data["stories"], "-d", data["dir"] / "stories.packed", "-o", out, "--method", method,
        "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--gradient-checkpointing", *extra])


def test_quantize_bad_input(data, tmp_path):
    assert "needs calibration data" in bad(["model", "quantize", data["tiny"], "-o", tmp_path / "a", "--method", "gptq"])
    assert "CUDA GPU" in bad(["model", "quantize", data["tiny"], "-o", tmp_path / "b", "--method", "awq",
                              "--calib", data["corpus"]])
    assert "does not go with" in bad(["model", "quantize", data["tiny"], "-o", tmp_path / "c", "--method", "bnb-int8",
                                      "--bits", "4", "--eval-data", data["corpus"]])
    assert "not found" in bad(["model", "quantize", tmp_path / "missing", "-o", tmp_path / "d"])
    short = tmp_path / "short.arrow"
    ok(["data", "align", write_jsonl(tmp_path / "s.jsonl", [{"text": f"w{i}"} for i in range(40)]), "-o", short])
    assert "no calibration row is longer than 10 tokens" in bad(
        ["model", "quantize", data["tiny"], "-o", tmp_path / "d", "--method", "gptq", "--bits", "3", "--calib", short])
    short.unlink()
    (tmp_path / "s.jsonl").unlink()
    result = run(["model", "quantize", data["stories"], "-o", tmp_path / "e", "--method", "bnb-nf4",
                  "--eval-data", data["corpus"], "--eval-samples", "4"])
    assert result.returncode == 1 and b"try bnb-int8 or gptq" in result.stderr and b"Traceback" not in result.stderr
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_model_init(data, tmp_path):
    """A random model with a tokenizer trained on the data; ChatML via its own template and ours agree."""
    import pyarrow as pa
    from conftest import read_meta

    tiny = data["tiny"]
    record = json.loads((tiny / "lmforge.json").read_text())
    assert record["method"] == "init" and record["config"]["vocab_size"] <= 512
    tables = []
    for template in ("chatml", "auto"):
        out = tmp_path / f"{template}.arrow"
        ok(["data", "pack", data["dir"] / "tasks.arrow", "-m", tiny, "-t", template, "--cutoff", "128", "-o", out])
        tables.append(pa.ipc.open_stream(pa.memory_map(str(out))).read_all().select(["input_ids", "labels"]))
        assert read_meta(out)["tokenizer"]["added_tokens"] == []
    assert tables[0].equals(tables[1])
    qwen = tmp_path / "qwen3"
    ok(["model", "init", "-o", qwen, "--arch", "qwen3", "--layers", "1", "--hidden", "32", "--heads", "2",
        "--tokenizer", data["stories"]])
    assert json.loads((qwen / "config.json").read_text())["model_type"] == "qwen3"
    assert "exactly one" in bad(["model", "init", "-o", tmp_path / "x"])
    assert "do not fit" in bad(["model", "init", "-o", tmp_path / "y", "--hidden", "30", "--heads", "4",
                                "--tokenizer", data["stories"]])
