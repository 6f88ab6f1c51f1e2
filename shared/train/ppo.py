"""`train ppo`: RLHF with PPO as in InstructGPT, on one shared base model.

Model sharing (the seed paper's contribution). One copy of the base weights W is in memory:
- W is the SFT model: --model, with the --sft adapter merged in when one is given;
- policy    = W + a new LoRA adapter ("default", trained) + a value head (trained);
- reference = W with the adapter switched off;
- reward    = W + the reward model's adapter ("reward", frozen) + its value head.
Switching adapters replaces loading four models. `--layout separate` loads the reference, the
reward model and a critic as separate copies instead (needed when the reward model is a full
model; also the baseline that the memory benchmark compares with).

One PPO step on a batch of prompts x:
 1. rollout     y ~ pi(.|x) by sampling, stopped at the template's stop words
 2. score       s = R(x, y) at the last token of y; optionally scaled, normalised (running mean
                and std) and clipped
 3. rewards     r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t)),  plus s on the last token
 4. advantages  GAE: delta_t = r_t + gamma V_{t+1} - V_t,  A_t = sum_k (gamma lam)^k delta_{t+k},
                returns R_t = A_t + V_t; advantages whitened over the batch
 5. update      for --ppo-epochs over mini-batches, with ratio rho = exp(log pi - log pi_old):
                policy loss = mean max(-A rho, -A clip(rho, 1-eps, 1+eps))
                value loss  = 0.5 mean max((V - R)^2, (clip(V, V_old-eps_v, V_old+eps_v) - R)^2)
                loss = policy loss + vf_coef value loss
 6. kl_coef     adaptive (Ziegler et al. 2019): coef *= 1 + clip(KL/target - 1, -0.2, 0.2) n/horizon,
                or fixed with --kl-target 0

Images: with a vision-language model and prompts packed with their images, every pass
(sampling, policy and value, reference, reward) gets the rows' pixel inputs and image-token types,
processed per batch (per mini-batch in the update); the model computes its own positions (Qwen's
3D ones from the images), and the value and reward heads read the whole multimodal body.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from lmforge.shared.core import log, rundir
from lmforge.shared.core.commands.train import TrainPPO
from lmforge.shared.core.errors import BadInput
from lmforge.shared.model.generation import left_pad, pad_id_of, sampling_args


# ----------------------------------------------------------------------------- math

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response positions (mask 1 = a response token)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, advantages + values


class AdaptiveKL:
    def __init__(self, coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, steps: int) -> None:
        if not self.target:
            return
        error = max(min(kl / self.target - 1.0, 0.2), -0.2)
        self.value *= 1.0 + error * steps / self.horizon


class RunningMoments:
    """Running mean and std of scores (Welford), for reward normalisation."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, xs: torch.Tensor) -> None:
        for x in xs.tolist():
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(2, tokens[..., None]).squeeze(-1)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    p = torch.log_softmax(logits.float(), dim=-1)
    return -(p.exp() * p).sum(-1)


# ----------------------------------------------------------------------------- roles

def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def inputs(ids, mask, images: dict | None) -> dict:
    """Forward arguments: left-padded text counts its positions from its first real token; with
    images the model computes them itself (Qwen: 3D positions from the images and the mask)."""
    if images:
        return {"input_ids": ids, "attention_mask": mask, "use_cache": False, **images}
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask), "use_cache": False}


