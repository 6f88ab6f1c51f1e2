"""Perplexity: exp(mean negative log-likelihood per predicted token), and the token sequences to
measure it on (from packed or aligned data)."""

from __future__ import annotations

import math

IGNORE = -100


def sequences_from(source, tokenizer=None, limit: int | None = None, max_length: int = 512):
    """(input_ids, labels) pairs from a dataset: packed pt/sft rows as they are (the loss where the
    labels say), aligned rows as plain text (every token counts), tokenized with `tokenizer`."""
    meta = source.meta
    out: list[tuple[list[int], list[int]]] = []
    for batch in source.batches():
        for row in batch.to_pylist():
            if limit is not None and len(out) >= limit:
                return out
            if meta.get("kind") == "packed":
                if "input_ids" in row:
                    ids, labels = row["input_ids"], row["labels"]
                elif "prompt_ids" in row:  # pairwise / kto / ppo: the prompt and first answer
                    answer = row.get("chosen_ids") or row.get("response_ids") or []
                    ids = row["prompt_ids"] + answer
                    labels = [IGNORE] * len(row["prompt_ids"]) + answer
                else:
                    continue
            else:
                if tokenizer is None:
                    raise ValueError("aligned data needs a tokenizer")
                text = "\n".join(m["content"] for m in (row["prompt"] or []) + (row["response"] or [])[:1])
                ids = tokenizer(text, add_special_tokens=True).input_ids
                labels = list(ids)
            ids, labels = list(ids)[:max_length], list(labels)[:max_length]
            if sum(1 for x in labels[1:] if x != IGNORE):
                out.append((ids, labels))
    return out


def nll(model, sequences, batch_size: int = 4) -> tuple[float, int]:
    """Summed negative log-likelihood and the number of predicted tokens of (input_ids, labels)
    pairs, right-padded into batches of `batch_size`."""
    return nll_over(model, _padded(sequences, batch_size))


def _padded(sequences, batch_size: int):
    """(input_ids, labels) pairs -> right-padded batches for nll_over (pads carry no label)."""
    import torch

    for start in range(0, len(sequences), batch_size):
        part = sequences[start:start + batch_size]
        width = max(len(ids) for ids, _ in part)
        yield {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i, _ in part]),
               "labels": torch.tensor([l + [IGNORE] * (width - len(l)) for _, l in part]), "use_cache": False}


def nll_over(model, batches, progress=None) -> tuple[float, int]:
    """The perplexity loop (`model quantize` and `eval perplexity`): the summed negative
    log-likelihood of the labelled tokens of `batches`, and their number. A batch is a dict of model
    inputs with "labels" (IGNORE where nothing is predicted; each label is predicted from the
    tokens before it); `progress`, if given, advances by each batch's rows."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            inputs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items() if k != "labels"}
            targets = batch["labels"].to(device)[:, 1:]
            logits = model(**inputs).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                     ignore_index=IGNORE, reduction="sum")
            total += float(loss)
            count += int((targets != IGNORE).sum())
            if progress is not None:
                progress.advance(targets.shape[0])
    return total, count


def perplexity(model, sequences, batch_size: int = 4) -> dict:
    total, count = nll(model, sequences, batch_size)
    mean = total / max(count, 1)
    return {"perplexity": math.exp(mean), "mean_nll": mean, "tokens": count, "sequences": len(sequences)}
