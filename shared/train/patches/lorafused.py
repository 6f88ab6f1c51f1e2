"""LoRA's adapter path in the base layer's precision, as one autograd node (mixed precision without
autocast).

Over a bf16 (or fp16) base with fp32 adapter weights -- lmforge's `--precision bf16` on a CPU, the
way LLaMA-Factory also loads a bf16 model -- PEFT's `lora.Linear` runs its adapter path in fp32:
every call casts the layer's input to fp32, runs both small products in fp32, scales, adds in fp32
and casts the sum back, and autograd keeps the fp32 copy of the input until backward. That is
a quarter of a LoRA step's time on a CPU and, without gradient checkpointing, an fp32 copy of every
adapted layer's input held through the step.

Here the adapter path runs the way mixed-precision training (autocast) runs it: the adapter weights
stay fp32 masters -- the optimizer updates them in fp32, so small updates are not lost -- and are
rounded to the layer's dtype for the products, inside one autograd Function that

    forward:   h = x A^T;  y = x W^T + b + h (s B)^T                 (in x's dtype)
    backward:  gh = g (s B);  dx = g W + gh A;  dA = gh^T x;  dB = s g^T h

for the frozen base weight W (a plain `nn.Linear`), saving only x and the rank-r h. The adapter weights' gradients
are computed in the low precision and returned in fp32, as under autocast.

It steps aside (PEFT's own forward runs) for everything else: adapters off or merged, several
active adapters, mixed-adapter batches, DoRA and other variants, dropout, adapter biases, weights
in the input's dtype already (nothing to gain), autocast to another dtype than the input's (an fp32
base under autocast), quantized, hooked or trained base layers, and ZeRO-3's partitioned weights.
Under autocast to the input's dtype (a bf16 base with fp32 adapters under bf16 autocast: lmforge's
bf16 on GPUs) it runs: its products are in that dtype already, which is what autocast would do.

The swap replaces PEFT's `lora.Linear.forward` on instances (their class becomes a subclass) and
reads its adapter state (`lora_A`, `lora_B`, `scaling`, `lora_variant`, `merged`, ...) and the base
layer's hooks. Checked against PEFT 0.17 - 0.21.
"""

from __future__ import annotations

SEAMS = [
    ("peft.tuners.lora.layer.Linear.forward", "override", ("self", "x")),
    ("peft.tuners.lora.layer.Linear.scaling", "attribute", None),
    ("peft.tuners.lora.layer.Linear.lora_variant", "attribute", None),
]

import torch
from peft.tuners.lora.layer import Linear

from lmforge.shared.train import checkpointing


class _LoraLinear(torch.autograd.Function):
    """x W^T + b + x A^T (s B)^T for a frozen base weight W (and bias b), in x's dtype.

    Out of place, one product writing the output: the adapter's rank-r path first, the base
    product added onto it last (addmm), so that the output is the base product's own result.
    Selective checkpointing (shared/train/checkpointing.py) keeps exactly that output and recomputes
    the cheap rank-r product; an in-place add onto the base product's output would corrupt the
    output it keeps."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_a, weight_b, scale):
        low = x.dtype
        a, b = weight_a.to(low), (weight_b * scale).to(low)
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ a.t()
        delta = h @ b.t()
        if bias is not None:
            delta += bias
        with checkpointing.keep():   # the output selective checkpointing keeps
            y = torch.addmm(delta, x2, weight.t())
        ctx.save_for_backward(x, h, weight, weight_a, weight_b)
        ctx.scale = scale
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, h, weight, weight_a, weight_b = ctx.saved_tensors
        low = x.dtype
        g2 = grad.reshape(-1, grad.shape[-1]).to(low)
        gh = g2 @ (weight_b * ctx.scale).to(low)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addmm(gh @ weight_a.to(low), g2, weight).view(x.shape)
        grad_a = (gh.t() @ x.reshape(-1, x.shape[-1])).to(weight_a.dtype) if ctx.needs_input_grad[3] else None
        grad_b = (g2.t() @ h).to(weight_b.dtype).mul_(ctx.scale) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_a, grad_b, None


class FusedLoraLinear(Linear):
    """PEFT's `lora.Linear` with the fused path as its forward (a subclass swapped in, so that it
    survives deepcopy -- TRL copies policies for its reference models -- and pickling)."""

    def forward(self, x, *args, **kwargs):
        adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
        if (args or kwargs or adapter is None or self.disable_adapters or self.merged
                or adapter not in self.lora_A or adapter in getattr(self, "lora_variant", {})
                or not isinstance(self.lora_dropout[adapter], torch.nn.Identity)
                or self.lora_B[adapter].bias is not None
                # autocast to another dtype than x's (an fp32 base under autocast): autocast's own arithmetic
                or (torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) != x.dtype)):
            return super().forward(x, *args, **kwargs)
        weight_a, weight_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        base = self.base_layer
        if (type(base) is not torch.nn.Linear or base.weight.requires_grad   # quantized, or a trained base
                or (base.bias is not None and base.bias.requires_grad)
                or base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook")   # offloading hooks
                or base.weight.device != x.device
                or x.dtype == weight_a.dtype or base.weight.dtype != x.dtype or not x.dtype.is_floating_point
                or any(hasattr(w, "ds_id") for w in (weight_a, weight_b, base.weight))):   # ZeRO-3 partitioned
            return super().forward(x, *args, **kwargs)
        return _LoraLinear.apply(x, base.weight, base.bias, weight_a, weight_b, float(self.scaling[adapter]))


def install(model) -> int:
    """Route every PEFT `lora.Linear` of `model` through the fused path (its class swapped for the
    subclass above; PEFT's forward still runs in the cases it steps aside for). Returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is Linear and not getattr(module, "lora_variant", None):   # DoRA & co. keep PEFT's
            module.__class__ = FusedLoraLinear
            count += 1
    return count
