"""`eval`: benchmarks, generation metrics, perplexity and reward-model accuracy.

Every evaluation loads the model the same way (optionally with an adapter, refused if it was
trained on another base or tokenizer) and renders prompts with the same template code as
training, so scores reflect what the model was trained on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lmforge.shared.core import log
from lmforge.shared.core.commands.infer import EvalBenchmark, EvalGenerate, EvalPerplexity, EvalRM
from lmforge.shared.core.errors import BadInput
from lmforge.shared.data.reasoning import prompt_opens_think
from lmforge.shared.data.templates import renderer_for
from lmforge.shared.model.models import load_for_inference as load
from lmforge.shared.model.models import prefer_attention

# ----------------------------------------------------------------------------- benchmarks

def benchmark(o: EvalBenchmark, which: str) -> dict:
    """`eval mmlu | cmmlu | ceval`: accuracy per subject and category (k-shot letter scoring)."""
    import torch
    from lmforge.shared.infer import mcq

    prefer_attention(o.attn)
    model_dir, adapter, data, mapping, split, shots = o.model, o.adapter, o.data, o.mapping, o.split, o.shots
    subjects, batch_size, template, cutoff, predictions_path = o.subjects, o.batch_size, o.template, o.cutoff, o.predictions

    bench = mcq.load(data, mapping)
    if which and bench.name != which:
        log.info(f"eval {which}: reading {data} (a '{bench.name}' layout)")
    chosen = mcq.choose(bench, split, subjects, shots)
    model, tokenizer = load(model_dir, adapter)
    render = renderer_for(template, tokenizer, model_dir, adapter, allow_plain=True)
    context = cutoff or getattr(model.config, "max_position_embeddings", 2048) or 2048
    builder = mcq.PromptBuilder(tokenizer, render, bench.language, context)
    single = all(len(t) == 1 for t in builder.letter_ids)
    letters = torch.tensor([t[0] for t in builder.letter_ids])
    device = next(model.parameters()).device
    started = time.monotonic()
    per_subject: dict[str, dict] = {}
    rows_out = []
    total = sum(len(bench.splits[split][s]) for s in chosen)
    with log.Progress(f"eval {bench.name}", total=total, unit="questions") as progress:
        for subject in chosen:
            info = bench.subjects[subject]
            dev = bench.splits.get("dev", {}).get(subject, [])[:shots] if shots else []
            questions = bench.splits[split][subject]
            correct = dropped_shots = 0
            subject_built = [builder.ids(info["name"], dev, q) for q in questions]
            shared = SharedPrefix.of(model, [ids for ids, _ in subject_built], device) if single else None
            for start in range(0, len(questions), batch_size):
                part = questions[start:start + batch_size]
                built = subject_built[start:start + batch_size]
                prompts = [ids for ids, _ in built]
                if shared is not None:  # the same rule, reading the subject's shared prefix once
                    picked = shared.next_token_logits(prompts, tokenizer)[:, letters.to(device)]
                elif single:  # the seed's rule: the letter with the highest next-token logit
                    picked = _next_token_logits(model, prompts, tokenizer, device)[:, letters.to(device)]
                else:       # letters of several tokens: the log-probability of each continuation
                    picked = _continuation_logprobs(model, prompts, builder.letter_ids, tokenizer, device)
                probs = torch.softmax(picked, dim=-1)
                guesses = picked.argmax(-1).tolist()
                for q, guess, (_, kept), p in zip(part, guesses, built, probs.tolist()):
                    letter = mcq.LETTERS[guess]
                    correct += letter == q.answer
                    dropped_shots += len(dev) - kept
                    if predictions_path is not None:
                        rows_out.append({"subject": subject, "question": q.text, "answer": q.answer,
                                         "prediction": letter, "correct": letter == q.answer,
                                         "probabilities": dict(zip(mcq.LETTERS, [round(x, 5) for x in p]))})
                progress.advance(len(part))
            per_subject[subject] = {"name": info["name"], "category": info["category"], "questions": len(questions),
                                    "correct": correct, "accuracy": round(100 * correct / max(len(questions), 1), 2),
                                    "shots_dropped": dropped_shots}
    elapsed = time.monotonic() - started
    categories: dict[str, dict] = {}
    for result in per_subject.values():
        c = categories.setdefault(result["category"], {"questions": 0, "correct": 0})
        c["questions"] += result["questions"]
        c["correct"] += result["correct"]
    for c in categories.values():
        c["accuracy"] = round(100 * c["correct"] / max(c["questions"], 1), 2)
    questions = sum(r["questions"] for r in per_subject.values())
    report = {"benchmark": bench.name, "split": split, "shots": shots, "model": model_dir, "adapter": adapter,
              "template": getattr(render, "name", "none") if render is not None else "none",
              "average": round(100 * sum(r["correct"] for r in per_subject.values()) / max(questions, 1), 2),
              "categories": dict(sorted(categories.items())), "subjects": per_subject, "questions": questions,
              "seconds": round(elapsed, 2), "questions_per_second": round(questions / max(elapsed, 1e-9), 2)}
    if predictions_path is not None:
        _write_jsonl(predictions_path, rows_out)
    return report


def _next_token_logits(model, prompts: list[list[int]], tokenizer, device):
    import torch

    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], device=device)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return logits[torch.arange(len(prompts), device=device), last].float()


class SharedPrefix:
    """A subject's k-shot prompts all begin with the same tokens (the header and the dev shots), so
    the model reads them once: their keys and values are computed for one row, repeated over the
    batch, each batch runs only its questions on top, and the cache is cropped back afterwards.
    Same positions, same attention as reading each prompt whole (a test compares the two), and about
    k+1 times less work for k shots."""

    MIN_TOKENS = 32  # below this, sharing saves too little to bother

    def __init__(self, model, prefix: list[int], device):
        import torch

        self.model, self.device, self.length = model, device, len(prefix)
        with torch.no_grad():
            self.base = model(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values
        self.cache: Any = None  # a transformers Cache: the prefix's, repeated over the batch's rows
        self.rows = 0

    @classmethod
    def of(cls, model, prompts: list[list[int]], device) -> "SharedPrefix | None":
        """The prompts' longest common prefix (leaving each at least one token of its own), or None
        when it is too short or the model's cache cannot be cropped back (sliding-window layers)."""
        if len(prompts) < 2:
            return None
        length = min(len(p) for p in prompts) - 1
        first = prompts[0]
        for p in prompts[1:]:
            k = 0
            while k < length and p[k] == first[k]:
                k += 1
            length = k
        if length < cls.MIN_TOKENS:
            return None
        shared = cls(model, first[:length], device)
        return shared if getattr(shared.base, "is_croppable", False) else None

    def next_token_logits(self, prompts: list[list[int]], tokenizer):
        import copy

        import torch

        if self.rows != len(prompts):
            self.cache = copy.deepcopy(self.base)
            self.cache.batch_repeat_interleave(len(prompts))
            self.rows = len(prompts)
        tails = [p[self.length:] for p in prompts]
        width = max(len(t) for t in tails)
        pad = tokenizer.pad_token_id or 0
        ids = torch.tensor([t + [pad] * (width - len(t)) for t in tails], device=self.device)
        last = torch.tensor([len(t) - 1 for t in tails], device=self.device)
        try:
            with torch.no_grad():  # right padding: a row's last real token never sees its pads
                logits = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True).logits
        finally:
            self.cache.crop(-width)
        return logits[torch.arange(len(prompts), device=self.device), last].float()


