"""Vision-language fine-tuning end to end, on a tiny randomly initialised Qwen2-VL built
from transformers' real config, model and image-processor classes (tests/vlmkit.py), with images
generated here: align (images columns, placeholders, data URLs), pack (image tokens = what the
vision tower returns, for every image), train (LoRA on the language model, the vision tower
frozen), merge, eval generate, serve; one slow test shows it learns to name a square's colour."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest
from conftest import bad, ok, read_meta, read_rows, write_jsonl

pytest.importorskip("PIL")
from vlmkit import COLOURS, colour_rows, qwen2_vl, square_png  # noqa: E402

SIZES = ((56, 56), (84, 56), (40, 120), (200, 150))   # the last one is scaled down by --image-max-pixels


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vlm")


@pytest.fixture(scope="module")
def model(work) -> Path:
    return qwen2_vl(work / "qwen2vl")


@pytest.fixture(scope="module")
def aligned_colours(work) -> Path:
    out = work / "colours.arrow"
    ok(["data", "align", colour_rows(work, 24, seed=3, sizes=SIZES), "-o", out])
    return out


@pytest.fixture(scope="module")
def packed(work, model, aligned_colours) -> Path:
    out = work / "packed.arrow"
    ok(["data", "pack", aligned_colours, "-m", model, "--cutoff", "256", "--image-max-pixels", "12000", "-o", out])
    return out


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_pairs(n: int, seed: int) -> list[dict]:
    """Alpaca-style preference rows: an image of a square, the right colour chosen, a wrong one rejected."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour = sorted(COLOURS)[i % 3]
        rows.append({"instruction": "<image>What colour is the square ?", "chosen": colour,
                     "rejected": sorted(COLOURS)[(i + 1) % 3], "images": [data_url(square_png(colour, rng))]})
    return rows


def runs_of(ids: list[int], token: int) -> list[int]:
    """Lengths of the runs of `token` in ids, in order."""
    out: list[int] = []
    prev = None
    for t in ids:
        if t == token:
            if prev == token:
                out[-1] += 1
            else:
                out.append(1)
        prev = t
    return out


# ----------------------------------------------------------------------------- align


def test_align_reads_images_from_llamafactory_and_openai_rows(tmp_path):
    rng = random.Random(0)
    (tmp_path / "data" / "img").mkdir(parents=True)
    (tmp_path / "data" / "img" / "a.png").write_bytes(square_png("red", rng))
    (tmp_path / "data" / "img" / "b.png").write_bytes(square_png("blue", rng))
    rows = [{"messages": [{"role": "user", "content": "<image>and<image>: colours?"},
                          {"role": "assistant", "content": "red blue"}], "images": ["img/a.png", "img/b.png"]}]
    (tmp_path / "data" / "mm.json").write_text(json.dumps(rows))
    info = {"mm": {"file_name": "mm.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
                   "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                            "assistant_tag": "assistant"}}}
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(info))
    got = read_rows(ok(["data", "align", "--dataset-info", tmp_path / "data" / "dataset_info.json", "--name", "mm"]).stdout)
    parts = got[0]["prompt"][0]["parts"]
    assert [p["type"] for p in parts] == ["image", "text", "image", "text"]
    assert parts[0]["image"] == (tmp_path / "data" / "img" / "a.png").read_bytes() and parts[2]["format"] == "png"
    # OpenAI image_url parts with a data URL
    png = square_png("green", rng)
    src = write_jsonl(tmp_path / "o.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                     {"type": "text", "text": "colour?"}]},
        {"role": "assistant", "content": "green"}]}])
    assert read_rows(ok(["data", "align", src]).stdout)[0]["prompt"][0]["parts"][0]["image"] == png
    # a placeholder count that differs from the image count, a missing image: one line naming file and row
    wrong = write_jsonl(tmp_path / "w.jsonl", [
        {"instruction": "<image>x", "output": "y", "images": ["data/img/a.png"]},
        {"instruction": "<image>x", "output": "y", "images": ["data/img/a.png", "data/img/b.png"]},
        {"instruction": "<image>x", "output": "y", "images": ["data/img/nope.png"]}])
    line = bad(["data", "align", wrong])
    assert "w.jsonl line 2" in line and "1 image placeholder(s) for 2 images" in line
    skipped = ok(["data", "align", wrong, "--skip-invalid"])
    assert len(read_rows(skipped.stdout)) == 1
    assert "skipped 2 invalid row(s)" in skipped.stderr.decode() and "nope.png" in skipped.stderr.decode()


