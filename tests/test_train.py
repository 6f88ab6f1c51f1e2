"""`train pt/sft` and `adapter merge` on the real stories260K model (CPU, seconds each)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import LMFORGE, aligned, bad, ok, read_meta, shared_path, torchrun

STORIES = "models/stories260K"
FAST = ["--batch-size", "4", "--grad-accum", "1", "--logging-steps", "5"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The demo task (project data) aligned and packed for stories260K: train and eval splits."""
    import demo

    base = shared_path(STORIES)
    work = tmp_path_factory.mktemp("task")
    demo.write(work / "raw", rows=600)
    ok(["data", "align", work / "raw" / "tasks.jsonl", "-o", work / "aligned.arrow"])
    ok(["data", "split", work / "aligned.arrow", "--val-size", "64", "-o", work / "split"])
    for part in ("train", "val"):
        neat = ["--neat-packing"] if part == "train" else []
        ok(["data", "pack", work / "split" / f"{part}.arrow", "-m", base, "-t", "default", "--cutoff", "128", *neat,
            "-o", work / f"{part}.packed"])
    return {"base": base, "train": work / "train.packed", "val": work / "val.packed", "dir": work}


def train(task, out: Path, *args: str, stage: str = "sft", data: Path | None = None, **kwargs):
    return ok(["train", stage, "-m", task["base"], "-d", data or task["train"], "-o", out, *args], **kwargs)


def eval_loss(model, packed: Path) -> float:
    """Mean loss per trained token of `model` on packed data (our collator, no training)."""
    import datasets
    import torch
    from lmforge.shared.data.collate import PackedCollator

    rows = datasets.Dataset.from_file(str(packed))
    neat = read_meta(packed)["packing"] == "neat"
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(len(rows)):
            batch = PackedCollator(neat)([rows[i]])
            n = int((batch["labels"][0, 1:] != -100).sum())
            if n:
                total += float(model(**batch).loss) * n
                count += n
    return total / count


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    merged = {}
    for f in files:
        merged.update(load_file(str(f)))
    return merged


def test_sft_lora_learns_the_task_and_writes_a_complete_directory(task, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    result = train(task, out, "--max-steps", "60", "--lr", "3e-3", "--eval-data", task["val"], "--eval-steps", "30",
                   "--report", "tensorboard", *FAST)
    assert result.stdout.decode() == f"{out}\n"  # the path, and only the path, on stdout
    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "lmforge.json", "trainer_log.jsonl", "loss.png",
            "tokenizer.json", "generation_config.json", "tensorboard"} <= files
    assert "checkpoints" not in files
    assert any((out / "tensorboard").iterdir())
    record = json.loads((out / "lmforge.json").read_text())
    assert record["kind"] == "adapter" and record["method"] == "lora" and record["stage"] == "sft"
    assert record["data"]["fingerprint"] and record["metrics"]["tokens_per_second"] > 0
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert any("eval_loss" in e for e in log) and any("loss" in e for e in log)
    before = eval_loss(AutoModelForCausalLM.from_pretrained(task["base"]), task["val"])
    after = eval_loss(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(task["base"]), str(out)), task["val"])
    assert after < before * 0.7, (before, after)
    assert abs(record["metrics"]["eval_loss"] - after) < 0.2
    # merged: plain transformers loads and generates
    merged = tmp_path / "merged"
    assert ok(["adapter", "merge", task["base"], out, "-o", merged]).stdout.decode() == f"{merged}\n"
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    ids = tokenizer("Human: Reverse the order of the words.\ncat dog\nAssistant: ", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    assert json.loads((merged / "lmforge.json").read_text())["method"] == "merged"


@pytest.mark.parametrize("method, args", [("lora", ["--rslora", "--loraplus-ratio", "8"]), ("dora", []), ("pissa", [])])
def test_merged_logits_equal_base_plus_adapter(task, tmp_path, method, args):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    train(task, out, "--method", method, "--max-steps", "6", "--lr", "5e-3", *args, *FAST)
    merged = tmp_path / f"{method}-merged"
    ok(["adapter", "merge", task["base"], out, "-o", merged, "--dtype", "fp32"])
    x = torch.tensor([[1, 60, 70, 80, 90, 100, 200, 300]])
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(task["base"]), str(out)).eval()(x).logits
        folded = AutoModelForCausalLM.from_pretrained(str(merged)).eval()(x).logits
        plain = AutoModelForCausalLM.from_pretrained(task["base"]).eval()(x).logits
    assert (adapted - folded).abs().max() < 1e-4
    assert (plain - folded).abs().max() > 1e-3  # and the adapter did something


