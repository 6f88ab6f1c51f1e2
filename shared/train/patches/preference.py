"""The Trainer's and TRL's private hooks that lmforge's reward-model and preference trainers override.

- Reward models (`train rm`): `_save` and `_load_from_checkpoint` write and read the value head
  beside the adapter (or model), so a checkpoint resumes with it; `_prepare_inputs` is called by
  the stats trainer's evaluation step.
- DPO (`train dpo --loss sigmoid|ipo|hinge`): `_prepare_dataset` (the data is tokenized already),
  `_set_signature_columns_if_needed` (the rows' images reach the collator), `_compute_loss`
  (lmforge's forward: the output layer only where a completion token is predicted).
- KTO (`--loss kto`): the same three, the dataset shuffled once by the seed (TRL reads KTO batches
  in order, each answer paired with its neighbour's for the KL term).
- `_metrics`, `_total_train_tokens`, `_signature_columns`: TRL's own records, read and extended.

Checked against transformers 5.0 - 5.23 and TRL 1.16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SEAMS: list[tuple[str, str, Any]] = [
    ("transformers.Trainer._save", "override", ("self", "output_dir", "state_dict")),
    ("transformers.Trainer._load_from_checkpoint", "override", ("self", "resume_from_checkpoint", "model")),
    ("transformers.Trainer._prepare_inputs", "call", ("self", "inputs")),
    ("transformers.Trainer._set_signature_columns_if_needed", "override", ("self",)),
    ("trl.DPOTrainer._prepare_dataset", "override", ("self", "dataset", "processing_class", "args", "dataset_name")),
    ("trl.DPOTrainer._compute_loss", "override", ("self", "model", "inputs", "return_outputs")),
    ("trl.KTOTrainer._prepare_dataset", "override", ("self", "dataset", "processing_class", "args", "dataset_name")),
    ("trl.KTOTrainer._compute_loss", "override", ("self", "model", "inputs", "return_outputs")),
    ("trl.DPOTrainer._metrics", "attribute", None),
    ("trl.DPOTrainer._total_train_tokens", "attribute", None),
    ("transformers.Trainer._signature_columns", "attribute", None),
]


def reward_trainer_class():
    """The reward model's trainer: a pairwise loss on value-head scores (made at run time)."""
    from lmforge.shared.model.value import HEAD_FILE, save_value_model
    from lmforge.shared.train.preference import stats_trainer_class

    class RewardTrainer(stats_trainer_class()):  # type: ignore[misc]  # made at run time (transformers loads lazily)
        """Pairwise loss on value-head scores; logs accuracy, margin and mean scores."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            scores = model(**inputs)
            chosen, rejected = scores.chunk(2)
            loss = -F.logsigmoid(chosen - rejected).mean()
            self.record(model, (("accuracy", (chosen > rejected).float().mean()), ("margin", (chosen - rejected).mean()),
                                ("score_chosen", chosen.mean()), ("score_rejected", rejected.mean())))
            return (loss, {"chosen": chosen, "rejected": rejected}) if return_outputs else loss

        def _save(self, output_dir=None, state_dict=None):
            output_dir = output_dir or self.args.output_dir
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            save_value_model(self.accelerator.unwrap_model(self.model), output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            model = self.accelerator.unwrap_model(model or self.model)
            from safetensors.torch import load_file

            directory = Path(resume_from_checkpoint)
            if (directory / "adapter_model.safetensors").exists():
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(model.causal, load_file(str(directory / "adapter_model.safetensors")))
            else:
                from transformers.trainer_utils import load_sharded_checkpoint

                load_sharded_checkpoint(model.causal, str(directory), strict=False) if not (
                    directory / "model.safetensors").exists() else model.causal.load_state_dict(
                    load_file(str(directory / "model.safetensors")), strict=False)
            model.head.load_state_dict(load_file(str(directory / HEAD_FILE)))

    return RewardTrainer


def dpo_trainer_class():
    """TRL's DPOTrainer on packed pairs, with lmforge's forward where it applies (made at run time)."""
    from lmforge.shared.train.preference import DPO_LOSSES, completion_logps, dpo_loss, lean_applies, reference_of

    from trl import DPOTrainer

    class PackedDPOTrainer(DPOTrainer):
        """TRL's DPO on data `lmforge data pack --stage dpo` already tokenized (same column names)."""

        def __init__(self, *args, ftx: float = 0.0, lean: bool = True, **kwargs):
            self._ftx = ftx
            super().__init__(*args, **kwargs)
            # lmforge's own forward for the losses it offers (sigmoid, ipo, hinge; + sft for --ftx): TRL's
            # fused output layer also computes entropy, mean logits and top-1 for its metrics, over every
            # position, in fp32 on a CPU (measured: 0.68-0.74x LLaMA-Factory's pairs/s with it)
            self._lean = (lean and lean_applies(self, self.model) and not self.aux_loss_enabled
                          and self.ld_alpha is None and self.f_divergence_type == "reverse_kl"
                          and set(self.loss_types) <= {*DPO_LOSSES, "sft"})

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # prompt_ids / chosen_ids / rejected_ids, truncated at pack time

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if self._signature_columns is not None and "prompt_images" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "prompt_images"]   # VisionPairs reads them

        def _compute_loss(self, model, inputs, return_outputs):
            if (self._lean or getattr(self, "cp_layout", None) is not None) and not return_outputs:
                return self._lean_loss(model, inputs)
            result = super()._compute_loss(model, inputs, return_outputs)
            if self._ftx:  # log the SFT term: mean negative log-likelihood per chosen token
                assert self.model is not None  # set from __init__ on
                mode = "train" if self.model.training else "eval"
                chosen_mask = inputs["completion_mask"][..., 1:].chunk(2, dim=0)[0]
                summed = self._metrics[mode]["logps/chosen"][-1] * chosen_mask.shape[0]
                self._metrics[mode]["sft_loss"].append(-summed / max(int(chosen_mask.sum()), 1))
            return result

        def _lean_loss(self, model, inputs):
            assert self.model is not None  # set from __init__ on
            mode = "train" if self.model.training else "eval"
            autocast = self.accelerator.autocast   # (the wrapped forward it bypasses would apply it)
            split = getattr(self, "cp_layout", None) is not None   # each process holds a shard of the rows
            if split:
                from lmforge.shared.train.contextpar import stage as context_parallel

                logps, counts = context_parallel.policy_logps(self, model, inputs)
            else:
                logps, counts = completion_logps(self.accelerator.unwrap_model(model), inputs, autocast)
            chosen, rejected = logps.chunk(2)
            n_chosen, n_rejected = counts.chunk(2)
            if self.precompute_ref_logps:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                with reference_of(self) as ref:
                    ref_logps = context_parallel.reference_logps(ref, self, inputs) if split \
                        else completion_logps(ref, inputs, autocast)[0]
                ref_chosen, ref_rejected = ref_logps.chunk(2)
            loss = torch.zeros((), device=logps.device)
            sft = -chosen.sum() / n_chosen.sum().clamp(min=1)   # mean negative log-likelihood per chosen token
            for name, weight in zip(self.loss_types, self.loss_weights):
                term = sft if name == "sft" else dpo_loss(name, self.beta, chosen, rejected, ref_chosen,
                                                          ref_rejected, n_chosen, n_rejected).mean()
                loss = loss + weight * term
            chosen_rewards = self.beta * (chosen - ref_chosen).detach()
            rejected_rewards = self.beta * (rejected - ref_rejected).detach()
            if mode == "train":
                self._total_train_tokens += int(inputs["row_tokens"] if split else inputs["attention_mask"].sum())
            metrics = self._metrics[mode]
            metrics["num_tokens"] = [self._total_train_tokens]
            for key, value in (("rewards/chosen", chosen_rewards.mean()), ("rewards/rejected", rejected_rewards.mean()),
                               ("rewards/accuracies", (chosen_rewards > rejected_rewards).float().mean()),
                               ("rewards/margins", (chosen_rewards - rejected_rewards).mean()),
                               ("logps/chosen", chosen.detach().mean()), ("logps/rejected", rejected.detach().mean())):
                metrics[key].append(float(value))
            if self._ftx:
                metrics["sft_loss"].append(float(sft.detach()))
            return loss

    return PackedDPOTrainer