def _continuation_logprobs(model, prompts: list[list[int]], tails: list[list[int]], tokenizer, device):
    """log P(tail | prompt) for each prompt and each of the four letter tails -> (n, 4)."""
    import torch

    sequences = [p + t for p in prompts for t in tails]
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=device)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    scores = []
    for row, (p, t) in enumerate((p, t) for p in prompts for t in tails):
        scores.append(sum(float(logp[row, len(p) - 1 + j, tok]) for j, tok in enumerate(t)))
    return torch.tensor(scores, device=device).view(len(prompts), len(tails))


# ----------------------------------------------------------------------------- generation

def generate_eval(o: EvalGenerate) -> dict:
    """`eval generate`: answers for aligned prompts, scored against their references (ROUGE, BLEU-4,
    exact match); the predictions saved to `o.output` when given."""
    from lmforge.shared.core.arrowio import open_arrow
    from lmforge.shared.core.meta import require
    from lmforge.shared.data.aligned import turns_of
    from lmforge.shared.infer.metrics import all_metrics
    from lmforge.shared.model.generation import (
        encode_chat_prompt,
        generate,
        stop_token_ids,
    )

    from lmforge.shared.model.generation import Sampling

    prefer_attention(o.attn)
    model_dir, adapter, data, template, batch_size, max_samples, output = (
        o.model, o.adapter, o.data, o.template, o.batch_size, o.max_samples, o.output)
    sampling = Sampling(max_new_tokens=o.max_new_tokens, temperature=o.temperature, top_p=o.top_p, seed=o.seed,
                        repetition_penalty=o.repetition_penalty, frequency_penalty=o.frequency_penalty,
                        presence_penalty=o.presence_penalty)
    source = open_arrow(data)
    require(source.meta, source.name, kind="aligned", stages=("sft",),
            hint="eval generate reads aligned chat data (prompt + reference answer)")
    model, tokenizer = load(model_dir, adapter)
    render = renderer_for(template, tokenizer, model_dir, adapter)
    stops = stop_token_ids(tokenizer, render.stop_words())
    from lmforge.shared.data import modalities, multimodal

    media = modalities.of_model_dir(model_dir)
    vision = media.encoder(model_dir, tokenizer) if media is not None else None
    rows = []
    from lmforge.shared.data.aligned import batches as aligned_batches

    for batch in aligned_batches(source):   # version-1 data upgraded
        rows += batch.to_pylist()
        if max_samples and len(rows) >= max_samples:
            rows = rows[:max_samples]
            break
    if not rows:
        raise BadInput(f"{source.name}: no rows to evaluate")
    started = time.monotonic()
    predictions, references, out_rows = [], [], []
    with log.Progress("eval generate", total=len(rows), unit="examples") as progress:
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            images: list[bytes] = []
            if vision is not None:   # image tokens in the prompts, the images beside them
                prompts, ids = [], []
                for r in part:
                    got = multimodal.generation_inputs(vision, render, turns_of(r["prompt"]), r["system"], r["tools"],
                                                       lambda text: encode_chat_prompt(tokenizer, text))
                    ids.append(got[0])
                    images += got[2]
                    prompts.append(got[3])
            else:
                prompts = [render.generation_prompt(turns_of(r["prompt"]), r["system"], r["tools"]) for r in part]
                ids = [encode_chat_prompt(tokenizer, p)[0] for p in prompts]  # as serve and pack
            results = generate(model, tokenizer, ids, sampling, stops, vision=vision, images=images)
            for r, prompt, result in zip(part, prompts, results):
                reference = r["response"][0]["content"] or ""
                # a thinking model's reasoning is not part of its answer (scored, saved apart)
                reasoning, answer = render.split_reasoning(result.text, prompt_opens_think(prompt))
                predictions.append(answer.strip())
                references.append(reference)
                out_rows.append({"prompt": r["prompt"][-1]["content"], "prediction": answer.strip(),
                                 "reference": reference, "finish_reason": result.finish_reason,
                                 **({"reasoning": reasoning} if render.thinking else {})})
            progress.advance(len(part))
    metrics = all_metrics(predictions, references)
    metrics["seconds"] = round(time.monotonic() - started, 2)
    if output is not None:
        if output.suffix == ".arrow":
            import pyarrow as pa
            from lmforge.shared.core.arrowio import ArrowOutput

            table = pa.Table.from_pylist(out_rows)
            with ArrowOutput(output, table.schema, {"kind": "predictions", "model": model_dir}) as out:
                out.write(table)
        else:
            _write_jsonl(output, out_rows)
    return {"model": model_dir, "adapter": adapter, "data": data, "template": render.name, **metrics}