def last_hidden(model, ids, mask, images: dict | None) -> torch.Tensor:
    """The last hidden states of the language model under `model`: its decoder alone for text, the
    whole multimodal body (vision tower, projector, language model) when there are images."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = base.model if images else base.get_decoder()
    return body(**inputs(ids, mask, images)).last_hidden_state


class SharedRoles:
    """Policy, reference and reward from one base model, by switching LoRA adapters."""

    def __init__(self, model, value_head, reward_head):
        self.model = model                  # PeftModel: "default" (policy) + "reward"
        self.value_head = value_head
        self.reward_head = reward_head

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.value_head.parameters())

    def generator(self):
        return self.model

    def policy(self, ids, mask, images: dict | None = None):
        out = self.model(**inputs(ids, mask, images), output_hidden_states=True)
        values = self.value_head(out.hidden_states[-1].to(self.value_head.weight.dtype)).squeeze(-1)
        return out.logits, values

    @torch.no_grad()
    def reference_logits(self, ids, mask, images: dict | None = None):
        with self.model.disable_adapter():
            return self.model(**inputs(ids, mask, images)).logits

    @torch.no_grad()
    def score(self, ids, mask, last, images: dict | None = None):
        with adapter(self.model, "reward"):
            hidden = last_hidden(self.model, ids, mask, images)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.reward_head(picked.to(self.reward_head.weight.dtype)).squeeze(-1)


class SeparateRoles:
    """The four-model layout: actor, critic, reference and reward model as separate copies."""

    def __init__(self, actor, critic, value_head, reference, reward_model, reward_head):
        self.actor, self.critic, self.value_head = actor, critic, value_head
        self.reference, self.reward_model, self.reward_head = reference, reward_model, reward_head

    def trainable(self):
        return ([p for p in self.actor.parameters() if p.requires_grad] +
                [p for p in self.critic.parameters() if p.requires_grad] + list(self.value_head.parameters()))

    def generator(self):
        return self.actor

    def policy(self, ids, mask, images: dict | None = None):
        logits = self.actor(**inputs(ids, mask, images)).logits
        hidden = last_hidden(self.critic, ids, mask, images)
        return logits, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    @torch.no_grad()
    def reference_logits(self, ids, mask, images: dict | None = None):
        return self.reference(**inputs(ids, mask, images)).logits

    @torch.no_grad()
    def score(self, ids, mask, last, images: dict | None = None):
        hidden = last_hidden(self.reward_model, ids, mask, images)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.reward_head(picked.to(self.reward_head.weight.dtype)).squeeze(-1)


@contextmanager
def adapter(model, name: str):
    """Run with adapter `name` active; then back to the policy ("default"), trainable as before."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter("default")
        for n, p in model.named_parameters():  # set_adapter toggles requires_grad: restore exactly
            p.requires_grad_(n in trainable)


# ----------------------------------------------------------------------------- loading

def build(o: TrainPPO, tokenizer, device):
    """The roles for the layout, from --model/--sft/--reward."""
    from lmforge.shared.model.models import load_model, resize_to
    from lmforge.shared.modeldir.weights import model_class
    from lmforge.shared.model.value import attach_reward_adapter
    from lmforge.shared.modeldir.weights import load_value_head
    from peft import LoraConfig, PeftModel, get_peft_model

    def sft_model():
        """W: the SFT model (the base with the --sft adapter merged in, or the --sft model itself)."""
        if o.sft and (Path(o.sft) / "config.json").exists() and not (Path(o.sft) / "adapter_config.json").exists():
            return load_model(o.sft, device, tokenizer=tokenizer)
        base = load_model(o.model, device, tokenizer=tokenizer)
        if o.sft:
            rundir.require_finished(o.sft)
            base = PeftModel.from_pretrained(base, o.sft).merge_and_unload()
        return base

    reward_dir = Path(o.reward)
    rundir.require_finished(reward_dir)
    hidden_size = None
    # PEFT annotates lora_alpha as int; a float works (the scale is alpha / rank)
    lora = LoraConfig(task_type="CAUSAL_LM", r=o.lora_rank, lora_alpha=o.lora_alpha or 2 * o.lora_rank,  # type: ignore[arg-type]
                      target_modules="all-linear" if o.lora_target == "all" else o.lora_target.split(","),
                      lora_dropout=0.0)
    reward_is_adapter = (reward_dir / "adapter_config.json").exists()
    roles: SharedRoles | SeparateRoles
    if o.layout == "shared":
        if not reward_is_adapter:
            raise BadInput(f"--reward {o.reward}: a full reward model cannot share the policy's weights",
                           "use --layout separate, or train the reward model with --method lora")
        model = get_peft_model(sft_model(), lora)
        attach_reward_adapter(model, reward_dir, f"--reward {o.reward}", "train the reward model on the same (SFT) model")
        hidden_size = model.config.get_text_config().hidden_size
        reward_head = load_value_head(reward_dir, hidden_size)
        roles = SharedRoles(model, torch.nn.Linear(hidden_size, 1), reward_head)
    else:
        actor = get_peft_model(sft_model(), lora)
        critic = get_peft_model(sft_model(), lora)
        reference = sft_model().eval()
        if reward_is_adapter:
            reward_model = PeftModel.from_pretrained(sft_model(), str(reward_dir)).eval()
        else:
            reward_model = model_class(reward_dir).from_pretrained(str(reward_dir), dtype=device.dtype).eval()
            resize_to(reward_model, tokenizer)
        for p in [*reference.parameters(), *reward_model.parameters()]:
            p.requires_grad_(False)
        hidden_size = actor.config.get_text_config().hidden_size
        reward_head = load_value_head(reward_dir, hidden_size)
        roles = SeparateRoles(actor, critic, torch.nn.Linear(hidden_size, 1), reference, reward_model, reward_head)
    roles.value_head.load_state_dict(reward_head.state_dict())  # the critic starts from the reward head
    for p in reward_head.parameters():
        p.requires_grad_(False)
    return roles


