"""Neat-packed rows attended example by example (shared/train/packedattn.py).

The per-example sdpa calls must give what transformers' own block-diagonal mask gives (built
from the restarting position ids): the same loss and the same gradients, on every architecture
the function is switched on for, with grouped-query attention, a sliding window narrower than an
example, and padding at a row's end."""

from __future__ import annotations

import pytest
import torch
from archmatrix import ARCHS, BASE
from conftest import ok, shared_path

from lmforge.shared.train.patches import packedattn

# (lengths of the examples in each row; the rest of the row is padding)
ROWS = [[5, 19, 1, 7], [24, 6]]
LENGTH = 32


def batch(vocab: int):
    torch.manual_seed(1)
    ids, positions, labels = [], [], []
    for lengths in ROWS:
        pos = [p for n in lengths for p in range(n)]
        pad = LENGTH - len(pos)
        pos += range(pos[-1] + 1, pos[-1] + 1 + pad)   # as PackedCollator pads: the last segment goes on
        row = torch.randint(4, vocab, (LENGTH,))
        lab = row.clone()
        lab[LENGTH - pad:] = -100
        ids.append(row)
        labels.append(lab)
        positions.append(pos)
    return {"input_ids": torch.stack(ids), "labels": torch.stack(labels),
            "position_ids": torch.tensor(positions), "use_cache": False}


def loss_and_grads(model, inputs):
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", [n for n in ARCHS if ARCHS[n][0] in packedattn.ARCHS])
def test_per_example_attention_equals_the_block_diagonal_mask(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, keys, _ = ARCHS[name]
    if name == "mistral":
        keys = {**keys, "sliding_window": 8}   # narrower than the 19- and 24-token examples
    config = AutoConfig.for_model(model_type, **{k: v for k, v in {**BASE, "pad_token_id": 3, **keys}.items()
                                                 if v is not None})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim >= 2 and "norm" not in pname:
                p.normal_(0, 0.2)
    model.train()
    inputs = batch(config.vocab_size)
    assert packedattn.applies(model, "sdpa", neat=True)
    want_loss, want = loss_and_grads(model, inputs)
    packedattn.install(model)
    try:
        assert model.config._attn_implementation == packedattn.NAME
        got_loss, got = loss_and_grads(model, inputs)
    finally:
        packedattn.uninstall(model)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
    # and the mask matters: plain causal attention over the whole row gives another loss
    plain = {k: v for k, v in inputs.items() if k != "position_ids"}
    plain_loss = loss_and_grads(model, plain)[0]
    assert not torch.allclose(plain_loss, want_loss, rtol=1e-4)
    # without position ids (the model makes one shared row of them) it is plain causal attention
    packedattn.install(model)
    try:
        torch.testing.assert_close(loss_and_grads(model, plain)[0], plain_loss, rtol=1e-5, atol=1e-6)
    finally:
        packedattn.uninstall(model)


def test_generation_with_a_cache_while_installed_equals_sdpa():
    """Installed only for training, but a model generating meanwhile (a KV cache: fewer queries than
    keys) gets transformers' own sdpa."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **{**BASE, "pad_token_id": 3})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    prompt = torch.randint(4, config.vocab_size, (1, 7))
    want = model.generate(prompt, max_new_tokens=6, do_sample=False)
    packedattn.install(model)
    try:
        got = model.generate(prompt, max_new_tokens=6, do_sample=False)
    finally:
        packedattn.uninstall(model)
    assert torch.equal(got, want)


def test_segments_follow_the_position_restarts():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    assert packedattn.segments(positions) == [[(0, 3), (3, 5), (5, 6), (6, 10)], [(0, 10)]]


def test_only_plain_attention_architectures_and_sdpa_qualify():
    from transformers import AutoConfig, AutoModelForCausalLM

    def tiny(model_type, **keys):
        config = AutoConfig.for_model(model_type, **{**BASE, **keys})
        return AutoModelForCausalLM.from_config(config)

    llama = tiny("llama")
    assert packedattn.applies(llama, "sdpa", neat=True)
    assert not packedattn.applies(llama, "sdpa", neat=False)          # plain packing: one causal row
    assert not packedattn.applies(llama, "eager", neat=True)
    assert not packedattn.applies(llama, "flash_attention_2", neat=True)   # flash has varlen kernels
    assert not packedattn.applies(tiny("gemma2", attn_logit_softcapping=50.0), "sdpa", neat=True)


@pytest.mark.slow
def test_train_sft_on_neat_packed_data_uses_it_and_saves_plain_sdpa(tmp_path):
    """End to end on stories260K: the log says so, and the saved model's config is sdpa's."""
    import json

    model = shared_path("models/stories260K")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Once upon a time there was a cat number {i}."})
                              for i in range(40)))
    aligned, packed, out = tmp_path / "a.arrow", tmp_path / "p.arrow", tmp_path / "out"
    ok(["data", "align", str(data), "-o", str(aligned), "-q"])
    ok(["data", "pack", str(aligned), "-m", str(model), "--stage", "pt", "--cutoff", "64", "--neat-packing",
        "-o", str(packed), "-q"])
    result = ok(["train", "pt", "-m", str(model), "-d", str(packed), "-o", str(out), "--method", "full",
                 "--max-steps", "2", "--batch-size", "2", "--attn", "sdpa"])
    assert "attend example by example" in result.stderr.decode()
    saved = json.loads((out / "config.json").read_text())
    assert saved.get("_attn_implementation", "sdpa") in ("sdpa", None)


def test_bf16_on_a_cpu_attends_in_fp32_and_returns_bf16():
    """On a CPU a bf16 model's examples are attended in fp32 (faster there) and handed back in bf16:
    the loss and gradients match transformers' masked bf16 path within bf16's rounding."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **{**BASE, "pad_token_id": 3})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").train()
    inputs = batch(config.vocab_size)
    want_loss, want = loss_and_grads(model, inputs)
    seen = []
    model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    packedattn.install(model)
    try:
        got_loss, got = loss_and_grads(model, inputs)
    finally:
        packedattn.uninstall(model)
    assert seen == [torch.bfloat16]
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-2, atol=2e-2)
    for key in want:
        assert ((got[key].float() - want[key].float()).norm() / want[key].float().norm()).item() < 5e-2, key
