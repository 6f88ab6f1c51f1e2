"""`data pack`'s encoder: aligned rows -> token ids and labels for one training stage (packing.py
runs it over a dataset and lays the rows out).

Per stage (columns of the packed Arrow data):
    pt      input_ids, labels, lengths       texts + EOS, concatenated, cut into --cutoff blocks
    sft     input_ids, labels, lengths       chat-rendered; labels -100 outside assistant outputs
    rm/dpo  prompt_ids, chosen_ids, rejected_ids
    kto     prompt_ids, response_ids, label
    ppo     prompt_ids, response_ids, tools  the generation prompt (+ the reference answer, if any), and
                                             the row's tool schemas (JSON text, "" when none): the
                                             tools an agent's episode of that prompt may call

`lengths` lists the examples inside a row: one entry unpacked; with --packing several (the row
is their concatenation); with --neat-packing training restarts position ids at each boundary so
attention never crosses examples. Labels are -100 where there is no loss.

Truncation (--truncation, truncation.py): by default the --cutoff budget is shared between prompt
and response the way LLaMA-Factory does (a short response is kept whole; otherwise both are cut
in proportion), so a long prompt never wipes out the response; or the prompt loses its beginning
(left), the response its end (right), or the example is dropped (drop). What each cut example
lost (its prompt, its answer, whole turns, tool calls) is counted and reported, with row numbers.
"""

from __future__ import annotations

import os
from array import array
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

import pyarrow as pa
from lmforge.shared.core import columns, log
from lmforge.shared.core.commands.data import DataPack
from lmforge.shared.core.errors import BadInput
from lmforge.shared.data.aligned import ASSISTANT, turns_of
from lmforge.shared.data.truncation import Counts, Cut, budget, fit_conversation, holes, kept_prompt

if TYPE_CHECKING:
    from lmforge.shared.data.rendering import Rendered

NEEDS = {"pt": ("pt",), "sft": ("sft",), "rm": ("pairwise",), "dpo": ("pairwise",), "kto": ("kto",),
         "ppo": ("sft", "pairwise", "kto")}
IDS = pa.list_(pa.int32())
SCHEMAS = {
    "pt": pa.schema([("input_ids", IDS), ("labels", IDS), ("lengths", IDS)]),
    "sft": pa.schema([("input_ids", IDS), ("labels", IDS), ("lengths", IDS)]),
    "rm": pa.schema([("prompt_ids", IDS), ("chosen_ids", IDS), ("rejected_ids", IDS)]),
    "dpo": pa.schema([("prompt_ids", IDS), ("chosen_ids", IDS), ("rejected_ids", IDS)]),
    "kto": pa.schema([("prompt_ids", IDS), ("response_ids", IDS), ("label", pa.bool_())]),
    "ppo": pa.schema([("prompt_ids", IDS), ("response_ids", IDS), ("tools", pa.string())]),
}
IGNORE = -100
IGNORE_ROW = array("i", [IGNORE])
T = TypeVar("T")
IMAGES = pa.list_(pa.binary())   # packed vision-language rows carry their images


IMAGE_COLUMNS = {"sft": "images", "dpo": "prompt_images", "rm": "prompt_images", "kto": "prompt_images",
                 "ppo": "prompt_images"}   # (TRL's trainers take a column named images as raw images)


def schema_for(stage: str, images: bool = False) -> pa.Schema:
    """The packed schema of a stage (+ the images column of a vision-language model's data)."""
    base = SCHEMAS[stage]
    return base.append(pa.field(IMAGE_COLUMNS[stage], IMAGES)) if images and stage in IMAGE_COLUMNS else base


class Columns:
    """Per-batch results: list columns as flat int32 arrays + lengths (cheap to pickle)."""

    def __init__(self, names: tuple[str, ...]):
        self.flat = {n: array("i") for n in names}
        self.lens = {n: array("i") for n in names}
        self.flags: list[bool] = []
        self.tools: list[str] = []            # ppo: each row's tool schemas (JSON text, "" when none)
        self.images: list[list[bytes]] = []   # vision-language sft: each row's images, in token order
        # the examples that were cut: (row here, example in the row, aligned row number, what it lost)
        self.marks: list[tuple[int, int, int, Cut]] = []

    def put(self, name: str, values) -> None:
        self.flat[name].extend(values)
        self.lens[name].append(len(values))

    def __len__(self) -> int:
        return len(next(iter(self.lens.values())))

    def examples(self, name: str) -> Iterator[array]:
        flat, start = self.flat[name], 0
        for n in self.lens[name]:
            yield flat[start:start + n]
            start += n

    def arrow(self, name: str) -> pa.Array:
        return list_column(self.flat[name], self.lens[name])