# ----------------------------------------------------------------------------- perplexity, reward

def perplexity_eval(o: EvalPerplexity) -> dict:
    """`eval perplexity`: exp of the mean token loss on packed pt or sft data."""
    from lmforge.shared.data.packed import check_tokenizer, open_packed
    from lmforge.shared.model.perplexity import nll_over
    from lmforge.shared.data.collate import PackedCollator

    prefer_attention(o.attn)
    model_dir, adapter, data, batch_size = o.model, o.adapter, o.data, o.batch_size
    packed = open_packed(data, ("pt", "sft"))
    model, tokenizer = load(model_dir, adapter)
    check_tokenizer(packed, tokenizer, model_dir)
    collate = PackedCollator(neat=packed.meta.get("packing") == "neat", pad_id=tokenizer.pad_token_id or 0)
    batches = (collate([packed.dataset[i] for i in range(start, min(start + batch_size, packed.rows))])
               for start in range(0, packed.rows, batch_size))
    with log.Progress("eval perplexity", total=packed.rows, unit="rows") as progress:
        total, count = nll_over(model, batches, progress)
    import math

    mean = total / max(count, 1)
    return {"model": model_dir, "adapter": adapter, "data": data, "perplexity": round(math.exp(mean), 6),
            "mean_loss": round(mean, 6), "tokens": count, "rows": packed.rows}


