"""Sequence-level quantities over a context-parallel group: what a loss needs from the whole row
when each process holds a shard of it.

Convention (the one that makes DDP's or FSDP's gradient averaging over all W x N processes give
the data-parallel gradient): the objective is the sum of every process's loss, and every collective
is differentiated as such. So

- a token-level loss (pt, sft) is each shard's summed loss over the tokens of the whole batch
  (the Trainer's num_items_in_batch, counted from every process's shift_labels), times the number
  of processes: nothing to add here, the Trainer does it;
- a sequence-level loss (dpo, rm) is computed on every process of the group from the group's
  all-reduced sums (completion_logps, pick), whose backward all-reduces the gradients: each
  process then holds the whole group's loss, and the N copies' gradients add up to it once DDP
  divides by W x N;
- a mixture of experts' load-balancing loss (when the router trains) counts every token of the
  row: its per-expert sums are all-reduced over the group and each process adds 1/N of it.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch

from lmforge.shared.train.contextpar import comm


def completion_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shard: dict,
                     layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a preference batch (shard.shard_pairs), the summed log-probabilities of its
    completion tokens over the whole row, on every process of the group, and their counts.

    `hidden` (rows, Ls, H): this shard's last hidden states; `weight`/`bias`: the output layer.
    Only the positions that predict a completion token go through the output layer, in chunks
    (lossfn.linear_logprobs), as in lmforge's single-process forward."""
    from lmforge.shared.train.patches.lossfn import linear_logprobs

    scored = shard["scored"].to(hidden.device)
    targets = shard["targets"].to(hidden.device)
    token_logps = linear_logprobs(hidden[scored], weight, bias, targets[scored])
    rows = torch.arange(scored.shape[0], device=hidden.device)[:, None].expand_as(scored)[scored]
    local = torch.zeros(scored.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, rows, token_logps)
    return comm.all_reduce_sum(local, layout.group), shard["counts"].to(hidden.device)


def pick(hidden: torch.Tensor, index: torch.Tensor, layout) -> torch.Tensor:
    """hidden (rows, Ls, H) of this shard -> (rows, H): each row's hidden state at `index` (an index
    into the whole row), on every process of the group (a reward model's last-token state)."""
    part = hidden.shape[1]
    local = index.to(hidden.device) - layout.rank * part
    mine = (local >= 0) & (local < part)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    # multiplied rather than skipped: every process's loss must reach its attention layers (their
    # backward talks to the group), even where it holds none of the picked states
    picked = hidden[rows, local.clamp(0, part - 1)] * mine[:, None].to(hidden.dtype)
    return comm.all_reduce_sum(picked, layout.group)


def balancing_loss(layout, gate_logits, num_experts=None, top_k=2, attention_mask=None):
    """transformers' load_balancing_loss_func (Switch Transformer, eqs. 4-6: num_experts x the sum
    over experts of the fraction of routed tokens times the mean router probability, over every
    layer's tokens), with the token sums taken over the whole row (all-reduced over the group),
    divided by N (each of the group's processes adds its share). `attention_mask` (the shard's,
    0 on the padding the shard added) keeps the added tokens out, as the single process never
    had them."""
    if gate_logits is None or not isinstance(gate_logits, tuple):
        return 0
    device = gate_logits[0].device
    tokens = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(num_experts, dtype=torch.float32, device=device)
    count = torch.zeros((), dtype=torch.float32, device=device)
    mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32) if attention_mask is not None else None
    for layer in gate_logits:
        weights = torch.softmax(layer.to(device), dim=-1)
        _, chosen = torch.topk(weights, top_k, dim=-1)
        m = mask if mask is not None else torch.ones(weights.shape[0], dtype=torch.float32, device=device)
        tokens = tokens + torch.zeros_like(tokens).scatter_add_(0, chosen.reshape(-1), m.repeat_interleave(top_k))
        probs = probs + (weights.float() * m[:, None]).sum(0)
        count = count + m.sum()
    totals = torch.cat([tokens, count[None]]).detach()
    torch.distributed.all_reduce(totals, group=layout.group)   # counts: no gradient
    probs = comm.all_reduce_sum(probs, layout.group)
    fraction, mean_prob = totals[:-1] / totals[-1], probs / totals[-1]
    return (fraction * mean_prob).sum() * num_experts / layout.size


_PATCHED: dict[str, object] = {}   # modeling module -> its own load_balancing_loss_func


def _modeling_module(model):
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return sys.modules.get(type(causal).__module__)


def install_router_loss(model, layout) -> None:
    """Point the model's modeling module at balancing_loss (it calls the module-level
    load_balancing_loss_func when output_router_logits is on). Refuses (BadInput) a mixture of
    experts whose balancing loss has another form while its router trains."""
    from lmforge.shared.core.errors import BadInput

    module = _modeling_module(model)
    original = getattr(module, "load_balancing_loss_func", None)
    if module is None or original is None:
        if getattr(model.config, "output_router_logits", False):
            raise BadInput(f"--context-parallel: {model.config.model_type}'s router loss is not supported",
                           "train the adapters only (--method lora), which leaves the router as it is")
        return
    if module.__name__ in _PATCHED:
        return
    if list(inspect.signature(original).parameters)[:4] != ["gate_logits", "num_experts", "top_k", "attention_mask"]:
        raise BadInput(f"--context-parallel: {model.config.model_type}'s load-balancing loss has an unknown form",
                       "train the adapters only (--method lora)")
    _PATCHED[module.__name__] = original
    setattr(module, "load_balancing_loss_func", functools.partial(balancing_loss, layout))


def uninstall_router_loss(model) -> None:
    module = _modeling_module(model)
    if module is not None and module.__name__ in _PATCHED:
        setattr(module, "load_balancing_loss_func", _PATCHED.pop(module.__name__))