# ----------------------------------------------------------------------------- pack


def test_image_tokens_match_what_the_vision_tower_returns(model, packed):
    """Every image's placeholder became exactly as many image tokens as the vision tower gives
    for it; no loss on image tokens; the images travel with their rows; stats count them."""
    import torch
    from lmforge.shared.data.multimodal import Vision
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    meta = read_meta(packed)
    assert meta["vision"]["family"] == "qwen2_vl"
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    vision = Vision(str(model), tokenizer)
    net = AutoModelForImageTextToText.from_pretrained(str(model)).eval()
    image_id = meta["vision"]["image_token_id"]
    rows = read_rows(packed)
    assert len(rows) == 24
    images = [b for r in rows for b in r["images"]]
    pixels = vision.pixels(images)
    with torch.no_grad():
        features = net.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"])
    per_image = [f.shape[0] for f in getattr(features, "pooler_output", features)]
    runs = [n for r in rows for n in runs_of(r["input_ids"], image_id)]
    assert runs == per_image and len(runs) == 24 and len(set(runs)) > 1   # several sizes, each exact
    from PIL import Image
    import io

    assert max(Image.open(io.BytesIO(b)).width * Image.open(io.BytesIO(b)).height for b in images) <= 12000
    for r in rows:
        assert all(lab == -100 for t, lab in zip(r["input_ids"], r["labels"]) if t == image_id)
        assert any(lab != -100 for lab in r["labels"])
    stats = json.loads(ok(["data", "stats", packed, "--json"]).stdout)
    assert stats["images"]["per_row"]["total"] == 24
    assert stats["images"]["image_tokens_per_row"]["total"] == sum(per_image)


def test_packing_keeps_images_and_positions_within_each_example(work, model, aligned_colours):
    """--packing: each row's images are its examples' images, in token order; --neat-packing:
    Qwen's 3D rotary positions restart at each example, equal to the model's own for it alone."""
    import torch
    from lmforge.shared.data.collate import VisionCollator
    from lmforge.shared.data.multimodal import Vision
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    out = work / "neat.arrow"
    ok(["data", "pack", aligned_colours, "-m", model, "--cutoff", "256", "--neat-packing", "-o", out])
    rows = read_rows(out)
    meta = read_meta(out)
    image_id = meta["vision"]["image_token_id"]
    assert len(rows) < 24 and sum(len(r["images"]) for r in rows) == 24
    for r in rows:
        assert len(runs_of(r["input_ids"], image_id)) == len(r["images"]) == len(r["lengths"])
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    net = AutoModelForImageTextToText.from_pretrained(str(model)).eval()
    collate = VisionCollator(True, 0, Vision(str(model), tokenizer), net.model.get_rope_index, "mm_token_type_ids")
    batch = collate(rows[:2])
    row = rows[0]
    grids = batch["image_grid_thw"]
    start = 0
    for k, length in enumerate(row["lengths"]):
        ids = torch.tensor([row["input_ids"][start:start + length]])
        alone, _ = net.model.get_rope_index(ids, mm_token_type_ids=(ids == image_id).int(), image_grid_thw=grids[k:k + 1])
        assert torch.equal(batch["position_ids"][1:, 0, start:start + length], alone[:, 0])
        assert batch["position_ids"][0, 0, start] == 0
        start += length
    with torch.no_grad():   # the batch runs: image features and image tokens agree
        assert torch.isfinite(net(**batch).loss)


def test_pack_refuses_unsupported_families_and_undecodable_images(work, model, aligned_colours):
    import shutil

    other = work / "other"
    shutil.copytree(model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "idefics3"}))
    line = bad(["data", "pack", aligned_colours, "-m", other])
    assert "idefics3" in line and "qwen2_vl" in line and "llava" in line and "gemma3" in line
    # a PNG signature on broken bytes passes align (it is a PNG by its magic) and fails pack, naming the row
    broken = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    src = write_jsonl(work / "broken.jsonl", [
        {"instruction": "<image>What colour is the square ?", "output": "red", "images": [data_url(square_png("red", random.Random(1)))]},
        {"instruction": "<image>What colour is the square ?", "output": "red", "images": [data_url(broken)]}])
    ok(["data", "align", src, "-o", work / "broken.arrow"])
    line = bad(["data", "pack", work / "broken.arrow", "-m", model])
    assert "row 2: image 1: the image cannot be decoded" in line


