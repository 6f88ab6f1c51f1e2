"""`data show --decode`: packed rows as the text the model reads, with what it is trained on marked.

Each row is decoded with the tokenizer it was packed with (`-m MODEL`, else the packed metadata's
tokenizer when that is a local directory). Marks, on a terminal in colour, in a pipe as text:

    [[ ... ]]                   trained tokens (labels not -100): answers, or the whole text with
                                --train-on-prompt; in rm/dpo rows the chosen and rejected answers
    --- example 2 of 3 ---      where the next example of a packed row starts
    [... 57 tokens cut ...]     where `data pack` removed tokens to fit --cutoff (a cut prompt's
                                middle or beginning, a cut answer's end); the row's header line
                                names the aligned row it came from and what it lost

Cut marks come from the packed file's summary, which records the first cut examples (truncation.py
RECORDS of them): beyond those a cut example shows no mark.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from lmforge.shared.core.arrowio import ArrowSource
from lmforge.shared.core.errors import BadInput

IGNORE = -100
STYLES = {"trained": "bold green", "cut": "bold white on red", "head": "bold cyan", "example": "cyan",
          "label": "bold"}
PLAIN = {"trained": ("[[", "]]")}
ANSWERS = {"dpo": ("chosen_ids", "rejected_ids"), "rm": ("chosen_ids", "rejected_ids"), "kto": ("response_ids",),
           "ppo": ("response_ids",)}


def tokenizer_for(meta: dict, model: str | None, source: str):
    """The tokenizer packed data was made with: from `model`, else from the metadata's name when it
    is a local directory; refused when its fingerprint is not the one recorded."""
    from lmforge.shared.modeldir.tokenizers import fingerprint, load_tokenizer_for

    recorded = meta.get("tokenizer") or {}
    name = model or str(recorded.get("name") or "")
    if not model and not (name and Path(name).is_dir()):
        raise BadInput(f"{source}: packed with tokenizer '{name or '?'}', which is not a local directory here",
                       "give the model (or its tokenizer directory) with -m MODEL")
    tokenizer = load_tokenizer_for(name, recorded.get("added_tokens") or [])
    if recorded.get("fingerprint") and fingerprint(tokenizer) != recorded["fingerprint"]:
        raise BadInput(f"{source}: packed with tokenizer {recorded.get('name')} (fingerprint "
                       f"{recorded['fingerprint']}); {name} has tokenizer {fingerprint(tokenizer)}",
                       "give the model the data was packed for with -m MODEL")
    return tokenizer


class Page:
    """Text with marks: styled runs for a terminal (rich), or plain text with the PLAIN markers."""

    def __init__(self, color: bool):
        self.color = color
        self.runs: list[tuple[str, str | None]] = []

    def add(self, text: str, kind: str | None = None) -> None:
        if text:
            self.runs.append((text, kind))

    def plain(self) -> str:
        out = []
        for text, kind in self.runs:
            opening, closing = PLAIN.get(kind or "", ("", ""))
            out.append(opening + text + closing)
        return "".join(out)

    def rich(self):
        from rich.text import Text

        text = Text()
        for run, kind in self.runs:
            text.append(run, style=STYLES.get(kind or "") or None)
        return text


def decode_pieces(tokenizer, ids: list[int], bounds: list[int]) -> list[str]:
    """The text of ids[a:b] for each pair of consecutive `bounds`, as it reads inside the whole
    (a piece decoded alone can lose the space that joins it to what comes before)."""
    pieces, before, done = [], "", 0
    for end in bounds[1:]:
        text = tokenizer.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.startswith(before):
            pieces.append(text[len(before):])
        else:   # a character split between pieces: each decoded on its own
            pieces.append(tokenizer.decode(ids[done:end], skip_special_tokens=False,
                                           clean_up_tokenization_spaces=False))
        before, done = text, end
    return pieces


def _sequence(page: Page, tokenizer, ids: list[int], trained: list[bool], holes: list[list[int]]) -> None:
    """One example's tokens: trained runs marked, and a mark where each cut removed tokens."""
    cuts = {at: n for at, n in holes}
    bounds = sorted({0, len(ids), *(a for a in cuts if 0 <= a <= len(ids)),
                     *(i for i in range(1, len(ids)) if trained[i] != trained[i - 1])})
    for start, text in zip(bounds, decode_pieces(tokenizer, ids, bounds)):
        if start in cuts:
            page.add(f"[... {cuts.pop(start):,} tokens cut ...]", "cut")
        page.add(text, "trained" if start < len(ids) and trained[start] else None)
    for n in cuts.values():   # at the very end: a cut answer
        page.add(f"[... {n:,} tokens cut ...]", "cut")


