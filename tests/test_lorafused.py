"""The fused LoRA path (shared/train/lorafused.py): PEFT's lora.Linear over a bf16 base with fp32
adapter weights, with the adapter products in bf16 in one autograd node."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from lmforge.shared.train.patches import lorafused
from lmforge.shared.core.commands.training import Method
from lmforge.shared.train.methods import apply


def _base(dtype=torch.bfloat16):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(config).to(dtype)


def _lora(base, fused: bool, **config):
    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", **config))
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()      # fp32 adapter weights over the bf16 base (lmforge --precision bf16)
            if "lora_B" in name:
                p.data.normal_(0, 0.05)  # nonzero B, so every gradient flows
    if fused:
        assert lorafused.install(model) == 14
    return model.train()


def _grads(model, ids, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _worst(a: dict, b: dict, scale: dict) -> float:
    return max(((a[n] - b[n]).norm() / scale[n].norm()).item() for n in a)


def test_one_layer_matches_the_definition_in_bf16():
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40).to(torch.bfloat16).requires_grad_(False)
    a = torch.randn(8, 48, requires_grad=True)
    b = torch.randn(40, 8, requires_grad=True)
    x = torch.randn(3, 5, 48, dtype=torch.bfloat16, requires_grad=True)
    y = lorafused._LoraLinear.apply(x, base.weight, base.bias, a, b, 2.0)
    g = torch.randn_like(y)
    y.backward(g)
    # output and gradients against the same products in float64
    x64, a64, b64, g64 = (t.detach().double().requires_grad_() for t in (x, a, b, g))
    ref = x64 @ base.weight.double().t() + base.bias.double() + 2.0 * (x64 @ a64.t()) @ b64.t()
    ref.backward(g64)
    assert y.dtype == torch.bfloat16 and ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    for got, want in ((x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        assert got.shape == want.shape and got.dtype in (torch.bfloat16, torch.float32)
        assert ((got.double() - want).norm() / want.norm()).item() < 2e-2
    assert a.grad.dtype == b.grad.dtype == torch.float32


def test_a_model_trains_as_under_autocast():
    """Loss and gradients as PEFT's fp32 adapter path gives them, within bf16's rounding -- the same
    distance autocast's mixed precision lands at -- and the same with gradient checkpointing."""
    base = _base()
    ids = torch.randint(0, 300, (2, 33))
    loss, exact = _grads(_lora(base, False), ids)
    _, autocast = _grads(_lora(base, False), ids, autocast=True)
    fused_loss, fused = _grads(_lora(base, True), ids)
    checkpointed = _lora(base, True)
    checkpointed.gradient_checkpointing_enable()
    checkpointed.enable_input_require_grads()
    _, recomputed = _grads(checkpointed, ids)
    assert abs(fused_loss - loss) < 1e-2
    assert _worst(fused, exact, exact) < max(0.05, 2 * _worst(autocast, exact, exact))
    assert _worst(recomputed, fused, exact) == 0.0


