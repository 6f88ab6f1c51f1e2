"""Preference training: reward models (`train rm`) and DPO-style losses (`train dpo`).

Reward model: the base model (LoRA, or full/freeze) plus a value head, a linear map from the
last hidden state to a scalar. A pair scores r_c (chosen) and r_r (rejected) at the last token
of each side (the EOS); the loss is -log sigmoid(r_c - r_r). Saved as the adapter (or model)
plus value_head.safetensors in one directory, which `train ppo` and `eval rm` load.

DPO family (`--loss`):
- sigmoid, ipo, hinge: TRL's DPOTrainer. With LoRA the reference model is the same weights with
  the adapter switched off (no second copy); with full tuning TRL keeps a frozen copy, or
  `--precompute-ref` computes reference log-probs once before training instead.
- kto: TRL's KTOTrainer on KTO-labelled data (desirable / undesirable answers), images too.
- sigmoid, ipo, hinge, kto, orpo, simpo: lmforge's forward (completion_logps) where it applies: the
  output layer only at the positions that predict a completion token, in chunks.
- orpo, simpo: reference-free, written here (TRL has them only in `trl.experimental`, built
  around raw text). With p_c, p_r the mean per-token log-probs of the chosen/rejected answers:
      ORPO   loss = -p_c + beta * -log sigmoid(log odds(p_c) - log odds(p_r)),
             log odds(p) = p - log(1 - exp(p))                     (beta is the paper's lambda)
      SimPO  loss = -log sigmoid(beta * (p_c - p_r) - gamma)     (gamma: --simpo-gamma)
- `--ftx GAMMA` (DPO-ftx, the seed's Eq. 8) adds GAMMA x the SFT loss on the chosen answer
  (mean negative log-likelihood per token), logged as sft_loss.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, cast

import torch
import torch.nn.functional as F
from lmforge.shared.data import modalities
from lmforge.shared.data.collate import PairCollator
from lmforge.shared.model.value import VISION_INPUTS, ValueModel
from lmforge.shared.train.patches.lossfn import plain_head

IGNORE = -100
DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def stats_trainer_class():
    from transformers import Trainer

    class StatsTrainer(Trainer):
        """A Trainer whose compute_loss records extra figures (accuracy, margins, ...) per batch;
        each log line carries their means since the last one, prefixed eval_ during evaluation."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._stats: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}

        def record(self, model, figures) -> None:
            stats = self._stats["train" if model.training else "eval"]
            for key, value in figures:
                stats.setdefault(key, []).append(float(value.detach()))

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = cast(torch.Tensor, self.compute_loss(model, inputs))  # a tensor: no return_outputs
            return loss.detach(), None, None

        def log(self, logs, start_time=None):
            mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
            prefix = "eval_" if mode == "eval" else ""
            for key, values in self._stats[mode].items():
                if values:
                    logs[prefix + key] = sum(values) / len(values)
            self._stats[mode] = {}
            super().log(logs, start_time)

    return StatsTrainer


def build_rm_trainer(o, model, tokenizer, args, data, eval_data):
    from lmforge.shared.train.patches.preference import reward_trainer_class

    model = ValueModel(model)
    for p in model.head.parameters():
        p.requires_grad_(True)
    collator: Any = PairCollator(tokenizer.pad_token_id or 0)
    media = modalities.of_packed(data)
    if media is not None:   # the prompts' media (images), processed per batch
        collator = media.pair_collator(collator, o.model, model.causal, tokenizer, data)
    args.remove_unused_columns = False
    trainer = reward_trainer_class()(model=model, args=args, train_dataset=data.dataset,
                                      eval_dataset=eval_data.dataset if eval_data else None,
                                      data_collator=collator)
    return trainer, collator


# ----------------------------------------------------------------------------- DPO family

