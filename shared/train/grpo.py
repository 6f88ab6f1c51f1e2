"""`train grpo`: online reinforcement learning with verifiable rewards, through TRL's GRPOTrainer.

The set-up, run directory, resume, progress line and record are `train sft`'s (training.run with
this module's trainer builder); methods are the same (LoRA, DoRA, QLoRA with --quant, full, ...).

One GRPO step (TRL's maths, its defaults changed only where a flag says so):
 1. for each of --batch-size prompts, sample G = --num-generations completions (transformers
    generate on the policy, or vLLM colocated on a GPU with --vllm), stopped at the template's
    stop words or --max-new-tokens;
 2. score each completion with every --reward term; r = sum_k w_k r_k (--reward-weights);
 3. advantage A_i = (r_i - mean of its group) / std of its group (--scale-rewards: group, batch
    or none), so no value model is needed;
 4. loss: clipped ratio objective per token, min(rho A, clip(rho, 1-eps, 1+eps_high) A), plus
    beta KL(pi || pi_ref) when --kl-coef > 0 (reference: the model with the adapter switched off,
    no second copy for LoRA), aggregated per --loss-type (grpo, dr_grpo, dapo, ...).

The data is `data pack --stage ppo` output: the prompt ids are used as they are (TRL never
re-tokenizes them), the reference answer (response_ids) is decoded for the rewards.

Images (issue 17): a vision-language model's prompts carry their images (`prompt_images`, image
tokens already expanded at pack time). TRL's own image path wants raw conversations and re-renders
them with the processor, so it stays unused; instead each prompt keeps its row number through TRL's
batch ("lmforge_row"), and the rows' images are processed (pixel values, Qwen's grids, token types)
where the model runs: for sampling (`_tokenize_prompts`), and for every log-prob pass (old policy,
reference, the loss), whose batches TRL may shuffle and split but which keep the row numbers.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.shared.core import log
from lmforge.shared.core.errors import BadInput
from lmforge.shared.train import rewards as rewards_

class TokenCount:
    """Tokens through the model (prompts + completions), for training.py's tokens/s."""

    def __init__(self) -> None:
        self.tokens = 0


def validate(o) -> None:
    """`train grpo` settings (TrainOptions.extra) before anything loads."""
    x = o.extra
    if not x["rewards"]:
        raise BadInput("give at least one --reward", f"e.g. --reward exact; forms: {rewards_.SPEC_FORMS}")
    if x["num_generations"] < 2:
        raise BadInput(f"--num-generations {x['num_generations']}: GRPO compares completions within a group",
                       "use 2 or more")
    if not 0 < x["clip_range"] < 1:
        raise BadInput(f"--clip-range {x['clip_range']:g}: must be in (0, 1)")
    if x["clip_range_high"] is not None and not x["clip_range_high"] > 0:
        raise BadInput(f"--clip-range-high {x['clip_range_high']:g}: must be above 0")
    if x["kl_coef"] < 0:
        raise BadInput(f"--kl-coef {x['kl_coef']:g}: must be >= 0")
    if not x["reward_timeout"] > 0:
        raise BadInput(f"--reward-timeout {x['reward_timeout']:g}: must be above 0 seconds")
    if x["max_new_tokens"] < 1:
        raise BadInput("--max-new-tokens must be at least 1")
    if o.deepspeed or o.fsdp:
        raise BadInput("train grpo runs in one process here: drop --deepspeed/--fsdp")
    if x["vllm"]:
        import importlib.util

        import torch

        if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
            raise BadInput("--vllm needs a CUDA GPU and the vllm package",
                           "pip install 'lmforge[gpu]' on a GPU machine, or drop --vllm (transformers generates)")
    for spec in x["rewards"]:     # cheap checks now: a typo fails before the model loads
        rewards_.parse(spec)
    rewards_.weights(x["reward_weights"], len(x["rewards"]))


def prompts_dataset(data, tokenizer, stop_words: list[str]):
    """Packed ppo rows -> the dataset TRL reads: prompt text (decoded, specials kept), the
    reference answer text (and, for image data, the row number); plus the map from prompt text back
    to its exact ids."""
    import datasets

    ids_by_text: dict[str, list[int]] = {}
    prompts, references = [], []
    has_reference = False
    for row in data.dataset.select_columns([c for c in ("prompt_ids", "response_ids")
                                            if c in data.dataset.column_names]):
        text = tokenizer.decode(row["prompt_ids"], skip_special_tokens=False)
        ids_by_text.setdefault(text, list(row["prompt_ids"]))
        reference = tokenizer.decode(row.get("response_ids") or [], skip_special_tokens=True)
        for stop in stop_words:
            reference = reference.replace(stop, "")
        reference = reference.strip()
        has_reference = has_reference or bool(reference)
        prompts.append(text)
        references.append(reference or None)
    # the row number reaches the rewards: two image prompts may read the same (the row tells them
    # apart), and a reward's error names the row
    columns: dict = {"prompt": prompts, "reference": references, "lmforge_row": list(range(len(prompts)))}
    return datasets.Dataset.from_dict(columns), ids_by_text, has_reference


