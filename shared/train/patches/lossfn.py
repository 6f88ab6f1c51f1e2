"""A memory-lean causal-LM loss: the output layer and cross-entropy computed together, in chunks.

The usual loss materialises logits for every token (tokens x vocabulary floats), their softmax
and their gradient: for a 49k-150k vocabulary that is the largest tensor of a small model's
training step. Here the output layer is bypassed in the forward pass (it returns the hidden
states) and the loss function computes, chunk by chunk and only for tokens that have a label:

    logits = h W^T (+ b)          loss_i = logsumexp(logits_i) - logits_i[y_i]
    dL/dlogits = softmax(logits) - onehot(y)
    dL/dh = dL/dlogits W          dL/dW = dL/dlogits^T h

The gradients are computed in the forward pass (they are cheap once the chunk's softmax is
there) and handed back in backward, so no chunk's logits outlive its iteration. Softmax and
gradients in fp32 (logits computed in the output layer's precision, as the model's own head does);
results equal the standard loss within rounding (tested, fp32 and bf16). Not used with DeepSpeed
ZeRO-3 (which only gathers the output weights inside the layer's own forward) nor for models
with logit soft-capping.

The model's output layer is swapped for a stand-in and its `loss_function` (a property of
transformers' PreTrainedModel, kept in `_loss_function`) replaced; both are put back before the
model is saved. Checked against transformers 5.0 - 5.23.
"""

from __future__ import annotations

SEAMS = [
    ("transformers.PreTrainedModel._loss_function", "attribute", None),
]

from collections.abc import Callable

import torch

IGNORE = -100
_CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MiB of fp32)
# ...but at least this many tokens per chunk: each chunk reads the whole output matrix twice (logits,
# grad of h) and, when it trains, writes its gradient; with few rows that traffic, not arithmetic,
# sets the pace (150k vocabulary: 55-row chunks ran 2x slower than the plain loss on a CPU;
# 256 rows, 148 MiB of logits, is within 1.3x of it: tests/bench/RESULTS.md, bench:loss)
_CHUNK_MIN_ROWS = 256


def _compute_weight(weight: torch.Tensor) -> torch.Tensor:
    """The output matrix as the logits are computed with: half-precision weights (a bf16 base under
    LoRA) as they are, as the model's own head does (no fp32 copy of the matrix); others in fp32."""
    return weight if weight.dtype in (torch.bfloat16, torch.float16) else weight.float()