# ----------------------------------------------------------------------------- the loop

class PPO:
    def __init__(self, o: TrainPPO, roles, tokenizer, prompts, stop_ids: list[int], images=None):
        self.o, self.roles, self.tokenizer = o, roles, tokenizer
        self.prompts = prompts                   # datasets.Dataset with prompt_ids
        self.images = images                     # multimodal.PromptImages for image prompts, else None
        self.stop_ids = stop_ids
        self.pad_id = pad_id_of(tokenizer, stop_ids)
        self.optimizer = torch.optim.AdamW(roles.trainable(), lr=o.learning_rate)
        self.kl = AdaptiveKL(o.kl_coef, o.kl_target, o.kl_horizon)
        self.moments = RunningMoments()
        self.step = 0
        self.tokens = 0
        self.device = next(roles.generator().parameters()).device
        roles.value_head.to(self.device)
        roles.reward_head.to(self.device)
        self.stops = torch.tensor(stop_ids, device=self.device)

    # -- batches of prompts: a seeded shuffle per pass over the data
    def batch_indices(self, step: int) -> list[int]:
        per_epoch = max(len(self.prompts) // self.o.batch_size, 1)
        epoch, within = divmod(step, per_epoch)
        order = list(range(len(self.prompts)))
        random.Random(self.o.seed + epoch).shuffle(order)
        return order[within * self.o.batch_size:(within + 1) * self.o.batch_size]

    def pixels(self, rows: list[int], ids: torch.Tensor) -> dict:
        """The image inputs of these rows (in this order) for the sequences `ids`; {} for text."""
        return self.images.inputs(rows, ids) if self.images is not None else {}

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]], rows: list[int]):
        """Sample responses; returns padded sequences, attention mask and response mask."""
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        width = ids.shape[1]
        model = self.roles.generator()
        kwargs = dict(max_new_tokens=self.o.max_new_tokens, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                      use_cache=True, **sampling_args(self.o.temperature, self.o.top_p, self.o.top_k))
        if self.images is not None:   # an image token in an answer has no image: never sample one
            kwargs["suppress_tokens"] = [self.images.vision.image_token_id]
        out = model.generate(input_ids=ids, attention_mask=mask, **self.pixels(rows, ids), **kwargs)
        response = out[:, width:]
        # the response runs to its first stop token (included); anything after is padding
        is_stop = torch.isin(response, self.stops)
        ended = is_stop.cumsum(-1)
        response_mask = ((ended == 0) | (is_stop & (ended == 1))).long()
        full_mask = torch.cat([mask, response_mask], dim=1)
        sequences = torch.where(full_mask.bool(), out, torch.full_like(out, self.pad_id))
        finished = is_stop.any(-1)
        return sequences, full_mask, response_mask, width, finished

    def step_once(self) -> dict:
        o = self.o
        started = time.monotonic()
        rows = self.batch_indices(self.step)
        batch = self.prompts[rows]["prompt_ids"]
        for m in (self.roles.generator(),):
            m.eval()
        sequences, mask, response_mask, width, finished = self.rollout(batch, rows)
        lengths = response_mask.sum(-1)
        keep = lengths > 0
        images = self.pixels(rows, sequences)
        with torch.no_grad():
            logits, values = self.roles.policy(sequences, mask, images)
            ref_logits = self.roles.reference_logits(sequences, mask, images)
            # token t of the response is predicted at position width + t - 1
            tokens = sequences[:, width:]
            old_logp = logprobs_of(logits[:, width - 1:-1], tokens)
            ref_logp = logprobs_of(ref_logits[:, width - 1:-1], tokens)
            old_values = values[:, width - 1:-1]
            last = width + lengths.clamp(min=1) - 1
            raw = self.roles.score(sequences, mask, last, images)
            entropy = masked_mean(entropy_of(logits[:, width - 1:-1]), response_mask.float())
        score = raw.clone()
        if o.missing_eos_penalty is not None:
            score = torch.where(finished, score, score - o.missing_eos_penalty)
        if o.reward_norm:
            self.moments.update(score)
            score = (score - self.moments.mean) / (self.moments.std + 1e-8)
        score = score * o.reward_scale
        if o.reward_clip is not None:
            score = score.clamp(-o.reward_clip, o.reward_clip)
        rmask = response_mask.float()
        kl_tokens = (old_logp - ref_logp) * rmask
        rewards = -self.kl.value * kl_tokens
        rewards[torch.arange(len(score), device=self.device), (lengths - 1).clamp(min=0)] += score * keep
        advantages, returns = gae(rewards, old_values * rmask, rmask, o.gamma, o.lam)
        if o.whiten_advantages:
            advantages = masked_whiten(advantages, rmask)
        advantages = advantages.detach()
        stats: dict[str, list[float]] = {}
        for model in (self.roles.generator(),):
            model.train()
        for _ in range(o.ppo_epochs):
            order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(o.seed + self.step)).to(self.device)
            for start in range(0, len(batch), o.mini_batch_size):
                part = order[start:start + o.mini_batch_size]
                logits, values = self.roles.policy(sequences[part], mask[part],
                                                   self.pixels([rows[i] for i in part.tolist()], sequences[part]))
                logp = logprobs_of(logits[:, width - 1:-1], tokens[part])
                vpred = values[:, width - 1:-1]
                m = rmask[part]
                ratio = torch.exp(logp - old_logp[part])
                adv = advantages[part]
                pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - o.clip_range, 1 + o.clip_range))
                policy_loss = masked_mean(pg, m)
                vclipped = old_values[part] + (vpred - old_values[part]).clamp(-o.clip_range_value, o.clip_range_value)
                value_loss = 0.5 * masked_mean(torch.max((vpred - returns[part]) ** 2, (vclipped - returns[part]) ** 2), m)
                loss = policy_loss + o.vf_coef * value_loss
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if o.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.roles.trainable(), o.max_grad_norm)
                self.optimizer.step()
                for key, value in (("policy_loss", policy_loss), ("value_loss", value_loss),
                                   ("clipfrac", masked_mean(((ratio - 1).abs() > o.clip_range).float(), m)),
                                   ("approx_kl", masked_mean(0.5 * (logp - old_logp[part]) ** 2, m))):
                    stats.setdefault(key, []).append(float(value.detach()))
        kl_mean = float((kl_tokens.sum(-1)).mean())
        self.kl.update(kl_mean, len(batch))
        self.step += 1
        self.tokens += int(mask.sum())
        entry = {"step": self.step, "reward": float(raw.mean()), "reward_std": float(raw.std()) if len(raw) > 1 else 0.0,
                 "kl": kl_mean, "kl_coef": self.kl.value, "entropy": float(entropy),
                 "response_length": float(lengths.float().mean()), "finished": float(finished.float().mean()),
                 "seconds": round(time.monotonic() - started, 3),
                 **{k: sum(v) / len(v) for k, v in stats.items()}}
        entry["loss"] = entry["policy_loss"] + o.vf_coef * entry["value_loss"]
        return entry

    # -- checkpoints
    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        policy = self.roles.model if isinstance(self.roles, SharedRoles) else self.roles.actor
        policy.save_pretrained(str(directory), selected_adapters=["default"])
        save_file({k: v.detach().cpu().contiguous() for k, v in self.roles.value_head.state_dict().items()},
                  str(directory / "value_head.safetensors"))
        if isinstance(self.roles, SeparateRoles):
            self.roles.critic.save_pretrained(str(directory / "critic"))

    def save_checkpoint(self, out: Path) -> None:
        directory = out / rundir.CHECKPOINTS / f"checkpoint-{self.step}"
        self.save(directory)
        torch.save({"optimizer": self.optimizer.state_dict(), "kl": self.kl.value,
                    "moments": (self.moments.count, self.moments.mean, self.moments.m2),
                    "rng": torch.get_rng_state(), "step": self.step, "tokens": self.tokens},
                   directory / "ppo_state.pt")
        (directory / "trainer_state.json").write_text(json.dumps({"global_step": self.step}))
        for old in sorted((out / rundir.CHECKPOINTS).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))[:-2]:
            import shutil

            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, directory: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        policy = self.roles.model if isinstance(self.roles, SharedRoles) else self.roles.actor
        set_peft_model_state_dict(policy, load_file(str(directory / "adapter_model.safetensors")), adapter_name="default")
        self.roles.value_head.load_state_dict(load_file(str(directory / "value_head.safetensors")))
        if isinstance(self.roles, SeparateRoles):
            set_peft_model_state_dict(self.roles.critic, load_file(str(directory / "critic" / "adapter_model.safetensors")))
        state = torch.load(directory / "ppo_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl.value = state["kl"]
        self.moments.count, self.moments.mean, self.moments.m2 = state["moments"]
        torch.set_rng_state(state["rng"])
        self.step, self.tokens = state["step"], state["tokens"]


def train(o: TrainPPO, out: Path, resume_from: Path | None) -> None:
    """PPO's loop inside the run lifecycle (lifecycle.py): load, sample, score, update, save."""
    from lmforge.shared.data.packed import check_tokenizer, open_packed
    from lmforge.shared.model.models import choose_device, count_parameters
    from lmforge.shared.modeldir.tokenizers import load_tokenizer_for
    from transformers import set_seed

    data = open_packed(o.data, ("ppo",))
    device = choose_device(o.precision)
    if device.kind != "cpu":
        log.info("ppo: note: runs on one device; several processes are not supported for PPO")
    set_seed(o.seed)
    added = (data.meta.get("tokenizer") or {}).get("added_tokens", [])
    tokenizer = load_tokenizer_for(o.model, added)
    check_tokenizer(data, tokenizer, o.model)
    stop_words = data.meta.get("stop_words") or [tokenizer.eos_token]
    stop_ids = [i for i in tokenizer.convert_tokens_to_ids(stop_words) if i is not None]
    roles = build(o, tokenizer, device)
    from lmforge.shared.data import modalities

    media = modalities.of_packed(data)   # image prompts: their pixels reach every pass
    images = media.prompts(o.model, roles.generator(), tokenizer, data) if media is not None else None
    trainer = PPO(o, roles, tokenizer, data.dataset, stop_ids, images)
    trainable, total = count_parameters(roles.generator())
    steps = o.max_steps
    if o.epochs:
        steps = max(1, int(o.epochs * len(data.dataset) // o.batch_size))
    log.info(f"ppo: {o.layout} layout; {trainable:,} policy parameters train; {steps} steps of {o.batch_size} "
             f"prompts; kl_coef {o.kl_coef} ({'adaptive' if o.kl_target else 'fixed'})")
    journal = rundir.JsonlLog(out / rundir.LOG)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
        journal.truncate_after(trainer.step)
        log.info(f"ppo: resumed at step {trainer.step}")
    started = time.monotonic()
    from lmforge.shared.train.reporting import LoopReporter, names

    hyperparameters = {k: v for k, v in o.values().items() if k not in ("output", "overwrite", "resume")}
    trackers = LoopReporter(names(o.report), out, {"stage": "ppo", "method": "lora", "base_model": rundir.model_ref(
        o.model), "hyperparameters": hyperparameters}, o.logging_steps) if names(o.report) else None
    if trackers:
        trackers.begin(steps, trainer.step)
    with log.Progress("ppo", total=steps, unit="steps") as progress:
        progress.done = trainer.step
        while trainer.step < steps:
            entry = trainer.step_once()
            entry["tokens_per_second"] = round(trainer.tokens / max(time.monotonic() - started, 1e-9), 1)
            if trainer.step % o.logging_steps == 0 or trainer.step == steps:
                journal.write(entry)
                if trackers:
                    trackers.log(trainer.step, {k: v for k, v in entry.items() if k != "step"})
            progress.advance(1, reward=round(entry["reward"], 3), kl=round(entry["kl"], 3))
            if trainer.step % o.save_steps == 0 and trainer.step < steps:
                trainer.save_checkpoint(out)
    if trackers:
        trackers.end()
    trainer.save(out)
    from lmforge.shared.train.lifecycle import save_common

    save_common(out, tokenizer, o.sft if o.sft and not (Path(o.sft) / "adapter_config.json").exists() else o.model,
                stop_words, o.keep_checkpoints)
    history = journal.entries()
    first, last = history[0] if history else {}, history[-1] if history else {}
    record = rundir.record(
        "adapter", stage="ppo", method="lora", base_model=rundir.model_ref(o.model),
        stacked_on=[str(Path(o.sft).resolve())] if o.sft and (Path(o.sft) / "adapter_config.json").exists() else [],
        reward_model=str(Path(o.reward).resolve()), layout=o.layout,
        data={"path": str(data.path), "rows": data.rows},
        template=data.meta.get("template"), stop_words=stop_words, added_tokens=added,
        tokenizer_fingerprint=(data.meta.get("tokenizer") or {}).get("fingerprint"),
        hyperparameters=hyperparameters,
        metrics={"steps": trainer.step, "first_reward": first.get("reward"), "final_reward": last.get("reward"),
                 "final_kl": last.get("kl"), "runtime_seconds": round(time.monotonic() - started, 2)})
    rundir.write_record(out, record)
    log.info(f"ppo: done: reward {first.get('reward', 0):.3f} -> {last.get('reward', 0):.3f}, KL {last.get('kl', 0):.3f}")


def validate(o: TrainPPO) -> None:
    """What `train ppo` needs beyond its options' ranges, before anything loads."""
    from lmforge.shared.train.reporting import check as check_report

    check_report(o.report)
    if o.batch_size < 1 or o.mini_batch_size < 1 or o.mini_batch_size > o.batch_size:
        raise BadInput("--mini-batch-size must be between 1 and --batch-size")
    if o.ppo_epochs < 1 or o.max_new_tokens < 1 or o.max_steps < 1:
        raise BadInput("--ppo-epochs, --max-new-tokens and --max-steps must be at least 1")
    if not 0 < o.clip_range < 1:
        raise BadInput("--clip-range must be in (0, 1)")
    if o.kl_coef < 0:
        raise BadInput("--kl-coef must be >= 0")
    if not o.learning_rate > 0:
        raise BadInput(f"--learning-rate {o.learning_rate:g}: must be above 0")
    if not Path(o.reward).is_dir():
        raise BadInput(f"--reward {o.reward}: not a directory", "give a reward model made by `lmforge train rm`")
    from lmforge.shared.modeldir.weights import HEAD_FILE

    if not (Path(o.reward) / HEAD_FILE).exists():
        rundir.require_finished(o.reward)
        raise BadInput(f"--reward {o.reward}: not a reward model (no {HEAD_FILE})", "train one with `lmforge train rm`")
