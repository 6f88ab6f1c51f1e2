"""The rollout plugged into TRL's GRPOTrainer, through its `rollout_func` hook.

GRPOTrainer(..., rollout_func=AgentRollout(agent)) hands each generation batch's prompts to the
rollout, which plays the episodes and returns, per episode: the prompt ids, the completion ids
(every turn), `env_mask` (1 on the model's tokens, 0 on tool results and observations: TRL
multiplies it into the completion mask of the loss, the KL term, the entropy and the token
counts), the sampling log-probabilities where the backend gives them, and extra fields that TRL
hands to every reward function as keyword arguments: `lmforge_env_reward` (the environment's
reward for the episode), `lmforge_answer` (the content of the model's last turn),
`lmforge_transcript` (the turns as chat messages) and `lmforge_prompt_ids` (the prompt the episode
was played from: an environment may write its own). Rewards read the whole transcript as their
completion: TRL decodes the completion ids, all turns, for them.

Generation goes through the trainer's own single-turn path (`_generate_single_turn`: transformers
generate, or colocated vLLM with its weight sync), one call per turn for all open episodes.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from lmforge.shared.core.errors import BadInput
from lmforge.shared.train.agent.rollout import Agent, Generate, metrics

# What this module reaches in TRL beyond its public API (the same form as shared/train/patches'
# SEAMS; `_generate_and_score_completions` and `_metrics` are listed there already). Checked
# against TRL 1.16; `env_mask` becoming the tool mask is checked by the tests.
SEAMS = [
    ("trl.GRPOTrainer._generate_single_turn", "call",
     ("self", "prompt_ids", "images", "multimodal_fields", "num_generations")),
    ("trl.GRPOTrainer.generation_config", "attribute", None),
    ("trl.GRPOTrainer.generation_kwargs", "attribute", None),
    ("trl.GRPOTrainer.rollout_func", "attribute", None),
]


class TrainerGenerator:
    """Generate continuations with GRPOTrainer's generation path, at most max_new_tokens each.

    `fields(rows, sequences)`: extra model inputs for these sequences (a vision-language model's
    pixel values and token types), or None."""

    def __init__(self, trainer, rows: list[dict], fields: Callable[[list[dict], list[list[int]]], dict] | None = None):
        self.trainer, self.rows, self.fields = trainer, rows, fields

    def __call__(self, sequences: list[list[int]], max_new_tokens: int, episodes: list[int]):
        t = self.trainer
        config, kwargs = getattr(t, "generation_config", None), getattr(t, "generation_kwargs", None)
        saved = (getattr(config, "max_new_tokens", None), (kwargs or {}).get("max_new_tokens"))
        # each turn may write only what is left of the episode's budget (vLLM keeps its own limit;
        # the rollout cuts what goes beyond)
        if config is not None:
            config.max_new_tokens = max_new_tokens
        if kwargs is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        try:
            fields = self.fields([self.rows[i] for i in episodes], sequences) if self.fields else {}
            ids, logprobs = t._generate_single_turn(sequences, None, fields, 1)
        finally:
            if config is not None:
                config.max_new_tokens = saved[0]
            if kwargs is not None:
                kwargs["max_new_tokens"] = saved[1]
        return [[int(x) for x in seq] for seq in ids], logprobs


class AgentRollout:
    """GRPOTrainer's rollout_func: prompts (and the batch's rows, from `trainer.lmforge_inputs`)
    -> episodes played to their end -> what TRL trains on."""

    def __init__(self, agent: Agent, prompt_ids: Callable[[dict], list[int]] | None = None,
                 fields: Callable[[list[dict], list[list[int]]], dict] | None = None,
                 generate: Generate | None = None):
        """prompt_ids(row): a row's prompt ids (default: the trainer's lmforge_prompt_ids map of
        prompt text to packed ids, else the text tokenized); fields: see TrainerGenerator;
        generate: another generator than the trainer's (tests drive a scripted model with it)."""
        self.agent, self.prompt_ids, self.fields, self.generate = agent, prompt_ids, fields, generate
        self.last_metrics: dict[str, float] = {}
        self.__name__ = "lmforge_agent"

    def _ids_of(self, trainer) -> Callable[[dict], list[int]]:
        if self.prompt_ids is not None:
            return self.prompt_ids
        known = getattr(trainer, "lmforge_prompt_ids", None)
        tokenizer = self.agent.tokenizer

        def ids_of(row: dict) -> list[int]:
            if known is not None and row["prompt"] in known:
                return known[row["prompt"]]
            return tokenizer(row["prompt"], add_special_tokens=False).input_ids  # type: ignore[operator]
        return ids_of

    def __call__(self, prompts: list, trainer) -> dict[str, Any]:
        rows = getattr(trainer, "lmforge_inputs", None)
        if rows is None or len(rows) != len(prompts):
            rows = [{"prompt": p} for p in prompts]
        if any(not isinstance(p, str) for p in prompts):
            raise BadInput("the agent rollout takes text prompts (packed prompt ids), not chat messages")
        episodes = self.agent.episodes(list(rows), self._ids_of(trainer))
        self.agent.play(episodes, self.generate or TrainerGenerator(trainer, [e.row for e in episodes], self.fields))
        self.last_metrics = metrics(episodes, self.agent.environment is not None)
        store = getattr(trainer, "_metrics", None)
        if store is not None:
            mode = "train" if getattr(trainer.model, "training", True) else "eval"
            for key, value in self.last_metrics.items():
                store[mode][key].append(value)
        logprobs = [e.logprobs for e in episodes]
        return {"prompt_ids": [e.prompt_ids for e in episodes],
                "completion_ids": [e.ids for e in episodes],
                "logprobs": logprobs if all(lp is not None for lp in logprobs) else None,
                "env_mask": [e.mask for e in episodes],
                "lmforge_env_reward": [e.reward for e in episodes],
                "lmforge_answer": [e.answer for e in episodes],
                "lmforge_transcript": [e.messages for e in episodes],
                "lmforge_prompt_ids": [e.prompt_ids for e in episodes]}

    def close(self) -> None:
        if self.agent.environment is not None:
            self.agent.environment.close()