def _cut_note(cut: dict | None) -> str:
    if not cut:
        return ""
    lost = ", ".join(x.replace("_", " ") + (f" ({cut['turns']})" if x == "turns" and cut.get("turns") else "")
                     for x in cut.get("lost", []))
    return f"aligned row {cut['source']}, cut: {lost}"


def pages(source: ArrowSource, limit: int, tokenizer, summary: dict | None, color: bool) -> Iterator[Page]:
    """The first `limit` rows (0: all) of packed data, one Page each."""
    stage = source.meta.get("stage")
    cuts = {(c["row"], c["example"]): c for c in (summary or {}).get("cut_examples") or []}
    number = 0
    for batch in source.batches():
        for row in batch.to_pylist():
            number += 1
            if limit and number > limit:
                return
            page = Page(color)
            if "input_ids" in row:
                _packed_row(page, tokenizer, row, number, cuts)
            else:
                _split_row(page, tokenizer, row, number, cuts.get((number, 1)), stage)
            yield page


def _packed_row(page: Page, tokenizer, row: dict, number: int, cuts: dict) -> None:
    ids, labels = row["input_ids"], row.get("labels") or row["input_ids"]
    lengths = row.get("lengths") or [len(ids)]
    trained = [label != IGNORE for label in labels]
    notes = [f"{k}: {_cut_note(cuts[(number, k)])}" if len(lengths) > 1 else _cut_note(cuts[(number, k)])
             for k in range(1, len(lengths) + 1) if (number, k) in cuts]
    counted = f"{len(lengths)} examples, " if len(lengths) > 1 else ""
    page.add(f"=== row {number}: {counted}{len(ids):,} tokens, {sum(trained):,} trained"
             + (f"; {'; '.join(notes)}" if notes else "") + " ===\n", "head")
    start = 0
    for k, n in enumerate(lengths, 1):
        if len(lengths) > 1:
            page.add(f"{'' if k == 1 else chr(10)}--- example {k} of {len(lengths)} ---\n", "example")
        cut = cuts.get((number, k))
        _sequence(page, tokenizer, ids[start:start + n], trained[start:start + n],
                  (cut or {}).get("at", {}).get("input_ids", []))
        start += n
    page.add("\n")


def _split_row(page: Page, tokenizer, row: dict, number: int, cut: dict | None, stage: str | None) -> None:
    """rm/dpo/kto/ppo rows: the prompt, then each answer (trained, but ppo's reference answer)."""
    note = _cut_note(cut)
    page.add(f"=== row {number}" + (f"; {note}" if note else "") + " ===\n", "head")
    at = (cut or {}).get("at", {})
    for name in ("prompt_ids", *ANSWERS.get(stage or "", ())):
        if name not in row:
            continue
        label = name.removesuffix("_ids")
        if name == "response_ids" and "label" in row:
            label += " (desirable)" if row["label"] else " (undesirable)"
        if stage == "ppo" and name == "response_ids":
            label = "reference answer"
        page.add(f"{label}:\n", "label")
        ids = row[name]
        trained = name != "prompt_ids" and stage != "ppo"
        _sequence(page, tokenizer, ids, [trained] * len(ids), at.get(name, []))
        page.add("\n")