def test_it_steps_aside_where_it_does_not_apply():
    base = _base()
    ids = torch.randint(0, 300, (2, 17))
    fused, plain = _lora(base, True), _lora(base, False)
    with torch.no_grad():
        with fused.disable_adapter(), plain.disable_adapter():      # adapters off: the base model exactly
            assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
        with torch.autocast("cpu", dtype=torch.float16):            # autocast to another dtype: PEFT's path
            assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
        # autocast to the base's own dtype (bf16 on GPUs): the fused path, the same numbers as without it
        layer = next(m for m in fused.modules() if isinstance(m, lorafused.FusedLoraLinear))
        x = torch.randn(2, 5, layer.in_features, dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = layer(x)
        assert torch.equal(under, layer(x))
        calls = []
        apply_fused = lorafused._LoraLinear.apply
        lorafused._LoraLinear.apply = lambda *a: calls.append(1) or apply_fused(*a)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                layer(x)
        finally:
            lorafused._LoraLinear.apply = apply_fused
        assert calls == [1]
    # dropout, and an fp32 base (nothing to gain): PEFT's path, so the same numbers
    for model_base, config in ((base, {"lora_dropout": 0.1}), (_base(torch.float32), {})):
        torch.manual_seed(5)
        one = _lora(model_base, True, **config)(input_ids=ids).logits
        torch.manual_seed(5)
        two = _lora(model_base, False, **config)(input_ids=ids).logits
        assert torch.equal(one, two)
    # a hook on a base layer (accelerate's offloading puts the weights in place there) or a trained
    # base weight: PEFT's path, which calls the base layer, so the hook runs
    hooked, calls = _lora(base, True), []
    layers = [m for m in hooked.modules() if isinstance(m, lorafused.FusedLoraLinear)]
    layers[0].base_layer.register_forward_pre_hook(lambda *args: calls.append("hook"))
    layers[1].base_layer.weight.requires_grad_(True)
    apply_fused = lorafused._LoraLinear.apply
    lorafused._LoraLinear.apply = lambda *a: calls.append("fused") or apply_fused(*a)
    try:
        with torch.no_grad():
            hooked(input_ids=ids)
    finally:
        lorafused._LoraLinear.apply = apply_fused
    assert calls.count("hook") == 1 and calls.count("fused") == len(layers) - 2


def test_it_saves_less_for_backward_and_survives_copies():
    """Autograd keeps x and the rank-r product, not an fp32 copy of every adapted layer's input."""
    base = _base()
    ids = torch.randint(0, 300, (2, 64))

    def saved_bytes(model) -> int:   # activations autograd keeps (distinct storages, weights aside)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                kept[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids).loss.backward()
        return sum(kept.values())

    assert saved_bytes(_lora(base, True)) < 0.8 * saved_bytes(_lora(base, False))
    model = _lora(base, True)
    copied, unpickled = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert torch.equal(copied(input_ids=ids).logits, want) and torch.equal(unpickled(input_ids=ids).logits, want)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(type(m).__name__ == "FusedLoraLinear" for m in merged.modules())


def counting_data(tmp_path, model):
    """24 "Count to N." examples aligned and neat-packed for `model` at cutoff 128 (also used by
    tests/test_checkpointing.py)."""
    import json

    from conftest import ok

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))})
                              for i in range(1, 25)))
    aligned, packed = tmp_path / "a.arrow", tmp_path / "p.arrow"
    ok(["data", "align", data, "-o", aligned, "-q"])
    ok(["data", "pack", aligned, "-m", model, "-t", "default", "--cutoff", "128", "--neat-packing", "-o", packed, "-q"])
    return packed


@pytest.mark.parametrize("method, fused", [("lora", 14), ("pissa", 14), ("dora", 0)])
def test_train_methods_route_their_layers(method, fused):
    model = apply(_base(), Method(method=method, lora_rank=4))
    assert sum(type(m).__name__ == "FusedLoraLinear" for m in model.modules()) == fused


def test_train_sft_in_bf16_runs_the_fused_path_and_saves_fp32_adapters(tmp_path, monkeypatch):
    """`train sft --precision bf16 --method lora` on neat-packed stories260K: every adapted layer goes
    through the fused node (counted), the loss falls, and the adapter is saved in fp32."""
    import json

    from conftest import ok, shared_path
    from safetensors.torch import load_file

    model = shared_path("models/stories260K")
    calls = []
    apply_fused = lorafused._LoraLinear.apply
    monkeypatch.setattr(lorafused._LoraLinear, "apply", lambda *a: calls.append(a[0].dtype) or apply_fused(*a))
    packed, out = counting_data(tmp_path, model), tmp_path / "out"
    ok(["train", "sft", "-m", model, "-d", packed, "-o", out, "--method", "lora", "--precision", "bf16",
        "--max-steps", "8", "--batch-size", "2", "--grad-accum", "1", "--lr", "5e-3", "--logging-steps", "1", "-q"])
    layers = 7 * 5   # stories260K: 5 layers of q, k, v, o, gate, up, down
    assert len(calls) >= 8 * layers and set(calls) == {torch.bfloat16}
    losses = [e["loss"] for e in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "loss" in e]
    assert losses[-1] < losses[0]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
