"""The architecture matrix: tiny random models of many decoder architectures (tests/archmatrix.py)
through pack -> train sft -> adapter merge (merged logits = base + adapter) -> eval perplexity /
generate -> serve one request. LoRA for every architecture here; the other methods (dora, freeze,
llama-pro, full) in the slow part. docs/guides/architectures.md's table is archmatrix.table(); a test compares."""

from __future__ import annotations

import json
from pathlib import Path

import archmatrix
import pytest
from conftest import ROOT, aligned, bad, ok

NAMES = list(archmatrix.ARCHS)
QUICK = ["--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--logging-steps", "1", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Every tiny model (sharing one tokenizer's files), the aligned data, and packed data per tokenizer."""
    work = tmp_path_factory.mktemp("archs")
    tok = archmatrix.tokenizer_dir(work / "tokenizer")
    models = {name: archmatrix.build(name, work / name, tok) for name in NAMES}
    data = aligned(work, "sft", archmatrix.sft_rows())
    return {"work": work, "models": models, "data": data, "packed": {}}


def packed_for(matrix, name: str) -> Path:
    """Data packed once per tokenizer fingerprint: models with the same tokenizer share it (byte-identical
    tokenizer files give one fingerprint whatever the model type, unless transformers tokenizes otherwise)."""
    from lmforge.shared.modeldir.tokenizers import fingerprint, load_tokenizer

    tokenizer = load_tokenizer(matrix["models"][name])
    key = fingerprint(tokenizer)
    if key not in matrix["packed"]:
        out = matrix["work"] / f"packed-{key}.arrow"
        # Qwen models get transformers' Qwen2Tokenizer rebuilt from the word vocabulary, which the
        # tiktoken fast path cannot take (it panics: reported), so those pack with the HF tokenizer
        env = {} if type(tokenizer).__name__ == "TokenizersBackend" else {"LMFORGE_FAST_TOKENIZER": "0"}
        ok(["data", "pack", matrix["data"], "-m", matrix["models"][name], "-t", "chatml", "--cutoff", "48", "-o", out],
           env=env)
        matrix["packed"][key] = out
    return matrix["packed"][key]


def logits(model_dir: Path, adapter: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    with torch.no_grad():
        return model(torch.arange(4, archmatrix.VOCAB)[None, :24]).logits


def serve_one(model_dir: Path) -> dict:
    from fastapi.testclient import TestClient
    from lmforge.shared.infer import app

    served = app.prepare(str(model_dir), None, "chatml", "hf", 1, 4, None, "m")
    with TestClient(app.create_app(served)) as client:
        reply = client.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "what color is the cat"}],
            "max_tokens": 4, "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.mark.parametrize("name", NAMES)
def test_lora_pack_train_merge_eval_serve(matrix, tmp_path, name):
    base = matrix["models"][name]
    packed = packed_for(matrix, name)
    adapter = tmp_path / "lora"
    ok(["train", "sft", "-m", base, "-d", packed, "-o", adapter, "--method", "lora", "--lora-rank", "4", *QUICK])
    record = json.loads((adapter / "lmforge.json").read_text())
    assert record["device"]["attention"] == archmatrix.attention(name)
    # --lora-target all: an adapter on every linear layer but the output head
    from lmforge.shared.train.methods import adapted_modules, linear_layers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    linears = set(linear_layers(model))
    assert linears and linears <= adapted_modules(PeftModel.from_pretrained(model, str(adapter)))
    merged = tmp_path / "merged"
    ok(["adapter", "merge", base, adapter, "-o", merged])
    with_adapter, base_logits = logits(base, adapter), logits(base)
    assert (with_adapter - base_logits).abs().max() > 1e-4          # the adapter does something
    assert (logits(merged) - with_adapter).abs().max() < 1e-4       # and merging keeps it exactly
    report = json.loads(ok(["eval", "perplexity", "-m", base, "--adapter", adapter, "-d", packed, "--json", "-q"]).stdout)
    assert 1 < report["perplexity"] < 10 * archmatrix.VOCAB
    gen = json.loads(ok(["eval", "generate", "-m", merged, "-d", matrix["data"], "--max-samples", "2",
                         "--max-new-tokens", "4", "--template", "chatml", "--json", "-q"]).stdout)
    assert gen["count"] == 2
    answer = serve_one(merged)
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert answer["usage"]["prompt_tokens"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in archmatrix.METHODS if m != "lora"])
@pytest.mark.parametrize("name", NAMES)
def test_other_methods(matrix, tmp_path, name, method):
    base = matrix["models"][name]
    packed = packed_for(matrix, name)
    out = tmp_path / method
    extra = {"dora": ["--lora-rank", "4"], "freeze": ["--freeze-layers", "1"], "llama-pro": ["--expand-layers", "1"],
             "full": []}[method]
    args = ["train", "sft", "-m", base, "-d", packed, "-o", out, "--method", method, *extra, *QUICK]
    want = archmatrix.expected(name, method)
    if want != "yes":
        line = bad(args)
        assert "fused tensors" in line and "--method lora" in line, line
        return
    ok(args)
    if method == "dora":
        merged = tmp_path / "merged"
        ok(["adapter", "merge", base, out, "-o", merged])
        assert (logits(merged) - logits(base, out)).abs().max() < 1e-4
    elif method == "llama-pro":   # the expanded checkpoint loads (its config describes the new layers)
        from transformers import AutoConfig

        assert AutoConfig.from_pretrained(str(out)).num_hidden_layers == archmatrix.BASE["num_hidden_layers"] + 1
        report = json.loads(ok(["eval", "perplexity", "-m", out, "-d", packed, "--json", "-q"]).stdout)
        assert report["perplexity"] > 1
    else:
        assert json.loads((out / "lmforge.json").read_text())["method"] == method


