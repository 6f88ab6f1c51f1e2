"""`--checkpointing selective` and `--checkpoint-every N` (shared/train/checkpointing.py).

Selective checkpointing keeps the fused LoRA layers' outputs and the attention kernels' and
recomputes the rest: the gradients must be exactly those without checkpointing, on several
architectures (dense, qk-norm, mixture of experts, sliding window), with neat-packed attention; the
base products must not run twice; and nothing a model's own code may change in place is kept."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from archmatrix import ARCHS, BASE
from conftest import ok, shared_path
from test_lorafused import counting_data
from test_packedattn import batch

from lmforge.shared.core.errors import BadInput
from lmforge.shared.train import checkpointing
from lmforge.shared.train.patches import lorafused, packedattn
from lmforge.shared.core.commands.training import Method
from lmforge.shared.train.methods import apply


def _model(name: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, keys, _ = ARCHS[name]
    if name == "mistral":
        keys = {**keys, "sliding_window": 8}
    config = AutoConfig.for_model(model_type, **{k: v for k, v in {**BASE, "pad_token_id": 3, **keys}.items()
                                                 if v is not None})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    packedattn.install(model)
    model = apply(model, Method(method="lora", lora_rank=4))   # fp32 adapters over the bf16 base
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.05)   # every gradient flows
    assert any(isinstance(m, lorafused.FusedLoraLinear) for m in model.modules())
    return model.train()


def _run(model, inputs, policy: str | None, every: int = 1):
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model)
    if policy:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing.checkpointing_kwargs(policy),
                                            every_n_layers=every)
    with FlopCounterMode(display=False) as flops:
        model(**inputs).loss.backward()
    return flops.get_total_flops(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen3_moe", "mistral"])
def test_selective_gives_the_gradients_without_checkpointing_and_recomputes_no_product(name):
    model = _model(name)
    inputs = batch(model.config.vocab_size)
    flops_off, want = _run(model, inputs, None)
    flops_full, full = _run(model, inputs, "full")
    flops_selective, selective = _run(model, inputs, "selective")
    _, every = _run(model, inputs, "selective", every=2)
    for got in (full, selective, every):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
    # full checkpointing runs the layers' products again; selective only the rank-r adapter ones
    # (rank 4 over a hidden size of 32: a quarter of a layer's products here, 1-3% at real sizes)
    # (a mixture of experts' expert products are not LoRA layers: those run again)
    assert flops_full > 1.15 * flops_off
    assert flops_selective - flops_off < (0.7 if "moe" in name else 0.3) * (flops_full - flops_off)


def test_outputs_a_model_changes_in_place_are_not_kept():
    """PyTorch's selective checkpointing misses an in-place change to a kept 3-D `F.linear` output
    (its `_unsafe_view`); the policy keeps no product it did not compute itself, so the
    gradients stay right."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            y = self.proj(x)
            y.mul_(2.0)             # model code scaling a projection's output in place
            return torch.tanh(y)

    torch.manual_seed(0)
    block, x = Block(), torch.randn(2, 5, 16, requires_grad=True)
    block(x).square().sum().backward()
    want = x.grad.clone()
    x.grad = None
    kwargs = checkpointing.checkpointing_kwargs("selective")
    torch.utils.checkpoint.checkpoint(block, x, **kwargs).square().sum().backward()
    torch.testing.assert_close(x.grad, want)


def test_the_arguments_stay_json_and_survive_copies(tmp_path):
    from transformers import TrainingArguments

    kwargs = checkpointing.checkpointing_kwargs("selective", 2)
    assert kwargs["every_n_layers"] == 2 and kwargs["use_reentrant"] is False
    args = TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing=True,
                             gradient_checkpointing_kwargs=kwargs, use_cpu=True, report_to="none")
    assert json.loads(args.to_json_string())["gradient_checkpointing"] is True   # TensorBoard logs this
    for copied in (copy.deepcopy(kwargs), pickle.loads(pickle.dumps(kwargs))):
        forward, recompute = copied["context_fn"]()
        assert forward is not None and recompute is not None
    assert checkpointing.checkpointing_kwargs("full") == {"use_reentrant": False}


def test_refusals():
    from lmforge.shared.core.commands.train import TrainSFT

    def refused(**kwargs) -> str:
        with pytest.raises(BadInput) as caught:
            TrainSFT.make(model="m", data="d", output=shared_path("."), max_steps=1, **kwargs)
        return str(caught.value)

    assert "--checkpoint-every 2 without gradient checkpointing" in refused(checkpoint_every=2)
    assert "ZeRO-3" in refused(checkpointing="selective", deepspeed="z3")
    assert "Unsloth" in refused(checkpointing="selective", kernels="unsloth")
    assert "at least 1" in refused(gradient_checkpointing=True, checkpoint_every=0)
    assert TrainSFT(model="m", data="d", output=shared_path("."),
                    checkpointing="selective").gradient_checkpointing   # selective turns it on


def test_train_sft_with_selective_checkpointing_every_second_layer(tmp_path):
    model = shared_path("models/stories260K")
    packed, out = counting_data(tmp_path, model), tmp_path / "out"
    ok(["train", "sft", "-m", model, "-d", packed, "-o", out, "--method", "lora", "--precision", "bf16",
        "--checkpointing", "selective", "--checkpoint-every", "2", "--max-steps", "6", "--batch-size", "2",
        "--grad-accum", "1", "--lr", "5e-3", "--logging-steps", "1", "-q"])
    hyper = json.loads((out / "lmforge.json").read_text())["hyperparameters"]
    assert hyper["gradient_checkpointing"] is True
    assert hyper["checkpointing"] == "selective" and hyper["checkpoint_every"] == 2
    losses = [e["loss"] for e in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "loss" in e]
    assert len(losses) >= 5 and losses[-1] < losses[0]