def list_column(flat: array, lens) -> pa.Array:
    from itertools import accumulate

    offsets = array("i", accumulate(lens, initial=0))
    return columns.lists(offsets, columns.int32s(flat), IDS)


def loss_count(labels: array) -> int:
    import numpy as np

    return int(np.count_nonzero(np.frombuffer(labels, dtype=np.int32) != IGNORE)) if labels else 0


# ----------------------------------------------------------------------------- the encoder

def _token_range(enc, start: int, end: int) -> tuple[int, int]:
    """Tokens covering characters [start, end) (a token overlapping the span counts)."""
    first = next((t for c in range(start, end) if (t := enc.char_to_token(c)) is not None), None)
    last = next((t for c in range(end - 1, start - 1, -1) if (t := enc.char_to_token(c)) is not None), None)
    if first is None or last is None:
        return 0, 0
    return first, last + 1


def _first_token_at(enc, char: int, default: int) -> int:
    if char < 0:
        return 0
    t = enc.char_to_token(char)
    return default if t is None else t


def _spaces_with_answers(r):
    """The rendering with each span start moved back over the spaces that end its header."""
    from dataclasses import replace

    spans = []
    for a, b in r.spans:
        start = a
        while start > 0 and r.text[start - 1] == " ":
            start -= 1
        spans.append((start if start > 0 else a, b))
    return r if spans == r.spans else replace(r, spans=spans)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indexes: longest first, each into the fullest bin it still fits."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []   # (space left, bin number), kept sorted
    bins: list[list[int]] = []
    for i in order:
        need = lengths[i]
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (space - need, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - need, len(bins) - 1))
    return bins