def test_readme_table_is_the_matrix():
    section = archmatrix.readme_section((ROOT / "docs" / "guides" / "architectures.md").read_text(encoding="utf-8"))
    assert section is not None, "docs/guides/architectures.md has no architecture table: run python tests/archmatrix.py"
    assert section == archmatrix.table(), \
        "docs/guides/architectures.md's architecture table is stale: run .venv/bin/python tests/archmatrix.py"


def test_matrix_covers_what_the_issue_asks():
    covers = {c for _, _, cs in archmatrix.ARCHS.values() for c in cs}
    assert len(archmatrix.ARCHS) >= 20
    assert {"dense", "moe", "tied", "soft-capped logits", "sliding window", "no-RoPE layers"} <= covers
    untied = [n for n, (_, keys, _) in archmatrix.ARCHS.items() if not keys.get("tie_word_embeddings")]
    assert untied


@pytest.mark.parametrize("name", NAMES)
def test_dpo_forward_equals_full_logits_or_steps_aside(matrix, name):
    """train dpo's own forward (preference.completion_logps: the output layer only at completion
    positions, in chunks) gives every architecture's summed completion log-probs and their gradients
    as log_softmax over full logits does; models whose logits are soft-capped or scaled after the
    output layer keep TRL's forward instead."""
    import types

    import torch
    from lmforge.shared.train.preference import completion_logps, lean_applies
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(matrix["models"][name]), attn_implementation="eager")
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(num_processes=1), is_deepspeed_enabled=False,
                                    is_fsdp_enabled=False)
    if not lean_applies(trainer, model):
        assert "soft-capped logits" in archmatrix.ARCHS[name][2] or "scaled logits" in archmatrix.ARCHS[name][2]
        return
    model.eval()
    torch.manual_seed(1)
    ids = torch.randint(4, archmatrix.VOCAB, (4, 20))
    lengths = torch.tensor([20, 17, 20, 12])      # right padding, as TRL's preference collator pads
    positions = torch.arange(20)[None, :]
    attention = (positions < lengths[:, None]).long()
    completion = ((positions >= torch.tensor([6, 9, 4, 7])[:, None]) & attention.bool()).long()
    ids = ids.masked_fill(attention == 0, 3)
    batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    sums, counts = completion_logps(model, batch)
    head = model.get_output_embeddings().weight
    layer = next(p for n, p in model.named_parameters() if "layers.0" in n or ".h.0." in n)
    lean_grads = torch.autograd.grad(sums.sum(), (head, layer))
    full = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    token = torch.log_softmax(full, -1).gather(2, ids[:, 1:, None]).squeeze(-1)
    expected = (token * completion[:, 1:]).sum(1)
    assert torch.equal(counts, completion[:, 1:].sum(1))
    assert torch.allclose(sums, expected, rtol=1e-4, atol=1e-4), (sums, expected)
    for got, want in zip(lean_grads, torch.autograd.grad(expected.sum(), (head, layer))):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-5)
