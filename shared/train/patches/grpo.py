"""TRL's GRPOTrainer on lmforge's packed prompts: the private hooks `train grpo` overrides.

- `_tokenize_prompts`: the prompts' ids come from the packed data (never re-tokenized text); for
  image prompts, each batch's images are processed where the model samples;
- `_calculate_rewards`: the reward spread within groups, and the mean reward, for the record;
- `_generate_and_score_completions`, `_compute_loss`, `_get_per_token_logps_and_entropies`: the
  rows' images follow their prompts through TRL's shuffles and splits (a row number per sample);
- `_save`: with a reward model's adapter on the same base, only the policy's adapter is saved;
- `_metrics`: read to add lmforge's figures to TRL's log lines;
- with tools or an environment, agent/trainer.py's seams: the rollout plugged in as TRL's
  `rollout_func`, generating through `_generate_single_turn`.

Checked against TRL 1.16.
"""

from __future__ import annotations

from pathlib import Path


SEAMS = [
    ("trl.GRPOTrainer._tokenize_prompts", "override", ("self", "prompts")),
    ("trl.GRPOTrainer._calculate_rewards", "override", ("self", "inputs", "prompts", "completions",
                                                         "completion_ids_list")),
    ("trl.GRPOTrainer._generate_and_score_completions", "override", ("self", "inputs")),
    ("trl.GRPOTrainer._compute_loss", "override", ("self", "model", "inputs")),
    ("trl.GRPOTrainer._get_per_token_logps_and_entropies", "override",
     ("self", "model", "input_ids", "attention_mask", "logits_to_keep")),
    ("trl.GRPOTrainer._save", "override", ("self", "output_dir", "state_dict")),
    ("trl.GRPOTrainer._metrics", "attribute", None),
]


def packed_grpo_trainer_class():
    """TRL's GRPOTrainer on lmforge's packed prompts (made at run time: TRL loads lazily)."""
    import torch
    from lmforge.shared.train.agent.trainer import AgentTrainerMixin
    from trl import GRPOTrainer

    class PackedGRPOTrainer(AgentTrainerMixin, GRPOTrainer):
        """GRPOTrainer on packed prompts: the ids come from the data, not from re-tokenizing text.
        The agent mixin keeps each batch's rows for an agent rollout (tools, environments); `closing`
        is called when training ends, however it ends (an environment's process is stopped)."""

        def __init__(self, *args, prompt_ids: dict, counter, images=None, closing=None, **kwargs):
            self.lmforge_closing = closing
            self.lmforge_prompt_ids = prompt_ids
            self.lmforge_counter = counter
            self.lmforge_images = images
            self.lmforge_rows: list[int] | None = None   # the image rows of the batch the model runs on
            self.lmforge_group_std: list[float] = []
            self.lmforge_rewards: list[float] = []
            super().__init__(*args, **kwargs)

        def train(self, *args, **kwargs):
            try:
                return super().train(*args, **kwargs)
            finally:
                if self.lmforge_closing is not None:
                    self.lmforge_closing()

        def _tokenize_prompts(self, prompts: list):
            rows, images = self.lmforge_rows, self.lmforge_images
            if images is not None and rows is not None and len(rows) == len(prompts):
                fields = images.pixels(rows)
                fields.pop("num_images")   # sampling takes the batch's images whole
                ids = images.prompt_ids(rows)
                for x in ids:   # token types per prompt, as lists: TRL left-pads them like the ids
                    for name, types in images.token_types(torch.tensor(x)).items():
                        fields.setdefault(name, []).append(types.tolist())
                return ids, None, fields
            try:
                return [self.lmforge_prompt_ids[p] for p in prompts], None, {}
            except KeyError:  # a prompt that is not in the data: TRL's own path
                return super()._tokenize_prompts(prompts)

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            total = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
            size = int(self.num_generations or 1)
            groups = total.view(-1, size) if total.numel() % size == 0 else None
            if groups is not None:
                mode = "train" if getattr(self.model, "training", True) else "eval"
                spread = float(groups.std(dim=1).mean()) if size > 1 else 0.0
                self._metrics[mode]["reward_group_std"].append(spread)
                self.lmforge_rewards.append(float(total.mean()))
            return per_func

        def _generate_and_score_completions(self, inputs):
            if self.lmforge_images is None:
                out = super()._generate_and_score_completions(inputs)
            else:
                self.lmforge_rows = [int(x["lmforge_row"]) for x in inputs]
                try:
                    out = super()._generate_and_score_completions(inputs)
                finally:
                    rows, self.lmforge_rows = self.lmforge_rows, None
                out["lmforge_row"] = torch.tensor(rows)   # shuffled and split with the batch it belongs to
            for key in ("prompt_mask", "completion_mask"):
                if isinstance(out.get(key), torch.Tensor):
                    self.lmforge_counter.tokens += int(out[key].sum())
            return out

        def _compute_loss(self, model, inputs):
            if self.lmforge_images is None or "lmforge_row" not in inputs:
                return super()._compute_loss(model, inputs)
            self.lmforge_rows = inputs["lmforge_row"].tolist()
            try:
                return super()._compute_loss(model, inputs)
            finally:
                self.lmforge_rows = None

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               *args, **kwargs):
            rows, images = self.lmforge_rows, self.lmforge_images
            if images is not None and rows is not None and kwargs.get("pixel_values") is None:
                if len(rows) != input_ids.size(0):
                    raise RuntimeError(f"{input_ids.size(0)} sequences for {len(rows)} image prompts")
                # (the completions hold no image tokens); TRL slices the pixels per chunk by num_images
                kwargs.update(images.inputs(rows, input_ids, counts=True))
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              *args, **kwargs)

        def _save(self, output_dir=None, state_dict=None):
            from peft import PeftModel

            model = self.accelerator.unwrap_model(self.model)
            if isinstance(model, PeftModel) and "reward" in model.peft_config:  # the reward model's, not ours
                directory = Path(str(output_dir or self.args.output_dir))
                directory.mkdir(parents=True, exist_ok=True)
                model.save_pretrained(str(directory), selected_adapters=["default"])
                return
            super()._save(output_dir, state_dict)

        def lmforge_metrics(self) -> dict:
            r = self.lmforge_rewards
            if not r:
                return {}
            k = max(1, len(r) // 10)
            return {"first_reward": round(sum(r[:k]) / k, 4), "final_reward": round(sum(r[-k:]) / k, 4)}

    return PackedGRPOTrainer
