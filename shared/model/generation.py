"""Batched text generation with a chat template, shared by `eval generate`, `serve` and `chat`.

Prompts are rendered by the same template code `data pack` trains with, left-padded into a
batch, and generated until a stop token (the template's stop words) or the token limit. Text
stop strings (from a request) cut the text where they first appear.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)   # text stop strings
    repetition_penalty: float = 1.0   # 1: off
    frequency_penalty: float = 0.0    # 0: off
    presence_penalty: float = 0.0     # 0: off


@dataclass
class Output:
    text: str
    finish_reason: str                # stop | length
    prompt_tokens: int
    completion_tokens: int


def stop_token_ids(tokenizer, stop_words: list[str]) -> list[int]:
    vocab = tokenizer.get_vocab()
    ids = [vocab[w] for w in stop_words if w in vocab]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    positions = [text.find(s) for s in stops if s and s in text]
    if not positions:
        return text, False
    return text[: min(positions)], True


def encode_chat_prompt(tokenizer, prompt: str) -> tuple[list[int], str]:
    """Token ids for a rendered chat prompt, exactly as `data pack` trained them, and the spaces
    left for the model to write.

    A header that ends in spaces ("Assistant: ") is packed with those spaces trained as part of
    the answer (tokenizers glue a space to the next word, "▁there"), so the untrained prefix is the
    prompt without its trailing spaces: that is what the model is fed, and the spaces it writes
    first are dropped from the answer text."""
    body = prompt.rstrip(" ")
    return tokenizer(body, add_special_tokens=False).input_ids, prompt[len(body):]


def pad_id_of(tokenizer, stop_ids: list[int]) -> int:
    """The id that pads a generation batch: the tokenizer's pad token, else the first stop token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]


def left_pad(prompts, pad_id: int, device=None):
    """A batch of prompt token ids, left-padded for generation -> (input_ids, attention_mask)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def sampling_args(temperature: float | None, top_p: float = 1.0, top_k: int | None = None) -> dict:
    """generate() arguments choosing sampling (temperature > 0) or greedy decoding (0 or None).

    top_k: None leaves generate()'s own top-k (the model's generation config, else 50) in place;
    a number sets it, 0 meaning none."""
    if temperature and temperature > 0:
        args: dict[str, Any] = dict(do_sample=True, temperature=temperature, top_p=top_p)
        if top_k is not None:
            args["top_k"] = top_k or None
        return args
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def penalty_processors(ids, mask, repetition: float = 1.0, frequency: float = 0.0, presence: float = 0.0):
    """generate()'s `logits_processor` for the repetition, frequency and presence penalties of a
    left-padded batch (None when all are off). generate() runs these before temperature and top-p,
    on the raw logits, as OpenAI and vLLM apply them.

    The repetition penalty is transformers' own (CTRL's: a seen token's logit divided by it when
    positive, multiplied when negative), over the prompt and the answer, the padding left out;
    frequency and presence penalties count the generated tokens only (OccurrencePenalty)."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    processors = LogitsProcessorList()
    if repetition != 1.0:
        padding = (mask == 0).sum(dim=1)
        processors.append(RepetitionPenaltyLogitsProcessor(float(repetition), prompt_ignore_length=padding))
    if frequency or presence:
        processors.append(OccurrencePenalty(frequency, presence, start=ids.shape[1]))
    return processors or None


class OccurrencePenalty:
    """OpenAI's frequency and presence penalties as a transformers logits processor:

        logits[t] -= frequency * count(t) + presence * (count(t) > 0)

    where count(t) is how often token t appears among the tokens generated so far (the columns of
    input_ids from `start` on: the prompt, padded to one width, is not counted)."""

    def __init__(self, frequency: float, presence: float, start: int):
        self.frequency, self.presence, self.start = float(frequency), float(presence), start

    def __call__(self, input_ids, scores):
        import torch

        generated = input_ids[:, self.start:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros(scores.shape, dtype=scores.dtype, device=scores.device)
        counts.scatter_add_(1, generated, torch.ones(generated.shape, dtype=scores.dtype, device=scores.device))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def generate(model, tokenizer, prompts: list[list[int]], sampling: Sampling, stop_ids: list[int],
             streamer=None, vision=None, images: list[bytes] | None = None) -> list[Output]:
    """Generate for a batch of prompt token ids (one forward pass per new token, all together).
    A vision-language model's prompts carry image tokens; `images` are theirs, in order."""
    import torch

    pad = pad_id_of(tokenizer, stop_ids)
    ids, mask = left_pad(prompts, pad, next(model.parameters()).device)
    width = ids.shape[1]
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad, use_cache=True,
                  **sampling_args(sampling.temperature, sampling.top_p, sampling.top_k))
    if vision is not None and images:
        kwargs.update({k: v.to(ids.device) for k, v in vision.pixels(images).items()})
        kwargs.update(vision.token_types(model, ids))
    penalties = penalty_processors(ids, mask, sampling.repetition_penalty, sampling.frequency_penalty,
                                   sampling.presence_penalty)
    if penalties is not None:
        kwargs["logits_processor"] = penalties
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **kwargs)
    results = []
    for row, prompt in zip(out[:, width:].tolist(), prompts):
        finish = "length"
        kept = []
        for token in row:
            if token in stop_ids:
                finish = "stop"
                break
            kept.append(token)
        text = tokenizer.decode(kept, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, sampling.stop)
        results.append(Output(text, "stop" if stopped else finish, len(prompt), len(kept)))
    return results
