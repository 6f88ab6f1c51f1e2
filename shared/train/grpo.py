"""`train grpo`: online reinforcement learning with verifiable rewards, through TRL's GRPOTrainer.

The set-up, run directory, resume, progress line and record are every stage's (lifecycle.py,
hfstage.py with this module's trainer builder); methods are the same (LoRA, DoRA, QLoRA with
--quant, full, ...).

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

Images: a vision-language model's prompts carry their images (`prompt_images`, image
tokens already expanded at pack time). TRL's own image path wants raw conversations and re-renders
them with the processor, so it stays unused; instead each prompt keeps its row number through TRL's
batch ("lmforge_row"), and the rows' images are processed (pixel values, Qwen's grids, token types)
where the model runs: for sampling (`_tokenize_prompts`), and for every log-prob pass (old policy,
reference, the loss), whose batches TRL may shuffle and split but which keep the row numbers.

Agents (--tools, --tool, --environment): each sample is an episode of several turns, played by
shared/train/agent through TRL's `rollout_func` hook (generation stays TRL's, one call per turn);
what tools and the environment wrote is masked out of the loss by TRL's tool mask, the rewards
score the episode, and the environment's reward is one more term (`env`).
"""

from __future__ import annotations

from pathlib import Path

from lmforge.shared.core import log
from lmforge.shared.core.commands.train import TrainGRPO
from lmforge.shared.core.errors import BadInput
from lmforge.shared.data import modalities
from lmforge.shared.train import rewards as rewards_

class TokenCount:
    """Tokens through the model (prompts + completions), for training.py's tokens/s."""

    def __init__(self) -> None:
        self.tokens = 0


def validate(o: TrainGRPO) -> None:
    """What `train grpo` needs beyond its options, before anything loads: vLLM where asked, and
    rewards that parse (a typo fails before the model loads)."""
    if o.vllm:
        import importlib.util

        import torch

        if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
            raise BadInput("--vllm needs a CUDA GPU and the vllm package",
                           "pip install 'lmforge[gpu]' on a GPU machine, or drop --vllm (transformers generates)")
    for spec in o.reward or []:
        rewards_.parse(spec)
    rewards_.weights(o.reward_weights, len(o.reward or []), environment=bool(o.environment))
    if o.agentic:   # the tools' programs and the environment's exist (it starts on first use)
        from lmforge.shared.core.arrowio import is_stdin, open_arrow
        from lmforge.shared.train.agent.environment import Environment
        from lmforge.shared.train.agent.tools import check_rows, toolset

        tools = toolset(o.tools, o.tool, timeout=o.tool_timeout, cap=o.tool_output_cap)
        if o.environment:
            Environment(o.environment, o.environment_timeout)
        if not is_stdin(o.data):   # piped data is checked once read (agent_rollout)
            source = open_arrow(o.data)
            if "tools" in source.schema.names:
                column = (t for batch in source.batches() for t in batch.column("tools").to_pylist())
                check_rows(tools, column, env_handles=bool(o.environment), where=f"--data {o.data}: ")


def agent_rollout(o: TrainGRPO, tokenizer, data, stop_ids: list[int]):
    """With tools or an environment: the rollout that plays each prompt as an episode (TRL's
    rollout_func), with the template the prompts were packed with."""
    from lmforge.shared.data import templates
    from lmforge.shared.train.agent.environment import Environment
    from lmforge.shared.train.agent.rollout import Agent
    from lmforge.shared.train.agent.tools import check_rows, toolset
    from lmforge.shared.train.agent.trainer import AgentRollout

    recorded = data.meta.get("template") or {}
    if not recorded.get("name"):
        raise BadInput(f"--data {data.path}: records no template, and tools and environments need the one its prompts "
                       "were packed with", "pack the prompts with `data pack --stage ppo -t TEMPLATE`")
    known = {k: v for k, v in (recorded.get("reasoning") or {}).items() if k in ("keep", "thinking", "mask_empty_think")}
    renderer = templates.renderer(recorded["name"], tokenizer, templates.Reasoning(**known) if known else None)
    tools = toolset(o.tools, o.tool, timeout=o.tool_timeout, cap=o.tool_output_cap)
    if "tools" in data.dataset.column_names:   # each row's tools: those its episodes may call
        check_rows(tools, data.dataset["tools"], env_handles=bool(o.environment), where=f"--data {o.data}: ")
    environment = Environment(o.environment, o.environment_timeout) if o.environment else None
    agent = Agent(renderer, tokenizer, stop_ids, tools, environment, max_turns=o.max_turns,
                  max_tokens=o.max_new_tokens)
    # prompt ids: the trainer's map from prompt text to packed ids (PackedGRPOTrainer)
    return AgentRollout(agent)