class Encoder:
    """Everything needed to encode aligned rows for a stage; built once per process."""

    def __init__(self, options: DataPack, tokenizer=None):
        from lmforge.shared.data.reasoning import Reasoning
        from lmforge.shared.data.templates import renderer
        from lmforge.shared.modeldir.tokenizers import (
            add_special_tokens,
            adds_bos,
            load_tokenizer,
        )

        self.o = options
        self.tokenizer = tokenizer or load_tokenizer(options.model)
        # pre-training text is not chat-rendered: no template
        self.reasoning = Reasoning(options.reasoning, options.thinking, options.mask_empty_think)
        self.render = renderer(options.template, self.tokenizer, self.reasoning) if options.stage != "pt" else None
        self.added = add_special_tokens(self.tokenizer, self.render.special_tokens) if self.render else []
        self.backend = self.tokenizer.backend_tokenizer
        self.bos_id = self.tokenizer.bos_token_id if adds_bos(self.tokenizer) else None
        self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None and options.stage == "pt":
            raise BadInput(f"{options.model}: the tokenizer has no EOS token, needed to separate texts")
        from lmforge.shared.data.fasttok import FastBPE

        self.fast = FastBPE.from_hf(self.tokenizer) if os.environ.get("LMFORGE_FAST_TOKENIZER", "1") != "0" else None
        # a vision-language model's image facts (None for a text model)
        from lmforge.shared.data import modalities

        media = modalities.of_model_dir(options.model) if options.stage != "pt" else None
        self.vision = (media.encoder(options.model, self.tokenizer, max_pixels=options.image_max_pixels,
                                     min_pixels=options.image_min_pixels) if media is not None else None)
        # tokens of the answer header (kept when a pairwise/KTO/PPO prompt is cut)
        self.header_tokens = len(self._encode([self.render.header])[0].ids) if self.render and self.render.header else 0

    def _encode(self, texts: list[str]):
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def _fast_ok(self, texts: list[str], ids: list[list[int]]) -> bool:
        """Spot-check the fast path against the Hugging Face tokenizer; turn it off on a difference."""
        if not texts:
            return True
        reference = self._encode(texts)
        if all(r.ids == i for r, i in zip(reference, ids)):
            return True
        log.warn("pack: the fast tokenizer path disagreed with the Hugging Face tokenizer; using the latter")
        assert self.fast is not None  # only asked on the fast path
        self.fast.enabled = False
        return False

    def _encode_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of whole texts."""
        if self.fast is not None and self.fast.enabled:
            ids = self.fast.encode(texts)
            if self._fast_ok(texts[:2], ids[:2]):
                return ids
        return [e.ids for e in self._encode(texts)]

    def _encode_spans(self, rendered: list) -> list[tuple[array[int], list[tuple[int, int]], int]]:
        """For each rendered conversation: ids, the token range of each trained span, and how many
        tokens the last answer's header takes (kept when the prompt is cut)."""
        assert self.render is not None  # every stage but pt renders through a template
        header = len(self.render.header)
        # A header ending in spaces ("Assistant: "): the spaces are trained with the answer. Most
        # tokenizers glue a space to the next word ("▁there"), some keep it apart before other
        # characters ("▁", "{"); either way the untrained prefix is then exactly the tokens of the
        # prompt without its trailing spaces, which is what `serve` feeds the model.
        rendered = [_spaces_with_answers(r) for r in rendered]
        results: list = [None] * len(rendered)
        slow = list(range(len(rendered)))
        if self.fast is not None and self.fast.enabled:
            pieces: list[str]
            slow, plan, pieces = [], [], []
            for i, r in enumerate(rendered):
                marks = {c for a, b in r.spans for c in (a, b)}
                if r.spans:
                    marks.add(r.spans[-1][0] - header)
                cuts = sorted(c for c in marks if 0 < c < len(r.text))
                if all(self.fast.safe_cut(r.text, c) for c in cuts):
                    bounds = [0, *cuts, len(r.text)]
                    plan.append((i, bounds, len(pieces)))
                    pieces += [r.text[x:y] for x, y in zip(bounds, bounds[1:])]
                else:
                    slow.append(i)
            encoded = self.fast.encode(pieces)
            for i, bounds, k in plan:
                parts = encoded[k:k + len(bounds) - 1]
                at, n = {}, 0
                for pos, part in zip(bounds, parts):
                    at[pos] = n
                    n += len(part)
                at[bounds[-1]] = n
                spans = rendered[i].spans
                ranges = [(at[a], at[b]) for a, b in spans]
                head = ranges[-1][0] - at.get(spans[-1][0] - header, ranges[-1][0]) if spans else 0
                ids = array("i")
                for part in parts:
                    ids.extend(part)
                results[i] = (ids, ranges, head)
            checked = [i for i, _, _ in plan[:2]]
            if not self._fast_ok([rendered[i].text for i in checked], [results[i][0].tolist() for i in checked]):
                slow = list(range(len(rendered)))
        if slow:
            for i, enc in zip(slow, self._encode([rendered[i].text for i in slow])):
                spans = rendered[i].spans
                ranges = [_token_range(enc, a, b) for a, b in spans]
                head = ranges[-1][0] - _first_token_at(enc, spans[-1][0] - header, ranges[-1][0]) if spans else 0
                results[i] = (array("i", enc.ids), ranges, head)
        return results

    def encode(self, item: tuple[int, pa.RecordBatch]) -> tuple[Columns, Counts]:
        first_row, batch = item
        rows = batch.to_pylist()
        self._first_row, self._at = first_row, -1
        try:
            return {"pt": self._pt, "sft": self._sft}.get(self.o.stage, self._split)(rows)
        except BadInput as exc:  # _split renders row by row: name the row it was at
            if self._at < 0 or exc.message.startswith("row "):
                raise
            raise BadInput(f"row {first_row + self._at + 1}: {exc.message}", exc.hint) from None

    def _row(self, i: int, render: Callable[[], T]) -> T:
        """Render row i of the batch; a row the template cannot render is named (row numbers
        count from 1 over the whole input)."""
        try:
            return render()
        except BadInput as exc:
            raise BadInput(f"row {self._first_row + i + 1}: {exc.message}", exc.hint) from None

    def _pt(self, rows: list[dict]) -> tuple[Columns, Counts]:
        out = Columns(("input_ids",))
        bos = [self.bos_id] if self.bos_id is not None else []
        for ids in self._encode_ids([r["response"][0]["content"] for r in rows]):
            out.put("input_ids", bos + ids + [self.eos_id])
        return out, Counts(examples=len(rows))

    def _sft(self, rows: list[dict]) -> tuple[Columns, Counts]:
        out = Columns(("input_ids", "labels"))
        counts = Counts(examples=len(rows))
        cutoff = self.o.cutoff
        assert self.render is not None  # sft renders through a template
        render = self.render

        vision = self.vision
        row_images: list[list[bytes]] = []
        row_turns: list[list[dict]] = []   # what a cut removed is told from them

        def conversation(r: dict) -> Callable[[], Rendered]:
            turns = turns_of(r["prompt"]) + turns_of(r["response"])
            if vision is not None:  # images become the family's placeholder text
                turns, images = vision.textual(turns)
                row_images.append(images)
            row_turns.append(turns)
            return lambda: render.conversation(turns, r["system"], r["tools"])

        rendered = [self._row(i, conversation(r)) for i, r in enumerate(rows)]
        ignore = array("i", [IGNORE])
        for k, (ids, ranges, head) in enumerate(self._encode_spans(rendered)):
            row = self._first_row + k + 1
            if not ranges or ranges[-1][0] == ranges[-1][1]:
                counts.drop(row, "no_answer")
                continue
            if self.o.train_on_prompt:
                labels = array("i", ids)
            else:
                labels = ignore * len(ids)
                for t0, t1 in (ranges[-1:] if self.o.mask_history else ranges):
                    labels[t0:t1] = ids[t0:t1]
            fitted: list[bytes] = []
            if vision is not None:  # each placeholder -> its image's tokens (no loss on them)
                ids, labels, shift, fitted = vision.expand(ids, labels, row_images[k],
                                                           f"row {self._first_row + k + 1}")
                ranges = [(shift(a), shift(b)) for a, b in ranges]
                image_tokens = vision.image_tokens(ids)
            # the glue after the last turn goes first, then --truncation decides
            fit = fit_conversation(self.o.truncation, len(ids), ranges, head, cutoff, row_turns[k],
                                   getattr(rendered[k], "turn_of_span", []))
            if fit is None:
                counts.drop(row, "too_long")
                continue
            kept, cut = fit
            if kept != [(0, len(ids))]:
                ids = array("i", b"".join(ids[x:y].tobytes() for x, y in kept))
                labels = array("i", b"".join(labels[x:y].tobytes() for x, y in kept))
                if vision is not None and vision.image_tokens(ids) != image_tokens:
                    counts.drop(row, "image")   # the cut went through an image: raise --cutoff
                    continue
            if cut is not None:
                counts.cut(row, cut)
                out.marks.append((len(out), 0, row, cut))
            out.put("input_ids", ids)
            out.put("labels", labels)
            if vision is not None:
                out.images.append(fitted)
        return self._layout(out), counts

    def _layout(self, cols: Columns) -> Columns:
        """sft rows: one example each, or (packing) best-fit-decreasing bins of this chunk's examples."""
        n = len(cols)
        if self.o.packing_mode == "none":
            cols.flat["lengths"] = array("i", cols.lens["input_ids"])
            cols.lens["lengths"] = array("i", [1]) * n
            return cols
        examples = list(zip(cols.examples("input_ids"), cols.examples("labels")))
        bins = best_fit_decreasing([len(ids) for ids, _ in examples], self.o.cutoff)
        out = Columns(("input_ids", "labels", "lengths"))
        marks = {example: (source, cut) for example, _, source, cut in cols.marks}
        for members in bins:
            for place, i in enumerate(members):   # a cut example: where it went
                if i in marks:
                    out.marks.append((len(out), place, *marks[i]))
            ids, labels = array("i"), array("i")
            for i in members:
                ids.extend(examples[i][0])
                labels.extend(examples[i][1])
            out.put("input_ids", ids)
            out.put("labels", labels)
            out.put("lengths", array("i", [len(examples[i][0]) for i in members]))
            if cols.images:   # each example's images stay with it, in token order
                out.images.append([b for i in members for b in cols.images[i]])
        return out

    def _split(self, rows: list[dict]) -> tuple[Columns, Counts]:
        """rm/dpo/kto/ppo: prompt and response(s) tokenized separately (as TRL does)."""
        stage = self.o.stage
        names = {"kto": ("prompt_ids", "response_ids"), "ppo": ("prompt_ids", "response_ids")}.get(
            stage, ("prompt_ids", "chosen_ids", "rejected_ids"))
        out = Columns(names)
        counts = Counts(examples=len(rows))
        heads, bodies = [], []
        self._at = -1
        assert self.render is not None  # rm/dpo/kto/ppo render through a template
        row_images: list[list[bytes]] = []
        calls: list[bool] = []   # per row: is one of its answers a tool call
        for self._at, r in enumerate(rows):
            prompt, responses = turns_of(r["prompt"]), turns_of(r["response"])
            if self.vision is not None:   # dpo and rm prompts may hold images
                if any(m.get("parts") for m in responses):
                    raise BadInput(f"row {self._first_row + self._at + 1}: an image in an answer of {stage} data "
                                   "(images pack in the prompts of rm, dpo, kto and ppo rows, anywhere in sft)",
                                   "move the image into the prompt")
                prompt, images = self.vision.textual(prompt)
                row_images.append(images)
            if stage == "ppo":  # the prompt, and a reference answer when there is a plain one
                first = responses[0] if responses else None   # a message dict (a (role, content) pair before)
                role = first.get("role") if isinstance(first, dict) else (first[0] if first else None)
                responses = responses[:1] if role == ASSISTANT else []
                calls.append(any(isinstance(x, dict) and x.get("tool_calls") for x in responses))
                heads.append(self.render.generation_prompt(prompt, r["system"], r["tools"]))
                bodies.append([self.render.prompt_response(prompt, x, r["system"], r["tools"])[1]
                               for x in responses] or [""])
                continue
            pairs = [self.render.prompt_response(prompt, x, r["system"], r["tools"]) for x in responses]
            calls.append(any(isinstance(x, dict) and x.get("tool_calls") for x in responses))
            heads.append(pairs[0][0])
            bodies.append([body for _, body in pairs])
        self._at = -1
        head_ids = self._encode_ids(heads)
        body_ids = iter(self._encode_ids([t for texts in bodies for t in texts]))
        head = self.header_tokens
        for i, prompt_ids in enumerate(head_ids):
            row = self._first_row + i + 1
            response_ids = [next(body_ids) for _ in bodies[i]]
            fitted: list[bytes] = []
            if self.vision is not None:   # each placeholder -> its image's tokens
                expanded, _, _, fitted = self.vision.expand(array("i", prompt_ids), IGNORE_ROW * len(prompt_ids),
                                                            row_images[i], f"row {self._first_row + i + 1}")
                prompt_ids = list(expanded)
                image_tokens = self.vision.image_tokens(prompt_ids)
            longest = max(len(x) for x in response_ids)
            if len(prompt_ids) + longest > self.o.cutoff:
                # (a ppo row's reference answer is only read by rewards: it may be cut to nothing)
                fitted_budget = budget(self.o.truncation, len(prompt_ids), longest, head, self.o.cutoff,
                                       answer_needed=stage != "ppo")
                if fitted_budget is None:
                    counts.drop(row, "too_long")
                    continue
                keep_p, keep_r = fitted_budget
                cut = Cut()
                if keep_p < len(prompt_ids):
                    kept = kept_prompt(self.o.truncation, len(prompt_ids), keep_p, head)
                    cut.at["prompt_ids"] = holes(kept, len(prompt_ids))
                    cut.lost.append("prompt")
                    prompt_ids = [t for a, b in kept for t in prompt_ids[a:b]]
                for name, x in zip(names[1:], response_ids):
                    if len(x) > keep_r:
                        cut.at[name] = [[keep_r, len(x) - keep_r]]
                if any(name in cut.at for name in names[1:]):
                    cut.lost.append("answer")
                    if calls[i]:
                        cut.lost.append("tool_calls")
                response_ids = [x[:keep_r] for x in response_ids]
                if self.vision is not None and self.vision.image_tokens(prompt_ids) != image_tokens:
                    counts.drop(row, "image")   # the cut went through an image: raise --cutoff
                    continue
                counts.cut(row, cut)
                out.marks.append((len(out), 0, row, cut))
            if self.vision is not None:
                out.images.append(fitted)
            out.put("prompt_ids", prompt_ids)
            for name, ids in zip(names[1:], response_ids):
                out.put(name, ids)
            if stage == "kto":
                out.flags.append(bool(rows[i]["label"]))
            elif stage == "ppo":
                out.tools.append(rows[i]["tools"] or "")
        return out, counts


# ----------------------------------------------------------------------------- workers
