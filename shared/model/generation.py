"""Batched text generation with a chat template, shared by `eval generate`, `serve` and `chat`.

Prompts are rendered by the same template code `data pack` trains with, left-padded into a
batch, and generated until a stop token (the template's stop words) or the token limit. Text
stop strings (from a request) cut the text where they first appear.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)   # text stop strings


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


def generate(model, tokenizer, prompts: list[list[int]], sampling: Sampling, stop_ids: list[int],
             streamer=None) -> list[Output]:
    """Generate for a batch of prompt token ids (one forward pass per new token, all together)."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad, use_cache=True)
    if sampling.temperature and sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                      top_k=sampling.top_k or None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
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
