"""The chunked linear cross-entropy (shared/train/lossfn.py) over several chunks equals
the plain loss, value and gradients (hidden states, output weights, bias)."""

from __future__ import annotations

import torch


def test_chunked_loss_over_many_chunks_equals_the_plain_loss(monkeypatch):
    from lmforge.shared.train.patches import lossfn

    monkeypatch.setattr(lossfn, "_CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(lossfn, "_CHUNK_MIN_ROWS", 3)   # 37 tokens in 13 chunks, the last one short
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    chunked = lossfn.linear_cross_entropy(hidden, weight, bias, targets)
    grads = torch.autograd.grad(chunked * 0.5, (hidden, weight, bias))
    plain = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, targets, reduction="sum")
    expected = torch.autograd.grad(plain * 0.5, (hidden, weight, bias))
    assert torch.allclose(chunked, plain, atol=1e-4)
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, atol=1e-5)


def test_chunked_loss_with_bf16_weights_matches_the_models_own_bf16_head(monkeypatch):
    """A bf16 output layer (a bf16 base under LoRA): logits in bf16 upcast for the loss, as
    transformers computes them; no fp32 copy of the weights, gradients back in bf16."""
    from lmforge.shared.train.patches import lossfn

    monkeypatch.setattr(lossfn, "_CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(lossfn, "_CHUNK_MIN_ROWS", 3)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(50, 16, generator=g).bfloat16()          # frozen, as under LoRA
    targets = torch.randint(0, 50, (37,), generator=g)
    chunked = lossfn.linear_cross_entropy(hidden, weight, None, targets)
    (grad,) = torch.autograd.grad(chunked, (hidden,))
    plain = torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")
    (want,) = torch.autograd.grad(plain, (hidden,))
    assert chunked.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(chunked, plain, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_per_row_log_probs_over_many_chunks_equal_log_softmax(monkeypatch):
    """lossfn.linear_logprobs (train dpo's forward): per-row log-probabilities over several chunks,
    and their gradients under per-row weights (hidden states from the forward pass; output weights
    and bias recomputed in backward), equal log_softmax over the full logits."""
    from lmforge.shared.train.patches import lossfn

    monkeypatch.setattr(lossfn, "_CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(lossfn, "_CHUNK_MIN_ROWS", 3)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    upstream = torch.randn(37, generator=g)   # as a DPO loss weighs each row differently
    got = lossfn.linear_logprobs(hidden, weight, bias, targets)
    grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight, bias))
    plain = torch.log_softmax(hidden @ weight.T + bias, -1).gather(1, targets[:, None]).squeeze(1)
    expected = torch.autograd.grad((plain * upstream).sum(), (hidden, weight, bias))
    assert got.dtype == torch.float32 and torch.allclose(got, plain, atol=1e-5)
    for mine, want in zip(grads, expected):
        assert torch.allclose(mine, want, atol=1e-5)
    frozen = lossfn.linear_logprobs(hidden, weight.detach(), None, targets)   # a frozen head (LoRA): no recompute
    (grad_h,) = torch.autograd.grad(frozen.sum(), (hidden,))
    plain = torch.log_softmax(hidden @ weight.detach().T, -1).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(grad_h, torch.autograd.grad(plain.sum(), (hidden,))[0], atol=1e-5)