# ----------------------------------------------------------------------------- train, merge, use


def test_lora_trains_the_language_model_then_merge_eval_and_serve(work, model, packed):
    """LoRA (+ --train-projector, gradient checkpointing) leaves the vision tower alone; the merged
    model gives the adapter's logits on an image batch; eval generate and serve take images."""
    import torch
    from lmforge.shared.data.collate import VisionCollator
    from lmforge.shared.data.multimodal import Vision
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    run_dir = work / "run"
    ok(["train", "sft", "-m", model, "-d", packed, "-o", run_dir, "--max-steps", "2", "--batch-size", "4",
        "--grad-accum", "1", "--learning-rate", "1e-2", "--train-projector", "--gradient-checkpointing"])
    weights = load_file(str(run_dir / "adapter_model.safetensors"))
    assert any("lora_A" in k and "language_model" in k for k in weights)
    assert not any("lora" in k and "visual" in k for k in weights)          # no adapter on the vision tower
    assert any("merger" in k for k in weights)                               # the projector trained fully
    merged = work / "merged"
    ok(["adapter", "merge", model, run_dir, "-o", merged])
    assert (merged / "preprocessor_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    rows = read_rows(packed)[:3]
    net = AutoModelForImageTextToText.from_pretrained(str(merged)).eval()
    batch = VisionCollator(False, 0, Vision(str(model), tokenizer), net.model.get_rope_index, "mm_token_type_ids")(rows)
    from lmforge.shared.model.merging import load_with_adapters

    adapted, _, _ = load_with_adapters(str(model), [str(run_dir)], torch.float32)
    batch.pop("labels")
    with torch.no_grad():
        assert torch.allclose(net(**batch).logits, adapted.eval()(**batch).logits, atol=1e-5)
    # eval generate with images in the eval data
    rng = random.Random(5)
    src = write_jsonl(work / "eval.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(square_png(c, rng))}},
                                     {"type": "text", "text": "What colour is the square ?"}]},
        {"role": "assistant", "content": c}]} for c in sorted(COLOURS)])
    ok(["data", "align", src, "-o", work / "eval.arrow"])
    result = json.loads(ok(["eval", "generate", "-m", merged, "-d", work / "eval.arrow", "--max-new-tokens", "3",
                            "--json"]).stdout)
    assert result["count"] == 3
    # serve: an image_url part with a data URL answers; a remote URL or a server-side path is refused
    from fastapi.testclient import TestClient
    from lmforge.shared.infer.app import create_app, prepare

    served = prepare(str(merged), None, "auto", "hf", 2, 2, None, "vlm")
    assert served.vision is not None
    client = TestClient(create_app(served))
    ask = {"model": "vlm", "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(square_png("red", rng))}},
        {"type": "text", "text": "What colour is the square ?"}]}]}
    answer = client.post("/v1/chat/completions", json=ask)
    assert answer.status_code == 200, answer.text
    assert isinstance(answer.json()["choices"][0]["message"]["content"], str)
    assert answer.json()["usage"]["prompt_tokens"] > 10   # the image's tokens are in the prompt
    for url in ("https://example.com/a.png", str(work / "img" / "3-0.png")):
        ask["messages"][0]["content"][0]["image_url"]["url"] = url
        refused = client.post("/v1/chat/completions", json=ask)
        assert refused.status_code == 400 and "data: URLs" in refused.text
    # chat: /image PATH attaches a local image to the next message; a remote URL is refused
    from lmforge.shared.infer.chat import LocalModel, Settings, chat_loop

    lines = iter([f"/image {work / 'img' / '3-0.png'}", "What colour is the square ?",
                  "/image https://example.com/a.png", "/exit"])
    said: list[str] = []
    chat_loop(LocalModel(served), "", Settings(max_tokens=3, temperature=0.0), lambda: next(lines), said.append)
    assert "[image 1 attached" in "".join(said) and "remote URL" in "".join(said)