def reward_eval(o: EvalRM) -> dict:
    """`eval rm`: a reward model's pairwise accuracy and mean margin."""
    import torch
    from lmforge.shared.data.packed import check_tokenizer, open_packed
    from lmforge.shared.data.collate import PairCollator
    from lmforge.shared.model.value import ValueModel
    from lmforge.shared.modeldir.weights import HEAD_FILE, load_value_head

    prefer_attention(o.attn)
    model_dir, reward, data, batch_size = o.model, o.reward, o.data, o.batch_size
    if not (Path(reward) / HEAD_FILE).exists():
        raise BadInput(f"--reward {reward}: not a reward model (no {HEAD_FILE})", "train one with `lmforge train rm`")
    packed = open_packed(data, ("rm", "dpo"))
    if (Path(reward) / "adapter_config.json").exists():
        causal, tokenizer = load(model_dir, reward)
    else:
        causal, tokenizer = load(reward, None)
    check_tokenizer(packed, tokenizer, model_dir)
    hidden = causal.config.get_text_config().hidden_size
    scorer = ValueModel(causal, load_value_head(reward, hidden)).eval()
    collate = PairCollator(tokenizer.pad_token_id or 0)
    chosen_all, rejected_all = [], []
    with torch.no_grad(), log.Progress("eval rm", total=packed.rows, unit="pairs") as progress:
        for start in range(0, packed.rows, batch_size):
            rows = [packed.dataset[i] for i in range(start, min(start + batch_size, packed.rows))]
            scores = scorer(**collate(rows))
            chosen, rejected = scores.chunk(2)
            chosen_all += chosen.tolist()
            rejected_all += rejected.tolist()
            progress.advance(len(rows))
    n = len(chosen_all)
    margins = [c - r for c, r in zip(chosen_all, rejected_all)]
    return {"model": model_dir, "reward": reward, "data": data, "pairs": n,
            "accuracy": round(100 * sum(m > 0 for m in margins) / max(n, 1), 4),
            "mean_margin": round(sum(margins) / max(n, 1), 6),
            "mean_chosen": round(sum(chosen_all) / max(n, 1), 6), "mean_rejected": round(sum(rejected_all) / max(n, 1), 6)}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from lmforge.shared.core.arrowio import AtomicFile

    with AtomicFile(path) as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