def test_full_freeze_and_llama_pro_change_exactly_their_parameters(task, tmp_path):
    base = _tensors(task["base"])
    full = tmp_path / "full"
    train(task, full, "--method", "full", "--max-steps", "3", "--lr", "1e-3", *FAST)
    after = _tensors(full)
    assert all(not base[k].equal(after[k]) for k in base)  # everything moved
    freeze = tmp_path / "freeze"
    train(task, freeze, "--method", "freeze", "--freeze-layers", "2", "--freeze-modules", "mlp", "--max-steps", "3",
          "--lr", "1e-3", *FAST)
    after = _tensors(freeze)
    moved = {k for k in base if not base[k].equal(after[k])}
    assert moved and all(k.startswith(("model.layers.3.mlp", "model.layers.4.mlp")) for k in moved), sorted(moved)
    assert {k.rsplit(".", 2)[0] for k in moved} >= {"model.layers.3.mlp", "model.layers.4.mlp"}
    pro = tmp_path / "pro"
    train(task, pro, "--method", "llama-pro", "--expand-layers", "1", "--max-steps", "3", "--lr", "1e-3", *FAST)
    after = _tensors(pro)
    config = json.loads((pro / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    for k, v in base.items():  # the original five layers (0-4), embeddings and norms: untouched
        assert after[k].equal(v), k
    new = {k for k in after if k.startswith("model.layers.5.")}
    assert new and all(k.replace("layers.5.", "layers.4.") in base for k in new)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(pro))  # loads in plain transformers


def test_llama_pro_starts_as_the_base_model(task):
    import torch
    from lmforge.shared.core.commands.training import Method
    from lmforge.shared.train.methods import apply
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(task["base"]).eval()
    x = torch.tensor([[1, 60, 70, 80, 90]])
    with torch.no_grad():
        reference = base(x).logits
    grown = apply(AutoModelForCausalLM.from_pretrained(task["base"]), Method(method="llama-pro", expand_layers=5))
    with torch.no_grad():
        assert (grown.eval()(x).logits - reference).abs().max() < 1e-5
    assert sum(p.requires_grad for p in grown.parameters()) == 5 * len(list(grown.model.layers[1].parameters()))


def test_resume_after_kill_ends_with_the_same_weights(task, tmp_path):
    args = ["--max-steps", "24", "--save-steps", "8", "--lr", "3e-3", *FAST]
    whole = tmp_path / "whole"
    train(task, whole, *args)
    cut = tmp_path / "cut"
    cmd = LMFORGE + ["train", "sft", "-m", str(task["base"]), "-d", str(task["train"]), "-o", str(cut), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "checkpoints" / "checkpoint-16" / "lmforge_progress.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "lmforge.json").exists()
    assert "unfinished training run" in bad(["adapter", "merge", task["base"], cut, "-o", tmp_path / "m"])
    assert "--resume" in bad(["train", "sft", "-m", task["base"], "-d", task["train"], "-o", cut, *args])
    train(task, cut, *args, "--resume")
    a, b = _tensors(whole), _tensors(cut)
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-6 for k in a)
    steps = [json.loads(line)["step"] for line in (cut / "trainer_log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicate log lines after resume
    # the resumed run reports the whole run: the same loss history and totals as the uninterrupted one
    def history(run):
        return [(e["step"], e["loss"]) for e in map(json.loads, (run / "trainer_log.jsonl").read_text().splitlines())
                if "loss" in e]

    assert [s for s, _ in history(cut)] == [s for s, _ in history(whole)]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(history(cut), history(whole)))
    mw, mc = (json.loads((run / "lmforge.json").read_text())["metrics"] for run in (whole, cut))
    assert mc["steps"] == mw["steps"] == 24 and mc["tokens"] == mw["tokens"]
    assert abs(mc["train_loss"] - mw["train_loss"]) < 1e-5, (mc["train_loss"], mw["train_loss"])
    # a finished run resumed is a no-op that prints its path
    assert ok(["train", "sft", "-m", task["base"], "-d", task["train"], "-o", cut, *args, "--resume"]).stdout.decode() == f"{cut}\n"


def test_a_failed_fresh_run_leaves_no_half_made_directory(tmp_path):
    from lmforge.shared.core import rundir

    def fail_in(out: Path, created: bool, checkpoint: bool, fresh: bool = True):
        out.mkdir(exist_ok=True)
        (out / "trainer_log.jsonl").write_text("{}\n")
        if checkpoint:
            (out / "checkpoints" / "checkpoint-8").mkdir(parents=True)
            (out / "checkpoints" / "checkpoint-8" / "trainer_state.json").write_text("{}")
        with pytest.raises(KeyboardInterrupt), rundir.removed_on_failure(out, fresh=fresh, created=created):
            raise KeyboardInterrupt

    fail_in(tmp_path / "new", created=True, checkpoint=False)
    assert not (tmp_path / "new").exists()
    fail_in(tmp_path / "given", created=False, checkpoint=False)  # a directory the user made stays, emptied
    assert (tmp_path / "given").is_dir() and not any((tmp_path / "given").iterdir())
    fail_in(tmp_path / "resumable", created=True, checkpoint=True)  # a checkpoint is worth keeping
    assert (tmp_path / "resumable" / "checkpoints" / "checkpoint-8").is_dir()
    fail_in(tmp_path / "resumed", created=False, checkpoint=False, fresh=False)  # --resume never deletes
    assert (tmp_path / "resumed" / "trainer_log.jsonl").exists()


def test_loss_is_averaged_over_trained_tokens_under_gradient_accumulation(task, tmp_path):
    """One SGD step on 4 rows gives the same weights as 2x2 or 4x1 accumulated micro-batches:
    the loss is the sum over trained tokens divided by their total count, not a mean of means."""
    common = ["--method", "full", "--max-steps", "1", "--optim", "sgd", "--lr", "0.5", "--max-grad-norm", "0",
              "--scheduler", "constant", "--logging-steps", "1"]
    results = []
    for bs, ga in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"b{bs}g{ga}"
        train(task, out, *common, "--batch-size", str(bs), "--grad-accum", str(ga))
        results.append(_tensors(out))
    base = _tensors(task["base"])
    for other in results[1:]:
        for k in base:
            assert (results[0][k] - other[k]).abs().max() < 1e-5, k
    assert any(not base[k].equal(results[0][k]) for k in base)


def test_neat_packed_rows_do_not_attend_across_examples(task):
    import datasets
    import torch
    from lmforge.shared.data.collate import PackedCollator
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(task["base"]).eval()
    row = next(r for r in datasets.Dataset.from_file(str(task["train"])) if len(r["lengths"]) >= 3)
    batch = PackedCollator(neat=True)([row])
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        start = 0
        for n in row["lengths"]:
            alone = model(input_ids=torch.tensor([row["input_ids"][start:start + n]])).logits[0]
            assert (packed[start:start + n] - alone).abs().max() < 1e-4
            start += n
    assert all(batch["labels"][0, s] == -100 for s in [0, row["lengths"][0], row["lengths"][0] + row["lengths"][1]])


def test_pt_with_gradient_checkpointing(task, tmp_path):
    import demo

    demo.write(tmp_path / "raw", rows=200)
    ok(["data", "align", tmp_path / "raw" / "corpus.jsonl", "-o", tmp_path / "pt.arrow"])
    ok(["data", "pack", tmp_path / "pt.arrow", "-m", task["base"], "-s", "pt", "--cutoff", "128", "-o", tmp_path / "pt.packed"])
    out = tmp_path / "pt"
    train(task, out, "--gradient-checkpointing", "--max-steps", "4", *FAST, stage="pt", data=tmp_path / "pt.packed")
    record = json.loads((out / "lmforge.json").read_text())
    assert record["stage"] == "pt" and record["hyperparameters"]["gradient_checkpointing"] is True
    assert "stage 'pt'" in bad(["train", "sft", "-m", task["base"], "-d", tmp_path / "pt.packed", "-o", tmp_path / "x"])


def test_neftune_noise_changes_training_only_when_asked(task, tmp_path):
    """Same seed and data: the first logged loss (before any update) is the same with and without
    NEFTune only if no noise reaches the embeddings; with --neftune-alpha it differs."""
    args = ["--max-steps", "2", "--logging-steps", "1", "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-3"]

    def first_loss(name, *extra):
        train(task, tmp_path / name, *args, *extra)
        return json.loads((tmp_path / name / "trainer_log.jsonl").read_text().splitlines()[0])["loss"]

    plain, again, noisy = first_loss("a"), first_loss("b"), first_loss("n", "--neftune-alpha", "50")
    assert plain == again and noisy != plain
    assert json.loads((tmp_path / "n" / "lmforge.json").read_text())["hyperparameters"]["neftune_alpha"] == 50
    assert "must be above 0" in bad(["train", "sft", "-m", task["base"], "-d", task["train"], "-o", tmp_path / "z",
                                     "--neftune-alpha", "0"])
    # only pt and sft take it: the other stages do not list it at all
    assert "No such option: --neftune-alpha" in bad(["train", "dpo", "-m", task["base"], "-d", task["train"], "-o",
                                                     tmp_path / "z", "--neftune-alpha", "5"])


def test_added_template_tokens_resize_and_merge(task, tmp_path):
    """ChatML on a base model: pack adds <|im_start|>/<|im_end|>; train resizes the embeddings and
    trains the new rows; the merged model has them and stops generating at <|im_end|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = aligned(tmp_path, "chat", [{"instruction": f"Say {w}", "output": w} for w in ["cat", "dog", "sun"] * 10])
    packed = tmp_path / "chat.packed"
    ok(["data", "pack", data, "-m", task["base"], "-t", "chatml", "--cutoff", "64", "-o", packed])
    out = tmp_path / "chat"
    train(task, out, "--max-steps", "4", "--lr", "1e-2", *FAST, data=packed)
    merged = tmp_path / "chat-merged"
    ok(["adapter", "merge", task["base"], out, "-o", merged])
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 514
    generation = json.loads((merged / "generation_config.json").read_text())
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end == generation["eos_token_id"] or end in generation["eos_token_id"]
    saved = _tensors(out)
    assert any("trainable_tokens" in k for k in saved), sorted(saved)[:5]  # the new rows were trained and saved


def test_train_refuses_mismatches(task, tmp_path):
    qwen = shared_path("tokenizers/qwen3")
    data = aligned(tmp_path, "x", [{"instruction": "hi", "output": "there"}] * 4)
    other = tmp_path / "other.packed"
    ok(["data", "pack", data, "-m", qwen, "-t", "qwen3", "-o", other])
    line = bad(["train", "sft", "-m", task["base"], "-d", other, "-o", tmp_path / "o1"])
    assert "packed with tokenizer" in line and str(qwen) in line and "pack it again" in line
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert "not empty" in bad(["train", "sft", "-m", task["base"], "-d", task["train"], "-o", tmp_path / "busy"])
    assert "these processes run on the CPU already" in bad(["train", "sft", "-m", task["base"], "-d", task["train"],
                                                            "-o", tmp_path / "o2", "--fsdp", "offload", "--max-steps", "1"])
    assert "adapters only" in bad(["train", "sft", "-m", task["base"], "-d", task["train"], "-o", tmp_path / "o3",
                                   "--method", "full", "--quant", "8"])
    assert "is aligned data" in bad(["train", "sft", "-m", task["base"], "-d", data, "-o", tmp_path / "o4"])
    assert "--expand-layers" in bad(["train", "sft", "-m", task["base"], "-d", task["train"], "-o", tmp_path / "o5",
                                     "--method", "llama-pro"])
    assert "not found" in bad(["train", "sft", "-m", tmp_path / "nomodel", "-d", task["train"], "-o", tmp_path / "o6"])
    assert "unknown optimizer" in bad(["train", "sft", "-m", task["base"], "-d", task["train"], "-o", tmp_path / "o7",
                                       "--optim", "adamx"])
    assert "must be above 0" in bad(["train", "sft", "-m", task["base"], "-d", task["train"], "-o", tmp_path / "o8",
                                     "--lr", "-1"])
    # a run that fails before its first checkpoint leaves nothing behind (o6 failed after making OUT)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 9))


def _launch(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    return torchrun(nproc, args)


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
def test_ddp_two_processes(task, tmp_path):
    out = tmp_path / "ddp"
    result = _launch(2, ["train", "sft", "-m", task["base"], "-d", task["train"], "-o", out, "--max-steps", "4",
                         "--batch-size", "2", "--grad-accum", "1"])
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert result.stdout.decode().strip().splitlines()[-1] == str(out)
    record = json.loads((out / "lmforge.json").read_text())
    assert record["hyperparameters"]["world_size"] == 2 and record["metrics"]["steps"] == 4


@pytest.mark.slow   # torchrun launches: `make test` runs it, `make test-fast` leaves it out
@pytest.mark.parametrize("zero, method", [("z2", "lora"), ("z3", "full")])
def test_deepspeed_zero_on_cpu(task, tmp_path, zero, method):
    pytest.importorskip("deepspeed")
    out = tmp_path / zero
    # ZeRO-2 with selective checkpointing (non-reentrant, policy contexts) in bf16 (the fused LoRA layers)
    extra = ["--checkpointing", "selective", "--precision", "bf16"] if zero == "z2" else []
    result = _launch(2, ["train", "sft", "-m", task["base"], "-d", task["train"], "-o", out, "--deepspeed", zero,
                         "--method", method, "--max-steps", "3", "--batch-size", "2", "--grad-accum", "1", *extra])
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    record = json.loads((out / "lmforge.json").read_text())
    assert record["hyperparameters"]["deepspeed"] == zero and record["hyperparameters"]["world_size"] == 2
    assert record["hyperparameters"]["checkpointing"] == ("selective" if zero == "z2" else None)
    if method == "full":  # ZeRO-3 gathers the sharded weights into a whole model on save
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(out))
        assert sum(p.numel() for p in model.parameters()) == 260_032


@pytest.mark.slow
def test_smollm2_sft_lora_merge_generate(tmp_path, smollm2):
    """The same pipeline on SmolLM2-135M-Instruct (materialized from its GGUF file)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = smollm2
    import demo

    demo.write(tmp_path / "raw", rows=200)
    ok(["data", "align", tmp_path / "raw" / "tasks.jsonl", "-o", tmp_path / "a.arrow", "--max-samples", "128"])
    ok(["data", "pack", tmp_path / "a.arrow", "-m", model_dir, "-t", "smollm", "--cutoff", "256", "--packing",
        "-o", tmp_path / "p.arrow"])
    out = tmp_path / "lora"
    ok(["train", "sft", "-m", model_dir, "-d", tmp_path / "p.arrow", "-o", out, "--max-steps", "6", "--batch-size", "2",
        "--grad-accum", "1", "--lr", "1e-3"])
    merged = tmp_path / "merged"
    ok(["adapter", "merge", model_dir, out, "-o", merged])
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out_ids = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out_ids[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text
