"""`data pack`: the encoder (pack.py) run over a dataset, in worker processes when asked, and its
examples laid out as rows: one per example, packed several to a row (best-fit decreasing), or pt
text cut into --cutoff blocks; with the figures `data stats` and the log line report."""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
from lmforge.shared.core import columns, log
from lmforge.shared.core.commands.data import DataPack
from lmforge.shared.core.errors import BadInput
from lmforge.shared.data.pack import (IMAGES, NEEDS, SCHEMAS, Columns, Counts, Encoder, loss_count, schema_for)
from lmforge.shared.data.truncation import RECORDS, describe

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
    cut_examples: list[dict] = field(default_factory=list)   # the first RECORDS cut examples, where they went

    def as_dict(self, options: DataPack) -> dict:
        d: dict = {**self.counts.summary(), "rows": self.rows, "tokens": self.tokens}
        if options.stage != "pt":
            d["truncation"] = options.truncation
        if self.cut_examples:
            d["cut_examples"] = self.cut_examples
        if options.stage in ("pt", "sft"):
            d["loss_tokens"] = self.loss_tokens
            d["loss_fraction"] = round(self.loss_tokens / self.tokens, 4) if self.tokens else 0.0
        if options.packing_mode != "none" and self.capacity:
            d["packing_efficiency"] = round(self.tokens / self.capacity, 4)
        if self.images >= 0:
            d["images"] = self.images
        return d


class RowWriter:
    """Encoded chunks -> output record batches; cuts pt text into --cutoff blocks."""

    def __init__(self, options: DataPack, stats: Stats, images: bool = False):
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
        names = [n for n in self.schema.names if n not in ("label", "tools", "images", "prompt_images")]
        rows = len(out.lens[names[0]])
        for row, example, source, cut in out.marks:
            if len(self.stats.cut_examples) < RECORDS:
                self.stats.cut_examples.append(cut.record(self.stats.rows + row + 1, example + 1, source))
        self.stats.rows += rows
        self.stats.capacity += capacity
        self.stats.tokens += sum(len(out.flat[n]) for n in names if n not in ("labels", "lengths"))
        if "labels" in out.flat:
            self.stats.loss_tokens += loss_count(out.flat["labels"])
        arrays = [out.arrow(n) for n in names]
        if self.o.stage == "kto":
            arrays.append(columns.bools(out.flags))
        elif self.o.stage == "ppo":
            arrays.append(pa.array(out.tools, type=pa.string()))
        if len(self.schema.names) > len(SCHEMAS[self.o.stage].names):   # the rows' images, in token order
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


def log_summary(stats: dict, options: DataPack, counts: Counts) -> None:
    """The pack line on stderr: examples, rows, tokens, what was cut or dropped (by kind, with the
    first rows), packing; a warning when many examples were cut."""
    parts = [f"{stats['examples']:,} examples -> {stats['rows']:,} rows, {stats['tokens']:,} tokens"]
    cuts, warning = describe(counts, options.cutoff, options.truncation)
    if cuts:
        parts.append(cuts)
    if "packing_efficiency" in stats:
        parts.append(f"packing efficiency {stats['packing_efficiency']:.1%}")
    if "loss_fraction" in stats:
        parts.append(f"{stats['loss_fraction']:.1%} of tokens with loss")
    log.info("pack: " + "; ".join(parts))
    if warning:
        log.warn(warning)


CHUNK = 4096  # examples encoded together; --packing bins the examples of one chunk


def numbered(batches: Iterator[pa.RecordBatch], rows: int = CHUNK) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row number, batch) in pieces of `rows`, for encoding and error messages."""
    start = 0
    for batch in batches:
        for offset in range(0, batch.num_rows, rows):
            piece = batch.slice(offset, rows)
            yield start, piece
            start += piece.num_rows


def metadata(encoder: Encoder, options: DataPack, source_meta: dict, step: dict) -> dict:
    from lmforge.shared.modeldir.tokenizers import describe

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


def run(encoder: Encoder, batches: Iterator[pa.RecordBatch], options: DataPack, stats: Stats) -> Iterator[pa.RecordBatch]:
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


def pack_dataset(o: DataPack) -> dict:
    """`data pack`: aligned data (a file or stdin) tokenized for `o.stage` and written to `o.output`
    (atomically) or stdout; returns the figures (examples, rows, tokens, truncation, ...)."""
    from lmforge.shared.core import arrowio, meta
    from lmforge.shared.data import aligned

    arrowio.check_output(o.output)
    if o.template != "auto":
        from lmforge.shared.data.templates import get

        get(o.template)  # an unknown name fails before the tokenizer loads
    source = arrowio.open_arrow(o.input)
    check_stage(source.meta, source.name, o.stage)
    encoder = Encoder(o)
    if encoder.added:
        assert encoder.render is not None  # tokens are added only for a chat template
        log.info(f"pack: template {encoder.render.name} needs {', '.join(encoder.added)}, missing from the "
                 "tokenizer: added as special tokens (train adds them too and resizes the embeddings)")
    metadata_ = metadata(encoder, o, source.meta, meta.step(o.command, o.values()))
    stats = Stats()
    with arrowio.ArrowOutput(o.output, schema_for(o.stage, encoder.vision is not None), metadata_) as out:
        batches = aligned.batches(source) if o.stage != "pt" else source.batches()  # version 1 upgraded
        for batch in run(encoder, batches, o, stats):
            out.write(batch)
        summary = stats.as_dict(o)
        out.set_summary(summary)
    log_summary(summary, o, stats.counts)
    return summary