class EnvironmentReward:
    """The environment's reward for each episode, as one more reward term (named `env`)."""

    __name__ = "env"
    samples = None   # rewards.Samples: the scored batch kept for the run's completions.jsonl

    def __call__(self, prompts: list, completions: list, completion_ids: list | None = None, **kwargs) -> list[float]:
        values = kwargs.get("lmforge_env_reward")
        if values is None or len(values) != len(completions):
            raise RuntimeError("the environment reward needs the agent rollout's lmforge_env_reward field")
        out = [float(v) for v in values]
        if not all(math.isfinite(v) for v in out):   # checked per answer; a sum can still overflow
            raise BadInput("the environment's rewards add up to a number that is not finite",
                           "keep rewards within float range")
        if self.samples is not None:
            references = kwargs.get("reference") or [None] * len(completions)
            self.samples.add(self.__name__, list(prompts), list(completions), list(references), out)
        return out


class AgentTrainerMixin:
    """Put before GRPOTrainer (or lmforge's subclass of it) in the bases: it keeps the batch's rows
    where the rollout finds them, so that environments are reset from whole rows."""

    lmforge_inputs: list[dict] | None = None

    def _generate_and_score_completions(self, inputs):
        self.lmforge_inputs = inputs
        try:
            return super()._generate_and_score_completions(inputs)  # type: ignore[misc]
        finally:
            self.lmforge_inputs = None


def close_callback(rollout: AgentRollout):
    """A TrainerCallback that stops the environment when training ends."""
    from transformers import TrainerCallback

    class CloseEnvironment(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            rollout.close()

    return CloseEnvironment()