def _trainer_class():
    import torch
    from trl import GRPOTrainer

    class PackedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer on packed prompts: the ids come from the data, not from re-tokenizing text."""

        def __init__(self, *args, prompt_ids: dict, counter: TokenCount, images=None, **kwargs):
            self.lmforge_prompt_ids = prompt_ids
            self.lmforge_counter = counter
            self.lmforge_images = images
            self.lmforge_rows: list[int] | None = None   # the image rows of the batch the model runs on
            self.lmforge_group_std: list[float] = []
            self.lmforge_rewards: list[float] = []
            super().__init__(*args, **kwargs)

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


def build_grpo_trainer(o, model, tokenizer, args, data, eval_data):
    """training.run's builder for `train grpo` (settings in o.extra)."""
    from lmforge.shared.model.models import choose_device
    from lmforge.shared.train.preference import _init_fields
    from trl import GRPOConfig

    x = o.extra
    stop_words = data.meta.get("stop_words") or [tokenizer.eos_token]
    stop_ids = [i for i in tokenizer.convert_tokens_to_ids(stop_words) if i is not None and i != tokenizer.unk_token_id]
    if not stop_ids and tokenizer.eos_token_id is not None:
        stop_ids = [tokenizer.eos_token_id]
    model.generation_config.eos_token_id = stop_ids   # TRL stops generation at these (and the tokenizer's EOS)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset, ids_by_text, has_reference = prompts_dataset(data, tokenizer, stop_words)
    images = None
    if data.meta.get("vision"):   # issue 17
        from lmforge.shared.data.multimodal import PromptImages
        from lmforge.shared.model.vision import require_vlm

        require_vlm(model, o.model, data)
        if x["vllm"]:
            raise BadInput("--vllm with image prompts: the prompts' images do not reach vLLM here",
                           "drop --vllm (transformers generates, with the images)")
        images = PromptImages(o.model, model, tokenizer, data)

    rewards: list = []
    device = choose_device(o.precision)
    for spec in x["rewards"]:
        parsed = rewards_.parse(spec, x["reward_timeout"])
        if isinstance(parsed, Path):
            parsed = rewards_.RewardModel(parsed, model, o.model, tokenizer, device)
            parsed.prompt_ids = ids_by_text
            parsed.images = images   # image prompts: the reward model reads them too
        elif isinstance(parsed, (rewards_.Exact, rewards_.Numeric)) and not has_reference:
            raise BadInput(f"--reward {spec} compares with reference answers, and {data.path} has none",
                           "pack prompts with their answers (`data pack --stage ppo` keeps one assistant answer)")
        rewards.append(parsed)
    rewards_.unique_names(rewards)
    weights = rewards_.weights(x["reward_weights"], len(rewards))

    kwargs = {k: v for k, v in args.to_dict().items() if k in _init_fields(type(args))}
    kwargs.update(per_device_train_batch_size=o.batch_size * x["num_generations"],
                  per_device_eval_batch_size=o.batch_size * x["num_generations"])
    config = GRPOConfig(
        **kwargs, num_generations=x["num_generations"], max_completion_length=x["max_new_tokens"],
        temperature=x["temperature"], top_p=x["top_p"], top_k=x["top_k"], beta=x["kl_coef"],
        loss_type=x["loss_type"], epsilon=x["clip_range"], epsilon_high=x["clip_range_high"],
        num_iterations=x["num_iterations"], scale_rewards=x["scale_rewards"],
        mask_truncated_completions=x["mask_truncated"], reward_weights=weights,
        use_vllm=x["vllm"], vllm_mode="colocate", shuffle_dataset=True, log_completions=False,
        disable_dropout=True,
        # an image token in an answer has no image: never sample one
        generation_kwargs={"suppress_tokens": [images.vision.image_token_id]} if images is not None else None)
    counter = TokenCount()
    trainer = _trainer_class()(model=model, reward_funcs=rewards, args=config, train_dataset=dataset,
                               processing_class=tokenizer, prompt_ids=ids_by_text, counter=counter, images=images)
    log.info(f"grpo: {len(dataset):,} prompts x {x['num_generations']} completions; rewards "
             f"{', '.join(f'{w:g} x {r.__name__}' for w, r in zip(weights, rewards))}; loss {x['loss_type']}, "
             f"beta {x['kl_coef']:g}")
    return trainer, counter