def kto_trainer_class():
    """TRL's KTOTrainer on packed answers, with lmforge's forward where it applies (made at run time)."""
    from lmforge.shared.train.preference import completion_logps, kl_view, lean_applies, reference_of

    from trl import KTOTrainer

    class PackedKTOTrainer(KTOTrainer):
        """TRL's KTO on data `lmforge data pack --stage kto` already tokenized, with lmforge's forward
        (completion_logps) where it applies, as for DPO."""

        def __init__(self, *args, lean: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self._lean = (lean and lean_applies(self, self.model) and not self.aux_loss_enabled
                          and self.loss_type in ("kto", "apo_zero_unpaired"))

        def _compute_loss(self, model, inputs, return_outputs):
            if not self._lean or return_outputs:
                return super()._compute_loss(model, inputs, return_outputs)
            assert self.model is not None  # set from __init__ on
            mode = "train" if self.model.training else "eval"
            autocast, policy = self.accelerator.autocast, self.accelerator.unwrap_model(model)
            kl_rows = kl_view(inputs) if self.calculate_KL else None
            if kl_rows is not None:
                with torch.no_grad():
                    kl_logps = completion_logps(policy, kl_rows, autocast)[0]
            logps = completion_logps(policy, inputs, autocast)[0]
            if self.precompute_ref_logps:
                ref_logps, ref_kl_logps = inputs["ref_logps"], inputs.get("ref_KL_logps")
            else:
                with reference_of(self) as ref:
                    ref_logps = completion_logps(ref, inputs, autocast)[0]
                    ref_kl_logps = completion_logps(ref, kl_rows, autocast)[0] if kl_rows else None
            # KTO (TRL's maths): z = mean KL(policy || reference) over the mismatched pairs, >= 0, no gradient;
            # desirable: 1 - sigmoid(beta (log ratio - z)), undesirable: 1 - sigmoid(beta (z - log ratio))
            kl = ((kl_logps - ref_kl_logps).mean().detach().clamp(min=0) if kl_rows is not None
                  else torch.zeros((), device=logps.device))
            desirable = inputs["label"].to(logps.device).bool()
            ratios = logps - ref_logps.to(logps.device)
            chosen, rejected = ratios[desirable], ratios[~desirable]
            if self.loss_type == "kto":
                chosen_losses = 1 - F.sigmoid(self.beta * (chosen - kl))
                rejected_losses = 1 - F.sigmoid(self.beta * (kl - rejected))
            else:   # apo_zero_unpaired
                chosen_losses = 1 - F.sigmoid(self.beta * chosen)
                rejected_losses = F.sigmoid(self.beta * rejected)
            loss = torch.cat((self.desirable_weight * chosen_losses, self.undesirable_weight * rejected_losses)).nanmean()
            metrics = self._metrics[mode]
            metrics["kl"].append(float(kl))
            if mode == "train":
                self._total_train_tokens += int(inputs["attention_mask"].sum())
            metrics["num_tokens"] = [self._total_train_tokens]
            for name, part, part_logps in (("chosen", chosen, logps[desirable]), ("rejected", rejected, logps[~desirable])):
                if len(part):
                    metrics[f"rewards/{name}"].append(float(self.beta * part.detach().nansum()) / len(part))
                    metrics[f"logps/{name}"].append(float(part_logps.detach().nansum()) / len(part))
            if len(chosen) and len(rejected):
                metrics["rewards/margins"].append(metrics["rewards/chosen"][-1] - metrics["rewards/rejected"][-1])
            return loss

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # KTO pairs each answer with its neighbour's for the KL term, so batches are read in a
            # fixed order (TRL insists): shuffle once, by the seed, instead
            dataset = dataset.shuffle(seed=args.seed).flatten_indices()
            if "response_ids" in dataset.column_names:
                dataset = dataset.rename_column("response_ids", "completion_ids")
            if self.calculate_KL:  # as TRL: mismatched pairs by rotating completions within a batch
                def rotate(examples):
                    examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]
                    return examples

                dataset = dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)
            return dataset

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if self._signature_columns is not None and "prompt_images" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "prompt_images"]   # VisionPairs reads them

    return PackedKTOTrainer
