"""`data pack`: aligned rows -> token ids and labels for one training stage.

Per stage (columns of the packed Arrow data):
    pt      input_ids, labels, lengths       texts + EOS, concatenated, cut into --cutoff blocks
    sft     input_ids, labels, lengths       chat-rendered; labels -100 outside assistant outputs
    rm/dpo  prompt_ids, chosen_ids, rejected_ids
    kto     prompt_ids, response_ids, label
    ppo     prompt_ids, response_ids         the generation prompt (+ the reference answer, if any)

`lengths` lists the examples inside a row: one entry unpacked; with --packing several (the row
is their concatenation); with --neat-packing training restarts position ids at each boundary so
attention never crosses examples. Labels are -100 where there is no loss.

Truncation shares the --cutoff budget between prompt and response the way LLaMA-Factory does
(a short response is kept whole; otherwise both are cut in proportion), so a long prompt never
wipes out the response. A cut prompt keeps its beginning and its last turn header (the middle
goes); a cut response loses its end (and so its EOS). Examples that cannot keep a header and
one response token are dropped. Both are counted and reported.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

import pyarrow as pa
from lmforge.shared.core import catalog
from lmforge.shared.core import columns, log
from lmforge.shared.core.errors import BadInput
from lmforge.shared.data.aligned import ASSISTANT, turns_of

if TYPE_CHECKING:
    from lmforge.shared.data.templates import Rendered

STAGES = catalog.STAGES
NEEDS = {"pt": ("pt",), "sft": ("sft",), "rm": ("pairwise",), "dpo": ("pairwise",), "kto": ("kto",),
         "ppo": ("sft", "pairwise", "kto")}
IDS = pa.list_(pa.int32())
SCHEMAS = {
    "pt": pa.schema([("input_ids", IDS), ("labels", IDS), ("lengths", IDS)]),
    "sft": pa.schema([("input_ids", IDS), ("labels", IDS), ("lengths", IDS)]),
    "rm": pa.schema([("prompt_ids", IDS), ("chosen_ids", IDS), ("rejected_ids", IDS)]),
    "dpo": pa.schema([("prompt_ids", IDS), ("chosen_ids", IDS), ("rejected_ids", IDS)]),
    "kto": pa.schema([("prompt_ids", IDS), ("response_ids", IDS), ("label", pa.bool_())]),
    "ppo": pa.schema([("prompt_ids", IDS), ("response_ids", IDS)]),
}
IGNORE = -100
IGNORE_ROW = array("i", [IGNORE])
T = TypeVar("T")
IMAGES = pa.list_(pa.binary())   # issue 17: packed vision-language rows carry their images


IMAGE_COLUMNS = {"sft": "images", "dpo": "prompt_images", "rm": "prompt_images", "kto": "prompt_images",
                 "ppo": "prompt_images"}   # (TRL's trainers take a column named images as raw images)


def schema_for(stage: str, images: bool = False) -> pa.Schema:
    """The packed schema of a stage (+ the images column of a vision-language model's data)."""
    base = SCHEMAS[stage]
    return base.append(pa.field(IMAGE_COLUMNS[stage], IMAGES)) if images and stage in IMAGE_COLUMNS else base


_DEFAULTS = catalog.defaults("data pack")   # the options' declared defaults


@dataclass
class PackOptions:
    model: str
    template: str = _DEFAULTS["template"]
    stage: str = _DEFAULTS["stage"]
    cutoff: int = _DEFAULTS["cutoff"]
    packing: bool = _DEFAULTS["packing"]
    neat_packing: bool = _DEFAULTS["neat_packing"]
    train_on_prompt: bool = _DEFAULTS["train_on_prompt"]
    mask_history: bool = _DEFAULTS["mask_history"]
    reasoning: str = _DEFAULTS["reasoning"]
    thinking: str = _DEFAULTS["thinking"]
    mask_empty_think: bool = _DEFAULTS["mask_empty_think"]
    num_proc: int = _DEFAULTS["num_proc"]
    seed: int = _DEFAULTS["seed"]
    image_max_pixels: int = _DEFAULTS["image_max_pixels"]   # issue 17: vision-language data
    image_min_pixels: int = _DEFAULTS["image_min_pixels"]

    @property
    def packing_mode(self) -> str:
        if self.stage == "pt":
            return "neat" if self.neat_packing else "concat"
        return "neat" if self.neat_packing else ("packing" if self.packing else "none")


@dataclass
class Counts:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0

    def add(self, other: "Counts") -> None:
        self.examples += other.examples
        self.truncated += other.truncated
        self.dropped += other.dropped


def share_budget(source: int, target: int, cutoff: int) -> tuple[int, int]:
    """How many prompt (source) and response (target) tokens to keep within `cutoff`.

    A response shorter than half the budget stays whole; else a prompt shorter than half keeps
    its length; else both shrink in proportion to their lengths."""
    if target * 2 < cutoff:
        max_target = cutoff
    elif source * 2 < cutoff:
        max_target = cutoff - source
    else:
        max_target = int(cutoff * (target / (source + target)))
    new_target = min(max_target, target)
    new_source = min(max(cutoff - new_target, 0), source)
    return new_source, new_target


class Columns:
    """Per-batch results: list columns as flat int32 arrays + lengths (cheap to pickle)."""

    def __init__(self, names: tuple[str, ...]):
        self.flat = {n: array("i") for n in names}
        self.lens = {n: array("i") for n in names}
        self.flags: list[bool] = []
        self.images: list[list[bytes]] = []   # vision-language sft: each row's images, in token order

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


def cut_prompt(ids: list[int], keep: int, header: int) -> list[int]:
    """Keep `keep` prompt tokens: the beginning, and the last `header` tokens (the answer's header)."""
    if keep >= len(ids):
        return ids
    header = min(header, keep)
    return ids[: keep - header] + (ids[len(ids) - header:] if header else [])


class Encoder:
    """Everything needed to encode aligned rows for a stage; built once per process."""

    def __init__(self, options: PackOptions, tokenizer=None):
        from lmforge.shared.data.templates import Reasoning, renderer
        from lmforge.shared.data.tokenizing import (
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
        # issue 17: a vision-language model's image facts (None for a text model)
        from lmforge.shared.data import multimodal

        self.vision = (multimodal.Vision(options.model, self.tokenizer, options.image_max_pixels,
                                         options.image_min_pixels)
                       if options.stage != "pt" and multimodal.is_vision_model(options.model) else None)
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

        def conversation(r: dict) -> Callable[[], Rendered]:
            turns = turns_of(r["prompt"]) + turns_of(r["response"])
            if vision is not None:  # images become the family's placeholder text
                turns, images = vision.textual(turns)
                row_images.append(images)
            return lambda: render.conversation(turns, r["system"], r["tools"])

        rendered = [self._row(i, conversation(r)) for i, r in enumerate(rows)]
        ignore = array("i", [IGNORE])
        for k, (ids, ranges, head) in enumerate(self._encode_spans(rendered)):
            if not ranges or ranges[-1][0] == ranges[-1][1]:
                counts.dropped += 1
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
            r0, r1 = ranges[-1]
            if len(ids) > cutoff:  # the glue after the last turn goes first, then share the budget
                counts.truncated += 1
                keep_p, keep_r = share_budget(r0, r1 - r0, cutoff)
                if keep_r < 1 or keep_p < min(head + 1, r0):
                    counts.dropped += 1
                    continue
                keep_head = min(head, keep_p)
                cut = [(0, keep_p - keep_head), (r0 - keep_head, r0), (r0, r0 + keep_r)]
                ids = array("i", b"".join(ids[x:y].tobytes() for x, y in cut))
                labels = array("i", b"".join(labels[x:y].tobytes() for x, y in cut))
                if vision is not None and vision.image_tokens(ids) != image_tokens:
                    counts.dropped += 1   # the cut went through an image: raise --cutoff
                    continue
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
        for members in bins:
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
        for self._at, r in enumerate(rows):
            prompt, responses = turns_of(r["prompt"]), turns_of(r["response"])
            if self.vision is not None:   # issue 17: dpo and rm prompts may hold images
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
                heads.append(self.render.generation_prompt(prompt, r["system"], r["tools"]))
                bodies.append([self.render.prompt_response(prompt, x, r["system"], r["tools"])[1]
                               for x in responses] or [""])
                continue
            pairs = [self.render.prompt_response(prompt, x, r["system"], r["tools"]) for x in responses]
            heads.append(pairs[0][0])
            bodies.append([body for _, body in pairs])
        self._at = -1
        head_ids = self._encode_ids(heads)
        body_ids = iter(self._encode_ids([t for texts in bodies for t in texts]))
        head = self.header_tokens
        for i, prompt_ids in enumerate(head_ids):
            response_ids = [next(body_ids) for _ in bodies[i]]
            fitted: list[bytes] = []
            if self.vision is not None:   # each placeholder -> its image's tokens
                expanded, _, _, fitted = self.vision.expand(array("i", prompt_ids), IGNORE_ROW * len(prompt_ids),
                                                            row_images[i], f"row {self._first_row + i + 1}")
                prompt_ids = list(expanded)
                image_tokens = self.vision.image_tokens(prompt_ids)
            longest = max(len(x) for x in response_ids)
            if len(prompt_ids) + longest > self.o.cutoff:
                counts.truncated += 1
                keep_p, keep_r = share_budget(len(prompt_ids), longest, self.o.cutoff)
                if (stage != "ppo" and keep_r < 1) or keep_p < min(head + 1, len(prompt_ids)):
                    counts.dropped += 1
                    continue
                prompt_ids = cut_prompt(prompt_ids, keep_p, head)
                response_ids = [x[:keep_r] for x in response_ids]
                if self.vision is not None and self.vision.image_tokens(prompt_ids) != image_tokens:
                    counts.dropped += 1   # the cut went through an image: raise --cutoff
                    continue
            if self.vision is not None:
                out.images.append(fitted)
            out.put("prompt_ids", prompt_ids)
            for name, ids in zip(names[1:], response_ids):
                out.put(name, ids)
            if stage == "kto":
                out.flags.append(bool(rows[i]["label"]))
        return out, counts


# ----------------------------------------------------------------------------- workers

_WORKER: Encoder | None = None


def _work(item: tuple[int, pa.RecordBatch]) -> tuple[Columns, Counts]:
    assert _WORKER is not None  # set before the pool forks
    return _WORKER.encode(item)


def encoded_batches(encoder: Encoder, batches: Iterator[tuple[int, pa.RecordBatch]],
                    num_proc: int) -> Iterator[tuple[Columns, Counts]]:
    """Encode batches in order, here or in `num_proc` forked workers (which inherit the encoder)."""
    global _WORKER
    if num_proc <= 1:
        for batch in batches:
            yield encoder.encode(batch)
        return
    import multiprocessing as mp

    _WORKER = encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one Rust thread per worker process
    pool = mp.get_context("fork").Pool(num_proc, initializer=_default_stop_signals)
    try:
        yield from pool.imap(_work, batches, chunksize=1)
        pool.close()   # done: the workers end on their own (no SIGTERM racing a worker that holds the queue's lock)
    except BaseException:
        pool.terminate()   # an error, Ctrl-C, or the reader stopped early
        raise
    finally:
        pool.join()


def _default_stop_signals() -> None:
    """Pool workers die on SIGTERM/SIGHUP (Pool.terminate), instead of inheriting lmforge's handler,
    which raises an exception to clean up: a worker blocked on a lock the pool holds would never end."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


# ----------------------------------------------------------------------------- rows out

@dataclass
class Stats:
    counts: Counts = field(default_factory=Counts)
    rows: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    capacity: int = 0   # rows x cutoff, for packing efficiency
    images: int = -1    # vision-language data: images in the rows (-1: text data)

    def as_dict(self, options: PackOptions) -> dict:
        d: dict[str, int | float] = {"examples": self.counts.examples, "truncated": self.counts.truncated,
                                     "dropped": self.counts.dropped, "rows": self.rows, "tokens": self.tokens}
        if options.stage in ("pt", "sft"):
            d["loss_tokens"] = self.loss_tokens
            d["loss_fraction"] = round(self.loss_tokens / self.tokens, 4) if self.tokens else 0.0
        if options.packing_mode != "none" and self.capacity:
            d["packing_efficiency"] = round(self.tokens / self.capacity, 4)
        if self.images >= 0:
            d["images"] = self.images
        return d


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


class RowWriter:
    """Encoded chunks -> output record batches; cuts pt text into --cutoff blocks."""

    def __init__(self, options: PackOptions, stats: Stats, images: bool = False):
        self.o, self.stats = options, stats
        self.schema = schema_for(options.stage, images)
        self._pt_ids = array("i")      # pt: tokens not yet in a block
        self._pt_docs: list[int] = []  # ... and the lengths of the documents they belong to

    def add(self, cols: Columns) -> Iterator[pa.RecordBatch]:
        if self.o.stage == "pt":
            for doc in cols.examples("input_ids"):
                self._pt_ids.extend(doc)
                self._pt_docs.append(len(doc))
            yield from self._pt_blocks(final=False)
        elif len(cols):
            packed = self.o.stage == "sft" and self.o.packing_mode != "none"
            yield from self._emit(cols, capacity=len(cols) * self.o.cutoff if packed else 0)

    def finish(self) -> Iterator[pa.RecordBatch]:
        if self.o.stage == "pt":
            yield from self._pt_blocks(final=True)

    def _emit(self, out: Columns, capacity: int = 0) -> Iterator[pa.RecordBatch]:
        names = [n for n in self.schema.names if n not in ("label", "images", "prompt_images")]
        rows = len(out.lens[names[0]])
        self.stats.rows += rows
        self.stats.capacity += capacity
        self.stats.tokens += sum(len(out.flat[n]) for n in names if n not in ("labels", "lengths"))
        if "labels" in out.flat:
            self.stats.loss_tokens += loss_count(out.flat["labels"])
        arrays = [out.arrow(n) for n in names]
        if self.o.stage == "kto":
            arrays.append(columns.bools(out.flags))
        if len(self.schema.names) > len(SCHEMAS[self.o.stage].names):   # issue 17: the rows' images, in token order
            self.stats.images += sum(len(x) for x in out.images)
            arrays.append(pa.array(out.images, type=IMAGES))
        yield pa.record_batch(arrays, schema=self.schema)

    def _pt_blocks(self, final: bool) -> Iterator[pa.RecordBatch]:
        """Full --cutoff blocks of the concatenated texts (and, at the end, the shorter rest).

        Each block's `lengths` are its pieces of documents (neat packing) or the block itself."""
        cutoff, neat = self.o.cutoff, self.o.neat_packing
        out = Columns(("input_ids", "labels", "lengths"))
        start, docs = 0, self._pt_docs
        d = 0
        while len(self._pt_ids) - start >= cutoff or (final and len(self._pt_ids) > start):
            size = min(cutoff, len(self._pt_ids) - start)
            block = self._pt_ids[start:start + size]
            start += size
            pieces, need = array("i"), size
            while need:
                if docs[d] <= need:
                    pieces.append(docs[d])
                    need -= docs[d]
                    d += 1
                else:
                    pieces.append(need)
                    docs[d] -= need
                    need = 0
            out.put("input_ids", block)
            out.put("labels", block)
            out.put("lengths", pieces if neat else array("i", [size]))
        self._pt_ids, self._pt_docs = self._pt_ids[start:], docs[d:]
        if len(out):
            yield from self._emit(out, capacity=len(out) * cutoff)


def check_stage(meta: dict, source_name: str, stage: str) -> None:
    from lmforge.shared.core.meta import require

    have = meta.get("stage")
    hint = {"pairwise": "pairwise data packs for --stage rm or dpo (or ppo)",
            "kto": "KTO data packs for --stage kto", "pt": "text data packs for --stage pt",
            "sft": "chat data packs for --stage sft or ppo"}.get(have or "", "align the data for this stage")
    require(meta, source_name, kind="aligned", stages=NEEDS[stage], hint=hint)


def log_summary(stats: dict, options: PackOptions) -> None:
    parts = [f"{stats['examples']:,} examples -> {stats['rows']:,} rows, {stats['tokens']:,} tokens"]
    if stats["truncated"]:
        parts.append(f"{stats['truncated']:,} truncated to {options.cutoff}")
    if stats["dropped"]:
        parts.append(f"{stats['dropped']:,} dropped")
    if "packing_efficiency" in stats:
        parts.append(f"packing efficiency {stats['packing_efficiency']:.1%}")
    if "loss_fraction" in stats:
        parts.append(f"{stats['loss_fraction']:.1%} of tokens with loss")
    log.info("pack: " + "; ".join(parts))


CHUNK = 4096  # examples encoded together; --packing bins the examples of one chunk


def numbered(batches: Iterator[pa.RecordBatch], rows: int = CHUNK) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row number, batch) in pieces of `rows`, for encoding and error messages."""
    start = 0
    for batch in batches:
        for offset in range(0, batch.num_rows, rows):
            piece = batch.slice(offset, rows)
            yield start, piece
            start += piece.num_rows


def validate(options: PackOptions) -> None:
    if options.stage not in STAGES:
        raise BadInput(f"unknown stage '{options.stage}'", f"use one of {', '.join(STAGES)}")
    if options.cutoff < 8:
        raise BadInput(f"--cutoff {options.cutoff} is too small", "use at least 8 tokens")
    if (options.packing or options.neat_packing) and options.stage not in ("sft", "pt"):
        raise BadInput(f"--packing applies to sft and pt data, not {options.stage}",
                       "drop --packing/--neat-packing for this stage")
    if options.num_proc < 1:
        raise BadInput("--num-proc must be at least 1")
    if options.train_on_prompt and options.mask_history:
        raise BadInput("--train-on-prompt and --mask-history contradict each other (loss on every prompt token, "
                       "or on the last answer only)", "choose one")


def metadata(encoder: Encoder, options: PackOptions, source_meta: dict, step: dict) -> dict:
    from lmforge.shared.data.tokenizing import describe

    tpl: dict | None = {"name": encoder.render.name} if encoder.render else None
    if tpl is not None and (options.reasoning, options.thinking, options.mask_empty_think) != ("auto", "auto", False):
        # eval and serve render the way the model was trained (templates.renderer_for reads it back)
        tpl["reasoning"] = {"keep": options.reasoning, "thinking": options.thinking,
                            "mask_empty_think": options.mask_empty_think}
    if tpl is not None and options.template == "auto":
        import hashlib

        tpl["chat_template_sha256"] = hashlib.sha256(str(encoder.tokenizer.chat_template).encode()).hexdigest()[:16]
    return {"kind": "packed", "stage": options.stage, "template": tpl,
            "tokenizer": describe(encoder.tokenizer, options.model, encoder.added),
            "cutoff": options.cutoff, "packing": options.packing_mode,
            "train_on_prompt": options.train_on_prompt, "mask_history": options.mask_history,
            "stop_words": encoder.render.stop_words() if encoder.render else [encoder.tokenizer.eos_token],
            **({"vision": encoder.vision.metadata()} if encoder.vision is not None else {}),
            "provenance": source_meta.get("provenance", []) + [step]}


def run(encoder: Encoder, batches: Iterator[pa.RecordBatch], options: PackOptions, stats: Stats) -> Iterator[pa.RecordBatch]:
    """Encode and lay out all rows; fills `stats`."""
    writer = RowWriter(options, stats, images=encoder.vision is not None)
    if encoder.vision is not None:
        stats.images = 0
    with log.Progress("pack", unit="examples") as progress:
        for cols, counts in encoded_batches(encoder, numbered(batches), options.num_proc):
            stats.counts.add(counts)
            progress.advance(counts.examples)
            yield from writer.add(cols)
        yield from writer.finish()
    if stats.rows == 0:
        raise BadInput(f"--cutoff {options.cutoff} leaves no example: all {stats.counts.examples:,} were dropped"
                       if stats.counts.examples else "the input has no rows",
                       "raise --cutoff" if stats.counts.examples else "check the input")