def _chunk_logits(hidden, w, bias, targets):
    """(start, hidden rows in w's dtype, their targets, their fp32 logits), one chunk at a time."""
    rows = max(_CHUNK_MIN_ROWS, _CHUNK_ELEMENTS // w.shape[0])
    for start in range(0, hidden.shape[0], rows):
        h = hidden[start:start + rows].to(w.dtype)
        logits = (h @ w.T).float()
        if bias is not None:
            logits += bias.float()
        yield start, h, targets[start:start + rows], logits


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        w = _compute_weight(weight)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(w, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start, h, t, logits in _chunk_logits(hidden, w, bias, targets):
            lse = torch.logsumexp(logits, dim=1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()        # softmax, in place
            probs[torch.arange(len(t), device=t.device), t] -= 1.0  # minus the one-hot target
            if grad_h is not None:
                grad_h[start:start + len(t)] = (probs.to(w.dtype) @ w).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(probs.T, h.float())
            if grad_b is not None:
                grad_b += probs.sum(0)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b)))
        ctx.flags = (need_h, need_w, need_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        need_h, need_w, need_b = ctx.flags
        return (grad_h * grad_out if need_h else None,
                (grad_w * grad_out).to(ctx.dtypes[0]) if need_w else None,
                (grad_b * grad_out).to(ctx.dtypes[1]) if need_b else None,
                None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `targets` (no ignored rows)."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets)


class HiddenHead(torch.nn.Module):
    """Stands in for the output layer during training: passes hidden states through, keeping the
    real layer's parameters (so state dicts, weight tying and optimizers see the same tensors)."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.weight = head.weight
        self.bias = head.bias
        self.original = [head]  # a list: not registered as a submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def install(model) -> Callable[[], None] | None:
    """Switch `model` (a causal LM, possibly PEFT-wrapped) to the chunked loss for training.

    Returns a function that restores the original output layer and loss, or None when the model
    is not a candidate (no plain linear output layer, logit soft-capping)."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = plain_head(causal)
    if head is None:   # quantized or adapted output layers, soft-capped logits: the standard loss
        return None
    stand_in = HiddenHead(head)
    causal.set_output_embeddings(stand_in)

    def loss_fn(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=IGNORE,
                shift_labels=None, **kwargs):
        hidden = logits  # the stand-in head passed the hidden states through
        if shift_labels is None:
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        flat = hidden.reshape(-1, hidden.shape[-1])
        targets = shift_labels.reshape(-1).to(flat.device)
        keep = targets != ignore_index
        # the real layer's tensors, as they are now: under FSDP2 they are the whole weights only while
        # the model computes, set on the layer FSDP knows (the stand-in keeps the sharded parameter)
        total = linear_cross_entropy(flat[keep], head.weight, head.bias, targets[keep])
        if num_items_in_batch is None:
            return total / keep.sum().clamp(min=1)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    causal.loss_function = loss_fn

    def restore() -> None:
        causal.set_output_embeddings(head)
        if hasattr(causal, "_loss_function"):
            del causal._loss_function

    return restore


class _LinearLogProbs(torch.autograd.Function):
    """Per-row log-probability of the target under softmax(hidden @ weight.T + bias), in chunks.

    d logp_i / d h_i = W[y_i] - softmax_i W is computed in the forward pass (cheap once the chunk's
    softmax is there) and scaled by the upstream gradient in backward; the output layer's own
    gradient, needed only when it trains (full tuning), is recomputed chunk by chunk in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        w = _compute_weight(weight)
        need_h = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start, _, t, logits in _chunk_logits(hidden, w, bias, targets):
            lse = torch.logsumexp(logits, dim=1)
            out[start:start + len(t)] = logits.gather(1, t[:, None]).squeeze(1) - lse
            if grad_h is not None:
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(t), device=t.device), t] -= 1.0   # softmax - onehot = -d logp / d logits
                grad_h[start:start + len(t)] = (probs.to(w.dtype) @ w).neg_().to(hidden.dtype)
        ctx.save_for_backward(grad_h if grad_h is not None else torch.empty(0), hidden, weight,
                              bias if bias is not None else torch.empty(0), targets)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_w = grad_b = None
        if need_w or (need_b and ctx.has_bias):
            w = _compute_weight(weight)
            acc_w = torch.zeros_like(w, dtype=torch.float32)
            acc_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
            for start, h, t, logits in _chunk_logits(hidden, w, bias if ctx.has_bias else None, targets):
                probs = torch.softmax(logits, dim=1)
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                g = probs.mul_(-grad_out[start:start + len(t), None].float())   # d loss / d logits
                acc_w.addmm_(g.T, h.float())
                acc_b += g.sum(0)
            grad_w = acc_w.to(weight.dtype) if need_w else None
            grad_b = acc_b.to(bias.dtype) if need_b and ctx.has_bias else None
        return (grad_h * grad_out[:, None].to(grad_h.dtype) if need_h else None, grad_w, grad_b, None)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    targets: torch.Tensor) -> torch.Tensor:
    """log softmax(hidden @ weight.T (+ bias))[target] per row, fp32, without materialising the
    logits of more than one chunk of rows."""
    return _LinearLogProbs.apply(hidden, weight, bias, targets)


def plain_head(model) -> torch.nn.Linear | None:
    """The output layer of a causal LM (PEFT-wrapped or not) when the chunked functions apply to it:
    a plain linear layer (not quantized, not adapted) and no logit soft-capping."""
    from lmforge.shared.model import archrules

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or not archrules.chunked_loss_exact(causal.config):
        return None
    return head