def completion_logps(model, inputs: dict, autocast=nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a preference batch: the summed log-probabilities of its completion tokens, and
    their count. The body runs once; the output layer and softmax run only at the positions that
    predict a completion token, in chunks (lossfn.linear_logprobs): no batch x length x vocabulary
    logits, and nothing computed for prompt or padding positions. `autocast`: the trainer's
    mixed-precision context for the body (the output layer computes in its weights' precision)."""
    from lmforge.shared.train.patches.lossfn import linear_logprobs

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = causal.get_output_embeddings()
    body = causal.base_model   # the decoder (base_model_prefix); a VLM's whole multimodal body
    images = {k: inputs[k] for k in VISION_INPUTS if k in inputs}
    ids = inputs["input_ids"]
    with autocast():
        hidden = body(input_ids=ids, attention_mask=inputs["attention_mask"], use_cache=False,
                      **images).last_hidden_state
    scored = inputs["completion_mask"][:, 1:].bool()           # position t predicts token t + 1
    token_logps = linear_logprobs(hidden[:, :-1][scored], head.weight, head.bias, ids[:, 1:][scored])
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(scored)[scored]
    sums = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device).index_add(0, rows, token_logps)
    return sums, scored.sum(1)


@contextmanager
def reference_of(trainer):
    """The reference model of a TRL preference trainer, under no_grad: the policy with its adapter
    off (or TRL's "ref" copy of an adapter it was given) for LoRA, else TRL's frozen copy."""
    from peft import PeftModel
    from trl.trainer.utils import use_adapter

    with torch.no_grad():
        if isinstance(trainer.model, PeftModel) and trainer.ref_model is None:
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                yield unwrapped
        else:
            yield trainer.accelerator.unwrap_model(trainer.ref_model)


def lean_applies(trainer, model) -> bool:
    """completion_logps calls the model's body and output layer itself: only for a plain output
    layer (lossfn.plain_head) whose logits are not scaled after it, in one process without
    DeepSpeed or FSDP (whose wrappers it would bypass)."""
    from lmforge.shared.model.archrules import logits_scaled

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (plain_head(model) is not None and not logits_scaled(causal.config) and trainer.accelerator.num_processes == 1
            and not trainer.is_deepspeed_enabled and not trainer.is_fsdp_enabled)


def dpo_loss(loss: str, beta: float, chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected):
    """Per pair, TRL's definitions: sigmoid -log sigmoid(beta delta), hinge relu(1 - beta delta),
    with delta = (c - c_ref) - (r - r_ref) on summed log-probs; ipo on per-token means:
    ((c - c_ref)/|c| - (r - r_ref)/|r| - 1/(2 beta))^2."""
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss == "hinge":
        return torch.relu(1 - beta * delta)
    ipo = (chosen - ref_chosen) / n_chosen.clamp(min=1) - (rejected - ref_rejected) / n_rejected.clamp(min=1)
    return (ipo - 1 / (2 * beta)) ** 2


class TokenCounter:
    """Counts real tokens passing through a TRL collator (for tokens/s)."""

    def __init__(self, collate):
        self.collate = collate
        self.tokens = 0
        self.counts: list[int] = []

    def __call__(self, rows):
        batch = self.collate(rows)
        mask = batch.get("attention_mask")
        n = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        self.tokens += n
        self.counts.append(n)
        return batch


def kl_view(batch: dict) -> dict:
    """A KTO batch's KL rows (each prompt with a neighbour's answer) as a batch of their own: the
    same images, their own token types."""
    view = {k: v for k, v in batch.items() if k in VISION_INPUTS}
    for name in ("mm_token_type_ids", "token_type_ids"):
        if "KL_" + name in batch:
            view[name] = batch["KL_" + name]
    view.update(input_ids=batch["KL_input_ids"], attention_mask=batch["KL_attention_mask"],
                completion_mask=batch["KL_completion_mask"])
    return view


def _ref_free_trainer_class():
    class RefFreeTrainer(stats_trainer_class()):  # type: ignore[misc]  # made at run time (transformers loads lazily)
        """ORPO and SimPO: preference losses without a reference model."""

        def __init__(self, *args, loss: str, beta: float, gamma: float, ftx: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_name, self.beta, self.gamma, self.ftx = loss, beta, gamma, ftx

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            unwrapped = self.accelerator.unwrap_model(model)
            if getattr(self, "cp_layout", None) is not None:   # each process holds a shard of the rows
                from lmforge.shared.train.contextpar import stage as context_parallel

                sums, counts = context_parallel.policy_logps(self, model, inputs)
                mean_logps = sums / counts.clamp(min=1)
            elif lean_applies(self, unwrapped):
                sums, counts = completion_logps(unwrapped, inputs, self.accelerator.autocast)
                mean_logps = sums / counts.clamp(min=1)   # p: mean per-token log-prob
            else:   # the model's own output layer (quantized or adapted, soft-capped, several processes)
                ids, mask = inputs["input_ids"], inputs["completion_mask"]
                images = {k: inputs[k] for k in VISION_INPUTS if k in inputs}   # the image modality's batch
                logits = model(input_ids=ids, attention_mask=inputs["attention_mask"], use_cache=False,
                               **images).logits[:, :-1]
                targets, keep = ids[:, 1:], mask[:, 1:].float()
                token_logps = torch.log_softmax(logits.float(), dim=-1).gather(2, targets[..., None]).squeeze(-1)
                mean_logps = (token_logps * keep).sum(1) / keep.sum(1).clamp(min=1)
            p_c, p_r = mean_logps.chunk(2)
            nll = -p_c.mean()
            if self.loss_name == "orpo":
                # log odds(p) = log(p / (1 - p)) on probabilities exp(p_c), exp(p_r)
                log_odds = (p_c - p_r) - (torch.log1p(-torch.exp(p_c).clamp(max=1 - 1e-6)) -
                                          torch.log1p(-torch.exp(p_r).clamp(max=1 - 1e-6)))
                preference = -F.logsigmoid(log_odds)
                loss = nll + self.beta * preference.mean()
                chosen_reward, rejected_reward = self.beta * p_c.detach(), self.beta * p_r.detach()
            else:  # simpo
                margin = self.beta * (p_c - p_r) - self.gamma
                loss = -F.logsigmoid(margin).mean() + self.ftx * nll
                chosen_reward, rejected_reward = self.beta * p_c.detach(), self.beta * p_r.detach()
            self.record(model, (("rewards/chosen", chosen_reward.mean()), ("rewards/rejected", rejected_reward.mean()),
                                ("rewards/accuracies", (chosen_reward > rejected_reward).float().mean()),
                                ("rewards/margins", (chosen_reward - rejected_reward).mean()), ("sft_loss", nll)))
            return (loss, {}) if return_outputs else loss

    return RefFreeTrainer


def build_dpo_trainer(o, model, tokenizer, args, data, eval_data):
    """The trainer builder of `train dpo --loss ...` (hfstage.py runs it)."""
    from lmforge.shared.train.patches.preference import dpo_trainer_class, kto_trainer_class

    media = modalities.of_packed(data)
    loss = o.loss
    beta, ftx = o.strength, o.ftx
    kwargs = {k: v for k, v in args.to_dict().items() if k in _init_fields(type(args))}
    if loss in DPO_LOSSES:
        from trl import DPOConfig

        config = DPOConfig(**kwargs, beta=beta, loss_type=[loss, "sft"] if ftx else [loss],
                           loss_weights=[1.0, ftx] if ftx else None, max_length=None,
                           precompute_ref_log_probs=o.precompute_ref)
        trainer = dpo_trainer_class()(model=model, args=config, train_dataset=data.dataset,
                                       eval_dataset=eval_data.dataset if eval_data else None,
                                       processing_class=tokenizer, ftx=ftx)
    elif loss == "kto":
        from trl import KTOConfig

        kwargs["train_sampling_strategy"] = "sequential"
        kto_config = KTOConfig(**kwargs, beta=beta, max_length=None,
                               desirable_weight=o.desirable_weight,
                               undesirable_weight=o.undesirable_weight)
        trainer = kto_trainer_class()(model=model, args=kto_config, train_dataset=data.dataset,
                                       eval_dataset=eval_data.dataset if eval_data else None,
                                       processing_class=tokenizer)
    else:
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        collate: Any = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id or 0)
        if media is not None:   # the prompts' media (images), processed per batch
            collate = media.pair_collator(collate, o.model, model, tokenizer, data)
        args.remove_unused_columns = False
        counter = TokenCounter(collate)
        trainer = _ref_free_trainer_class()(model=model, args=args, train_dataset=data.dataset,
                                            eval_dataset=eval_data.dataset if eval_data else None,
                                            data_collator=counter, loss=loss, beta=beta,
                                            gamma=o.simpo_gamma, ftx=ftx)
        return trainer, counter
    pairs: Any = trainer.data_collator
    if media is not None:   # the prompts' media (images), processed per batch
        pairs = media.pair_collator(pairs, o.model, model, tokenizer, data, paired=loss != "kto")
    counter = TokenCounter(pairs)
    trainer.data_collator = counter
    return trainer, counter


def _init_fields(cls) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls) if f.init}