def test_full_and_freeze_keep_the_vision_tower_frozen_unless_asked(model):
    from lmforge.shared.core.commands.training import Method
    from lmforge.shared.data.modalities import of_model
    from lmforge.shared.train.methods import apply
    from transformers import AutoModelForImageTextToText

    net = AutoModelForImageTextToText.from_pretrained(str(model))
    V = of_model(net)
    assert V is not None and V.tower_modules(net) == ["model.visual"]
    assert V.projector_modules(net) == ["model.visual.merger"]   # type: ignore[attr-defined]
    apply(net, Method(method="full"))
    grads = {n: p.requires_grad for n, p in net.named_parameters()}
    assert not any(g for n, g in grads.items() if n.startswith("model.visual."))
    assert all(g for n, g in grads.items() if n.startswith("model.language_model."))
    apply(net, Method(method="freeze", freeze_layers=1, train_projector=True))
    grads = {n: p.requires_grad for n, p in net.named_parameters()}
    assert all(g for n, g in grads.items() if n.startswith("model.visual.merger."))
    assert not any(g for n, g in grads.items() if n.startswith("model.visual.blocks."))
    assert any(g for n, g in grads.items() if n.startswith("model.language_model.layers.1."))
    assert not any(g for n, g in grads.items() if n.startswith("model.language_model.layers.0."))
    apply(net, Method(method="full", train_vision_tower=True))
    assert all(p.requires_grad for n, p in net.named_parameters() if n.startswith("model.visual.blocks."))
    assert not any(p.requires_grad for n, p in net.named_parameters() if n.startswith("model.visual.merger."))
    assert V.modules_to_save(net, False, True) == ["model.visual"]
    assert V.modules_to_save(net, True, False) == ["model.visual.merger"]


@pytest.mark.parametrize("bits", ["4", "8"])
def test_qlora_on_a_vlm_trains_the_language_model_over_quantized_weights(work, model, packed, bits):
    """--quant 4|8 (bitsandbytes, which runs on CPUs): the base loads quantized, the adapter trains on
    the language model only, the loss falls, and the adapter loads back on the unquantized model."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    out = work / f"qlora{bits}"
    ok(["train", "sft", "-m", model, "-d", packed, "-o", out, "--quant", bits, "--max-steps", "6",
        "--batch-size", "4", "--grad-accum", "1", "--learning-rate", "1e-2", "--logging-steps", "1"])
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_A" in k and "language_model" in k for k in weights)
    assert not any("visual" in k for k in weights)
    assert json.loads((out / "lmforge.json").read_text())["hyperparameters"]["quant"] == int(bits)
    losses = [json.loads(line)["loss"] for line in (out / "trainer_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) >= 5 and min(losses[-2:]) < losses[0], losses
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(str(model)), str(out))


# ----------------------------------------------------------------------------- it learns


@pytest.mark.slow
def test_a_tiny_vlm_learns_to_name_the_colour_of_a_square(tmp_path, model):
    """Chance is 1 in 3; after LoRA on the language model (vision tower frozen) exact match is
    clearly above it on held-out images."""
    train = tmp_path / "train.arrow"
    test = tmp_path / "test.arrow"
    ok(["data", "align", colour_rows(tmp_path, 240, seed=11), "-o", tmp_path / "a.arrow"])
    ok(["data", "pack", tmp_path / "a.arrow", "-m", model, "--cutoff", "128", "-o", train])
    ok(["data", "align", colour_rows(tmp_path, 45, seed=12), "-o", test])
    before = json.loads(ok(["eval", "generate", "-m", model, "-d", test, "--max-new-tokens", "2", "--json"]).stdout)
    run_dir = tmp_path / "run"
    ok(["train", "sft", "-m", model, "-d", train, "-o", run_dir, "--lora-rank", "16", "--learning-rate", "3e-3",
        "--epochs", "2", "--batch-size", "8", "--grad-accum", "1", "--scheduler", "constant"])
    after = json.loads(ok(["eval", "generate", "-m", model, "--adapter", run_dir, "-d", test,
                           "--max-new-tokens", "2", "--json"]).stdout)
    print("colour exact match:", before["exact_match"], "->", after["exact_match"])
    assert before["exact_match"] < 40
    assert after["exact_match"] >= 60, after


@pytest.mark.parametrize("family", ["llava", "gemma3", "qwen2_5_vl", "qwen3_vl"])
def test_other_families_pack_exactly_and_train(work, family, aligned_colours):
    """A LLaVA-style model, Gemma 3, Qwen2.5-VL and Qwen3-VL: image tokens equal the vision
    tower's features per image; LoRA trains the language model only."""
    import torch
    import vlmkit
    from lmforge.shared.data.multimodal import Vision
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model = vlmkit.qwen_vl(work / family, family) if family.startswith("qwen") else getattr(vlmkit, family)(work / family)
    packed = work / f"{family}.arrow"
    ok(["data", "pack", aligned_colours, "-m", model, "--cutoff", "256", "--packing", "-o", packed])
    rows = read_rows(packed)
    image_id = read_meta(packed)["vision"]["image_token_id"]
    vision = Vision(str(model), AutoTokenizer.from_pretrained(str(model)))
    net = AutoModelForImageTextToText.from_pretrained(str(model)).eval()
    for r in rows[:2]:
        with torch.no_grad():
            features = net.model.get_image_features(**vision.pixels(r["images"]))
        features = getattr(features, "pooler_output", features)
        per_image = [len(f) for f in features] if isinstance(features, (list, tuple)) else [features.shape[1]] * len(features)
        assert runs_of(r["input_ids"], image_id) == per_image
    run_dir = work / f"{family}-run"
    ok(["train", "sft", "-m", model, "-d", packed, "-o", run_dir, "--max-steps", "1", "--batch-size", "2",
        "--grad-accum", "1"])
    weights = load_file(str(run_dir / "adapter_model.safetensors"))
    assert any("language_model" in k for k in weights)
    assert not any(part in k for k in weights for part in ("vision_tower", "visual"))


