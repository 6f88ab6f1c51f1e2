"""Reward models: a causal LM with a scalar value head, as `train rm` saves them and `train ppo`
and `eval rm` load them (the adapter or model, plus value_head.safetensors, in one directory)."""

from __future__ import annotations

from pathlib import Path

import torch
from lmforge.shared.core.errors import BadInput
from lmforge.shared.modeldir.weights import HEAD_FILE, save_value_head

__all__ = ["HEAD_FILE", "VISION_INPUTS", "ValueModel", "attach_reward_adapter", "save_value_model"]


# what a vision-language model's batch adds (multimodal.Vision.pixels and .token_types)
VISION_INPUTS = ("pixel_values", "image_grid_thw", "image_sizes", "mm_token_type_ids", "token_type_ids")


class ValueModel(torch.nn.Module):
    """A causal LM's decoder (adapted or not) with a scalar value head on the last hidden state."""

    def __init__(self, causal, head: torch.nn.Linear | None = None):
        super().__init__()
        self.causal = causal
        hidden = causal.config.get_text_config().hidden_size
        self.head = head if head is not None else torch.nn.Linear(hidden, 1)
        if head is None:
            torch.nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
            torch.nn.init.zeros_(self.head.bias)
        self.config = causal.config
        # (hidden, last_index) -> each row's last-token state; context parallelism sets one that
        # reads it from whichever process's shard holds it
        self.picker = None

    def decoder(self):
        inner = self.causal.get_base_model() if hasattr(self.causal, "get_base_model") else self.causal
        return inner.get_decoder()

    def forward(self, input_ids, last_index, position_ids=None, **inputs):
        images = {k: v for k, v in inputs.items() if k in VISION_INPUTS and v is not None}
        if images.get("pixel_values") is not None:
            # a vision-language model with images in the batch: its multimodal body (vision
            # tower, projector, language model), not the language model alone
            inner = self.causal.get_base_model() if hasattr(self.causal, "get_base_model") else self.causal
            hidden = inner.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                 **images).last_hidden_state
        else:
            hidden = self.decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        if self.picker is not None:
            picked = self.picker(hidden, last_index)
        else:
            picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]
        return self.head(picked.to(self.head.weight.dtype)).squeeze(-1)

    def gradient_checkpointing_enable(self, **kwargs):
        self.causal.gradient_checkpointing_enable(**kwargs)

    def enable_input_require_grads(self):
        self.causal.enable_input_require_grads()


def save_value_model(model: ValueModel, directory: str | Path) -> None:
    """The causal LM (or its adapter) and the value head, in one directory."""
    model.causal.save_pretrained(str(directory))
    save_value_head(model.head, directory)


def attach_reward_adapter(model, directory: str | Path, what: str, hint: str) -> None:
    """Load a LoRA reward model as a second adapter ("reward") on `model`, a PEFT model whose
    active adapter is the policy's, and make the policy's adapter active again: one base in
    memory serves both (train ppo, train grpo)."""
    try:
        model.load_adapter(str(directory), adapter_name="reward", is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise BadInput(f"{what}: does not fit the model ({str(exc).splitlines()[0][:200]})", hint) from None
    model.set_adapter("default")