def prompts_dataset(data, tokenizer, stop_words: list[str]):
    """Packed ppo rows -> the dataset TRL reads: prompt text (decoded, specials kept), the
    reference answer text, the row number and, when rows offer tools, their schemas (`tools`, the
    agent rollout's per-row tool set; TRL hands the batch's rows to it); plus the map from prompt
    text back to its exact ids."""
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
    # (packs made before the column existed have none: every row may then call every tool)
    tools = data.dataset["tools"] if "tools" in data.dataset.column_names else []
    if any(tools):
        columns["tools"] = [t or "" for t in tools]
    return datasets.Dataset.from_dict(columns), ids_by_text, has_reference


def build_grpo_trainer(o: TrainGRPO, model, tokenizer, args, data, eval_data):
    """The trainer builder of `train grpo` (hfstage.py runs it)."""
    from lmforge.shared.model.models import choose_device
    from lmforge.shared.train.preference import _init_fields
    from trl import GRPOConfig

    stop_words = data.meta.get("stop_words") or [tokenizer.eos_token]
    stop_ids = [i for i in tokenizer.convert_tokens_to_ids(stop_words) if i is not None and i != tokenizer.unk_token_id]
    if not stop_ids and tokenizer.eos_token_id is not None:
        stop_ids = [tokenizer.eos_token_id]
    model.generation_config.eos_token_id = stop_ids   # TRL stops generation at these (and the tokenizer's EOS)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset, ids_by_text, has_reference = prompts_dataset(data, tokenizer, stop_words)
    media = modalities.of_packed(data)
    images = None
    if media is not None:   # a vision-language model's image prompts
        if o.agentic:
            raise BadInput("--tools, --tool and --environment with image prompts: not supported yet",
                           "train the agent on text prompts")
        if o.vllm:
            raise BadInput("--vllm with image prompts: the prompts' images do not reach vLLM here",
                           "drop --vllm (transformers generates, with the images)")
        images = media.prompts(o.model, model, tokenizer, data)

    rewards: list = []
    device = choose_device(o.precision)
    for spec in o.reward or []:
        parsed = rewards_.parse(spec, o.reward_timeout)
        if isinstance(parsed, Path):
            parsed = rewards_.RewardModel(parsed, model, o.model, tokenizer, device)
            parsed.prompt_ids = ids_by_text
            parsed.images = images   # image prompts: the reward model reads them too
        elif isinstance(parsed, (rewards_.Exact, rewards_.Numeric)) and not has_reference:
            raise BadInput(f"--reward {spec} compares with reference answers, and {data.path} has none",
                           "pack prompts with their answers (`data pack --stage ppo` keeps one assistant answer)")
        rewards.append(parsed)
    rewards_.unique_names(rewards)
    weights = rewards_.weights(o.reward_weights, len(rewards), environment=bool(o.environment))
    rollout = agent_rollout(o, tokenizer, data, stop_ids) if o.agentic else None
    if o.environment:
        from lmforge.shared.train.agent.trainer import EnvironmentReward

        rewards.append(EnvironmentReward())   # its name, env, is no built-in's: unique after the others'
        if any(r.__name__ == "env" for r in rewards[:-1]):
            raise BadInput("a --reward named env meets the environment's reward term", "rename the reward function")
    samples = rewards_.Samples() if o.log_completions else None
    for reward in rewards:
        reward.samples = samples

    kwargs = {k: v for k, v in args.to_dict().items() if k in _init_fields(type(args))}
    kwargs.update(per_device_train_batch_size=o.batch_size * o.num_generations,
                  per_device_eval_batch_size=o.batch_size * o.num_generations)
    config = GRPOConfig(
        **kwargs, num_generations=o.num_generations, max_completion_length=o.max_new_tokens,
        temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, beta=o.kl_coef,
        loss_type=o.loss_type, epsilon=o.clip_range, epsilon_high=o.clip_range_high,
        num_iterations=o.num_iterations, scale_rewards=o.scale_rewards,
        mask_truncated_completions=o.mask_truncated, reward_weights=weights,
        use_vllm=o.vllm, vllm_mode="colocate", shuffle_dataset=True, log_completions=False,
        disable_dropout=True,
        # an image token in an answer has no image: never sample one
        generation_kwargs={"suppress_tokens": [images.vision.image_token_id]} if images is not None else None)
    counter = TokenCount()
    from lmforge.shared.train.patches.grpo import packed_grpo_trainer_class

    agent_kwargs: dict = {}
    if rollout is not None:
        import os

        from lmforge.shared.train.agent.trainer import close_callback

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")   # rollout_func is TRL's documented hook
        agent_kwargs = {"rollout_func": rollout, "callbacks": [close_callback(rollout)]}
    trainer = packed_grpo_trainer_class()(model=model, reward_funcs=rewards, args=config, train_dataset=dataset,
                               processing_class=tokenizer, prompt_ids=ids_by_text, counter=counter, images=images,
                               closing=rollout.close if rollout is not None else None, **agent_kwargs)
    if samples is not None:
        trainer.add_callback(completion_log(samples, Path(o.output), o.log_completions,
                                            [r.__name__ for r in rewards], weights))
    log.info(f"grpo: {len(dataset):,} prompts x {o.num_generations} completions; rewards "
             f"{', '.join(f'{w:g} x {r.__name__}' for w, r in zip(weights, rewards))}; loss {o.loss_type}, "
             f"beta {o.kl_coef:g}" + (f"; sample completions in {COMPLETIONS}" if samples is not None else "")
             + (f"; episodes of up to {o.max_turns} turns and {o.max_new_tokens} tokens" if rollout is not None else ""))
    return trainer, counter


