"""`--shift-attn` (S² attention, LongLoRA) and `--kernels` (CUDA only).

S² is checked against a direct implementation of the paper's Algorithm 1 (heads chunked in two,
the second chunk rolled by -G/2, causal softmax attention inside each group of G = L/4 tokens,
rolled back by +G/2), written here with loops, on a tiny Llama with grouped-query attention; at
inference the model must be exactly the full-attention model."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import bad, ok, shared_path


def reference_s2(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Algorithm 1 of LongLoRA, literally (loops, explicit softmax); the causal mask follows each
    token's real position (lmforge's choice, see shiftattn.py). attention_mask: sdpa's bool mask."""
    batch, heads, length, dim = query.shape
    if not module.training:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling)
    assert length % 4 == 0
    rep = heads // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    g = length // 4
    first = heads - heads // 2  # torch.chunk(2, heads)[0]

    def shift(x):
        return torch.cat((x[:, :first], x[:, first:].roll(-g // 2, dims=2)), dim=1)

    q, k, v = shift(query), shift(key), shift(value)
    real = torch.arange(length)
    out = torch.zeros_like(q)
    for h in range(heads):
        pos = real if h < first else real.roll(-g // 2)
        for start in range(0, length, g):
            p = pos[start:start + g]
            scores = q[:, h, start:start + g] @ k[:, h, start:start + g].transpose(-1, -2) * (scaling or dim ** -0.5)
            allowed = p[:, None] >= p[None, :]
            if attention_mask is not None:
                allowed = allowed & attention_mask[:, 0][:, p][:, :, p]
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[:, h, start:start + g] = torch.softmax(scores, -1) @ v[:, h, start:start + g]
    out = torch.cat((out[:, :first], out[:, first:].roll(g // 2, dims=2)), dim=1)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module")
def tiny():
    """Three copies of one tiny Llama (6 query heads, 2 key/value heads: the head split falls
    inside a key/value group): lmforge's S², the reference, and plain full attention."""
    from lmforge.shared.train.patches import shiftattn
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register("test_s2_reference", reference_s2)
    AttentionMaskInterface.register("test_s2_reference", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    plain = LlamaForCausalLM(copy.deepcopy(config)).float()
    models = {}
    for name in ("s2", "reference"):
        model = LlamaForCausalLM(copy.deepcopy(config)).float()   # a config each: its attention is its own
        model.load_state_dict(plain.state_dict())
        models[name] = model
    assert shiftattn.install(models["s2"]) == "sdpa"
    models["reference"].config._attn_implementation = "test_s2_reference"
    models["plain"] = plain
    return models


def _logits(model, ids, train: bool, **kw):
    model.train(train)
    with torch.no_grad():
        return model(ids, use_cache=False, **kw).logits


def test_s2_equals_the_definition_and_is_not_full_attention(tiny):
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    ours = _logits(tiny["s2"], ids, True)
    reference = _logits(tiny["reference"], ids, True)
    full = _logits(tiny["plain"], ids, True)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
    assert (ours - full).abs().max() > 1e-3   # the grouping changed something
    # gradients flow and match too
    for name in ("s2", "reference"):
        tiny[name].zero_grad()
        tiny[name].train()
        tiny[name](ids, labels=ids).loss.backward()
    g1 = tiny["s2"].model.layers[0].self_attn.q_proj.weight.grad
    g2 = tiny["reference"].model.layers[0].self_attn.q_proj.weight.grad
    assert torch.allclose(g1, g2, atol=1e-5)


def test_s2_keeps_packed_examples_apart_and_pads_odd_lengths(tiny):
    """Restarting position ids (neat packing) give a block-diagonal mask, applied inside groups;
    a length not divisible by 4 is padded at the end, which changes no real token's output."""
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(2))
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None]
    ours = _logits(tiny["s2"], ids, True, position_ids=positions)
    reference = _logits(tiny["reference"], ids, True, position_ids=positions)
    assert torch.allclose(ours, reference, atol=1e-5)
    # the second example does not see the first: changing the first leaves it unchanged
    other = ids.clone()
    other[0, :10] = (other[0, :10] + 1) % 97
    assert torch.allclose(_logits(tiny["s2"], other, True, position_ids=positions)[0, 10:], ours[0, 10:], atol=1e-5)
    # 22 tokens are grouped as 24 (groups of 6): the same outputs as the first 22 of a 24-token row
    assert torch.allclose(_logits(tiny["s2"], ids[:, :22], True), _logits(tiny["s2"], ids, True)[:, :22], atol=1e-5)


def test_s2_is_full_attention_at_inference_and_in_generation(tiny):
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_logits(tiny["s2"], ids, False), _logits(tiny["plain"], ids, False))
    tiny["s2"].eval()
    tiny["plain"].eval()
    a = tiny["s2"].generate(ids[:, :8], max_new_tokens=6, do_sample=False)
    b = tiny["plain"].generate(ids[:, :8], max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_s2_refuses_what_it_cannot_do():
    from lmforge.shared.core.errors import BadInput
    from lmforge.shared.train.patches import shiftattn
    from transformers import GPT2Config

    with pytest.raises(BadInput, match="gpt2 models are not supported"):
        shiftattn.check_model(GPT2Config())
    with pytest.raises(BadInput, match="sdpa or eager, not flash_attention_2"):
        shiftattn.check_attention("flash_attention_2")


@pytest.fixture(scope="module")
def stories_task(tmp_path_factory):
    base = shared_path("models/stories260K")
    work = tmp_path_factory.mktemp("s2")
    rows = [{"instruction": f"Tell story {i}", "input": "", "output": "Once upon a time " * (3 + i % 5)}
            for i in range(16)]
    (work / "raw.json").write_text(json.dumps(rows))
    ok(["data", "align", work / "raw.json", "-o", work / "aligned.arrow"])
    ok(["data", "pack", work / "aligned.arrow", "-m", base, "-t", "default", "--cutoff", "64", "--neat-packing",
        "-o", work / "train.arrow"])
    return base, work


def test_train_sft_shift_attn_end_to_end(stories_task):
    base, work = stories_task
    out = work / "run"
    run = ok(["train", "sft", "-m", base, "-d", work / "train.arrow", "-o", out, "--shift-attn", "--max-steps", "2",
              "--batch-size", "2", "--grad-accum", "1", "--logging-steps", "1"])
    assert "S² attention (--shift-attn) while training, over sdpa" in run.stderr.decode()
    record = json.loads((out / "lmforge.json").read_text())
    assert record["hyperparameters"]["shift_attn"] is True and record["device"]["attention"] == "sdpa"
    assert math.isfinite(record["metrics"]["train_loss"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


def test_kernels_and_shift_attn_refusals(stories_task, monkeypatch):
    base, work = stories_task
    args = ["train", "sft", "-m", base, "-d", work / "train.arrow", "-o", work / "refused", "--max-steps", "1"]
    if not torch.cuda.is_available():
        assert "--kernels liger needs a CUDA GPU" in bad([*args, "--kernels", "liger"])
    assert "--shift-attn works with --attn sdpa or eager" in bad([*args, "--shift-attn", "--attn",
                                                                  "flash_attention_2"])
    dpo = ["train", "dpo", "-m", base, "-d", work / "train.arrow", "-o", work / "refused", "--shift-attn"]
    assert "needs the reference to be the policy's own layers" in bad([*dpo, "--method", "full"])
    assert not (work / "refused").exists()
    # a missing package names the pip command
    import sys

    from lmforge.shared.core.errors import BadInput
    from lmforge.shared.train.patches import kernels

    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    with pytest.raises(BadInput, match="pip install liger-kernel"):
        kernels.check("liger", "cuda", "lora", None)
    monkeypatch.setitem(sys.modules, "unsloth", None)
    with pytest.raises(BadInput, match="pip install unsloth"):
        kernels.check("unsloth", "cuda", "lora", None)
    with pytest.raises(BadInput, match="--method lora, not full"):
        kernels.check("unsloth", "cuda", "full", None)