def test_dpo_on_images(work, model):
    """Pairwise data with images in the prompt packs for dpo (the prompts' images travel in
    `prompt_images`); the batch carries each prompt's images for its chosen and rejected rows, and
    the model accepts it (image features and image tokens agree); train dpo runs."""
    import torch
    from lmforge.shared.data.packed import PackedData
    from lmforge.shared.data.modalities import MODALITIES
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    ok(["data", "align", write_jsonl(work / "pairs.jsonl", image_pairs(8, seed=7)), "-o", work / "pairs.arrow"])
    packed = work / "pairs-packed.arrow"
    ok(["data", "pack", work / "pairs.arrow", "-m", model, "--stage", "dpo", "-o", packed])
    got = read_rows(packed)
    meta = read_meta(packed)
    assert all(len(r["prompt_images"]) == 1 for r in got)
    assert all(runs_of(r["prompt_ids"], meta["vision"]["image_token_id"]) for r in got)
    net = AutoModelForImageTextToText.from_pretrained(str(model)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    pairs = MODALITIES["vision"].pair_collator(DataCollatorForPreference(pad_token_id=0), str(model), net,
                                               tokenizer,
                        PackedData(packed, meta, len(got), None))
    batch = pairs(got[:3])
    assert batch["input_ids"].shape[0] == 6 and batch["image_grid_thw"].shape[0] == 6
    with torch.no_grad():
        net(**{k: v for k, v in batch.items() if k != "completion_mask"})
    ok(["train", "dpo", "-m", model, "-d", packed, "-o", work / "dpo", "--max-steps", "1", "--batch-size", "4",
        "--grad-accum", "1"])
    # the reference-free losses take the images through the same batches (the model gets them), and train
    import types

    from lmforge.shared.train.preference import _ref_free_trainer_class

    trainer = object.__new__(_ref_free_trainer_class())
    trainer.loss_name, trainer.beta, trainer.gamma, trainer.ftx = "orpo", 0.1, 0.5, 0.0
    trainer.accelerator = types.SimpleNamespace(unwrap_model=lambda m: m, num_processes=1)   # one process
    trainer.record = lambda *args: None
    seen: dict = {}

    def fake_model(**kwargs):
        seen.update(kwargs)
        return types.SimpleNamespace(logits=torch.zeros(*kwargs["input_ids"].shape, len(tokenizer)))

    trainer.compute_loss(fake_model, batch)
    assert seen["pixel_values"] is batch["pixel_values"] and seen["image_grid_thw"].shape[0] == 6
    for loss in ("orpo", "simpo"):
        ok(["train", "dpo", "-m", model, "-d", packed, "-o", work / loss, "--loss", loss, "--max-steps", "1",
            "--batch-size", "4", "--grad-accum", "1"])


def test_kto_on_images(work, model, monkeypatch):
    """KTO rows (one answer, desirable or not) with an image in the prompt pack with their images; the
    batch carries them once for the answer rows, which the KL rows (the same prompts with a
    neighbour's answer) share, with their own token types; the model takes both; train dpo --loss kto
    runs. An image in an answer is refused at pack, naming the row."""
    import torch
    from lmforge.shared.data.packed import PackedData
    from lmforge.shared.data.modalities import MODALITIES
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    rows = [{"instruction": r["instruction"], "output": r["chosen"] if i % 2 else r["rejected"], "label": bool(i % 2),
             "images": r["images"]} for i, r in enumerate(image_pairs(8, seed=9))]
    ok(["data", "align", write_jsonl(work / "kto.jsonl", rows), "-o", work / "kto.arrow"])
    packed = work / "kto-packed.arrow"
    ok(["data", "pack", work / "kto.arrow", "-m", model, "--stage", "kto", "-o", packed])
    got, meta = read_rows(packed), read_meta(packed)
    assert all(len(r["prompt_images"]) == 1 for r in got) and sum(r["label"] for r in got) == 4
    image_token = meta["vision"]["image_token_id"]
    net = AutoModelForImageTextToText.from_pretrained(str(model)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    unpaired = MODALITIES["vision"].pair_collator(DataCollatorForUnpairedPreference(pad_token_id=0), str(model), net,
                                                  tokenizer,
                           PackedData(packed, meta, len(got), None), paired=False)
    rows3 = [dict(r, completion_ids=r.pop("response_ids")) for r in got[:3]]
    for i, r in enumerate(rows3):   # as TRL's KTO makes them: the neighbour's answer
        r["KL_completion_ids"] = rows3[i - 1]["completion_ids"]
    batch = unpaired(rows3)
    assert batch["input_ids"].shape[0] == 3 and batch["image_grid_thw"].shape[0] == 3
    assert torch.equal(batch["KL_mm_token_type_ids"], (batch["KL_input_ids"] == image_token).long())
    with torch.no_grad():
        net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"])
        net(input_ids=batch["KL_input_ids"], attention_mask=batch["KL_attention_mask"],
            pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=batch["KL_mm_token_type_ids"])
    seen: list[set] = []
    from lmforge.shared.data.modalities.images import ImagePairs

    collate = ImagePairs.__call__
    monkeypatch.setattr(ImagePairs, "__call__", lambda self, rows: seen.append(set(b := collate(self, rows))) or b)
    ok(["train", "dpo", "-m", model, "-d", packed, "-o", work / "kto", "--loss", "kto", "--max-steps", "2",
        "--batch-size", "4", "--grad-accum", "1"])
    assert seen and all({"pixel_values", "KL_input_ids", "KL_mm_token_type_ids"} <= keys for keys in seen), seen
    assert (work / "kto" / "adapter_model.safetensors").is_file()
    answer_image = [{"messages": [{"role": "user", "content": "Which colour?"},
                                  {"role": "assistant", "content": [{"type": "image_url", "image_url": {
                                      "url": rows[0]["images"][0]}}]}], "label": True}]
    ok(["data", "align", write_jsonl(work / "kto-bad.jsonl", answer_image), "-o", work / "kto-bad.arrow"])
    assert "row 1: an image in an answer" in bad(["data", "pack", work / "kto-bad.arrow", "-m", model,
                                                  "--stage", "kto"])


@pytest.fixture(scope="module")
def image_prompts(work, model, aligned_colours) -> Path:
    """The colour rows packed as ppo-stage prompts (with their answers) for train grpo and ppo."""
    packed = work / "image-prompts.arrow"
    ok(["data", "pack", aligned_colours, "-m", model, "--stage", "ppo", "--cutoff", "256",
        "--image-max-pixels", "12000", "-o", packed])
    return packed


def test_grpo_on_image_prompts(work, model, image_prompts, image_rm, monkeypatch):
    """ppo-stage prompts keep their images; train grpo samples with each prompt's images and gives
    them to every log-prob pass (the loss, the reference with --kl-coef, the old policy with
    --num-iterations 2) and to a reward model trained on image pairs, row by row however TRL
    shuffles its batches."""
    from lmforge.shared.data import multimodal

    packed = image_prompts
    got = read_rows(packed)
    assert all(len(r["prompt_images"]) == 1 and r["response_ids"] for r in got)
    image_token = read_meta(packed)["vision"]["image_token_id"]
    calls: list[tuple[int, int]] = []   # (rows, image tokens in their prompts) per processing
    pixels = multimodal.PromptImages.pixels

    def spy(self, rows):
        out = pixels(self, rows)
        calls.append((len(rows), sum(runs_of(got[r]["prompt_ids"], image_token)[0] for r in rows)))
        assert out["num_images"] == [1] * len(rows)
        grids = out["image_grid_thw"]   # Qwen: image tokens = the grid's patches / merge 2x2
        assert int((grids.prod(-1) // 4).sum()) == calls[-1][1]
        return out

    monkeypatch.setattr(multimodal.PromptImages, "pixels", spy)
    out = work / "grpo"
    ok(["train", "grpo", "-m", model, "-d", packed, "-o", out, "--reward", "exact", "--reward", image_rm[1],
        "--max-steps", "2",
        "--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "4", "--kl-coef", "0.05",
        "--num-iterations", "2", "--logging-steps", "1"])
    assert (out / "adapter_model.safetensors").is_file()
    # sampling (4 prompts: 2 x 2 generations), then old policy, reference and loss passes over them
    assert calls and all(n == 4 for n, _ in calls), calls
    # step 1: sampling, old policy, reference, the reward model, loss; step 2 (2nd iteration): loss
    assert len(calls) == 6, calls
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert any("rewards/rm/mean" in e for e in log), log


@pytest.fixture(scope="module")
def image_rm(work, model) -> tuple[Path, Path]:
    """rm pairs with an image in each prompt, packed, and a LoRA reward model trained on them."""
    ok(["data", "align", write_jsonl(work / "rm-pairs.jsonl", image_pairs(24, seed=8)), "-o", work / "rm-pairs.arrow"])
    packed = work / "rm-packed.arrow"
    ok(["data", "pack", work / "rm-pairs.arrow", "-m", model, "--stage", "rm", "-o", packed])
    out = work / "rm"
    ok(["train", "rm", "-m", model, "-d", packed, "-o", out, "--max-steps", "8", "--batch-size", "4",
        "--grad-accum", "1", "--learning-rate", "5e-3", "--logging-steps", "1"])
    return packed, out


def test_reward_model_on_images(work, model, image_rm):
    """rm pairs with images in the prompt pack like dpo's; the value model reads the images (its
    score changes with the image alone), and train rm learns to prefer the right colour."""
    import torch
    from lmforge.shared.data.collate import PairCollator
    from lmforge.shared.data.packed import PackedData
    from lmforge.shared.model.value import ValueModel
    from lmforge.shared.data.modalities import MODALITIES
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    packed, out = image_rm
    got, meta = read_rows(packed), read_meta(packed)
    assert all(len(r["prompt_images"]) == 1 for r in got)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    net = AutoModelForImageTextToText.from_pretrained(str(model)).eval()
    value = ValueModel(net)
    pairs = MODALITIES["vision"].pair_collator(PairCollator(0), str(model), net, tokenizer,
                                               PackedData(packed, meta, len(got), None))
    batch = pairs(got[:2])
    assert batch["input_ids"].shape[0] == 4 and batch["image_grid_thw"].shape[0] == 4 and pairs.tokens > 0
    with torch.no_grad():
        scores = value(**batch)
        other = dict(batch, pixel_values=batch["pixel_values"].flip(0))   # the same text, other images
        assert scores.shape == (4,) and not torch.allclose(value(**other), scores)
    assert (out / "adapter_model.safetensors").is_file()   # 8 steps of train rm (the fixture)
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) >= 6 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("layout", ["shared", "separate"])
def test_ppo_on_image_prompts(work, model, image_rm, image_prompts, layout, monkeypatch):
    """train ppo with a reward model trained on image pairs: sampling, the policy/value, reference
    and reward passes and every update mini-batch get their rows' images (rows in order), in both
    layouts; the run finishes with its adapter."""
    from lmforge.shared.data import multimodal

    got = read_rows(image_prompts)
    image_token = read_meta(image_prompts)["vision"]["image_token_id"]
    calls: list[int] = []
    pixels = multimodal.PromptImages.pixels

    def spy(self, rows):
        out = pixels(self, rows)
        calls.append(len(rows))
        tokens = sum(runs_of(got[r]["prompt_ids"], image_token)[0] for r in rows)
        assert int((out["image_grid_thw"].prod(-1) // 4).sum()) == tokens   # the rows' own images
        return out

    monkeypatch.setattr(multimodal.PromptImages, "pixels", spy)
    out = work / f"ppo-{layout}"
    ok(["train", "ppo", "-m", model, "--reward", image_rm[1], "-d", image_prompts, "-o", out, "--layout", layout,
        "--max-steps", "2", "--batch-size", "4", "--mini-batch-size", "2", "--ppo-epochs", "1",
        "--max-new-tokens", "4", "--overwrite"])
    assert (out / "adapter_model.safetensors").is_file()
    # per step: sampling (4 rows), the batch's passes (4), then 2 update mini-batches (2 each)
    assert calls == [4, 4, 2, 2] * 2, calls


def test_serve_with_the_vllm_backend_passes_images_through(model, monkeypatch):
    """vLLM (a GPU extra) is replaced by a stand-in module that records what lmforge hands it: the
    engine is started with room for images, and a request's images arrive decoded, beside prompt ids
    that hold one placeholder per image (vLLM's processor gives each image its tokens)."""
    import sys
    import types

    from fastapi.testclient import TestClient
    from lmforge.shared.infer.app import create_app, prepare
    from lmforge.shared.infer.engines import MAX_IMAGES
    from transformers import AutoTokenizer

    seen: dict = {}

    class Output:
        def __init__(self, ids):
            self.prompt_token_ids = ids + [0] * 40      # as vLLM reports it: with the image tokens
            self.outputs = [types.SimpleNamespace(index=0, text="red", finish_reason="stop", token_ids=[1, 2])]

    class Engine:
        async def generate(self, prompt, params, request_id, lora_request=None):
            seen["prompt"] = prompt
            yield Output(prompt["prompt_token_ids"])

    fake = types.ModuleType("vllm")
    fake.AsyncEngineArgs = lambda **kwargs: seen.setdefault("args", kwargs)
    fake.AsyncLLMEngine = types.SimpleNamespace(from_engine_args=lambda args: Engine())
    fake.SamplingParams = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", fake)

    served = prepare(str(model), None, "auto", "vllm", 2, 2, None, "vlm")
    assert served.vision is not None and seen["args"]["limit_mm_per_prompt"] == {"image": MAX_IMAGES}
    client = TestClient(create_app(served))
    rng = random.Random(9)
    parts = [{"type": "image_url", "image_url": {"url": data_url(square_png(c, rng, size))}}
             for c, size in (("red", (56, 56)), ("blue", (84, 56)))]
    ask = {"model": "vlm", "max_tokens": 3, "messages": [
        {"role": "user", "content": [*parts, {"type": "text", "text": "What colour is the square ?"}]}]}
    answer = client.post("/v1/chat/completions", json=ask)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "red"
    prompt = seen["prompt"]
    images = prompt["multi_modal_data"]["image"]
    assert [im.size for im in images] == [(56, 56), (84, 56)] and all(im.mode == "RGB" for im in images)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert runs_of(prompt["prompt_token_ids"], pad) == [1, 1]         # one placeholder per image
    assert answer.json()["usage"]["prompt_tokens"] == len(prompt["prompt_token_ids"]) + 40
    # too many images for the engine's limit: a 400 naming it, nothing sent to vLLM
    seen.pop("prompt")
    ask["messages"][0]["content"] = [parts[0]] * (MAX_IMAGES + 1) + [{"type": "text", "text": "?"}]
    refused = client.post("/v1/chat/completions", json=ask)
    assert refused.status_code == 400 and "at most 8" in refused.text and "prompt" not in seen
    # text-only requests keep the plain token prompt
    ask["messages"][0]["content"] = "What colour is the square ?"
    assert client.post("/v1/chat/completions", json=ask).status_code == 200
    assert set(seen["prompt"]) == {"prompt_token_ids"}