# ----------------------------------------------------------------------------- sample completions

COMPLETIONS = "completions.jsonl"


def completion_log(samples, out: Path, keep: int, names: list[str], weights: list[float]):
    """The callback that writes, at each logging step, one line to OUT/completions.jsonl: the first
    prompt of the latest batch, its reference, and its first `keep` completions with each reward
    and the weighted total. TRL's own log_completions stays off: it prints tables on stdout (where
    lmforge prints only the run's directory) and writes a parquet file per step."""
    from lmforge.shared.core import rundir
    from transformers import TrainerCallback

    journal = rundir.JsonlLog(out / COMPLETIONS)

    class CompletionLog(TrainerCallback):
        written = 0   # the last batch written (Samples.serial): a step may log without sampling anew

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:   # a resumed run: what came after its checkpoint goes
                journal.truncate_after(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or samples.batch is None or samples.serial == self.written:
                return
            self.written = samples.serial
            journal.write(sample_entry(samples.batch, state.global_step, keep, names, weights))

    return CompletionLog()


def sample_entry(batch: dict, step: int, keep: int, names: list[str], weights: list[float]) -> dict:
    """One logging step's line of completions.jsonl, from a Samples batch."""
    prompt = batch["prompts"][0]
    group = [i for i, p in enumerate(batch["prompts"]) if p == prompt][:keep]
    completions = []
    for i in group:
        scores = {name: batch["rewards"][name][i] for name in names if name in batch["rewards"]}
        total = sum(w * scores[name] for name, w in zip(names, weights) if name in scores)
        completions.append({"completion": batch["completions"][i], "rewards": scores, "reward": round(total, 6)})
    return {"step": step, "prompt": prompt, "reference": batch["references"][0], "completions": completions}
