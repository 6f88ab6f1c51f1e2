"""How `data pack` fits an example into --cutoff (--truncation), and what each cut cost.

Modes (`data pack --truncation`):
    auto   LLaMA-Factory's budget split: a short answer is kept whole, else a short prompt is,
           else both shrink in proportion to their lengths. A cut prompt keeps its beginning
           and the last answer's header (the middle goes); a cut answer loses its end.
    left   the prompt loses its beginning (the latest turns stay); the answer is kept whole;
           an example whose answer, with its header and one token before it, exceeds --cutoff
           is dropped.
    right  the prompt is kept whole; the answer loses its end; an example whose prompt leaves no
           room for one answer token is dropped.
    drop   an example longer than --cutoff is dropped whole.

"The answer" is the last assistant turn (sft), or the longest of the responses (rm/dpo/kto; the
reference answer of ppo). Tokens after the last answer (a template's glue) go first and are no loss.
Under every mode an example is dropped when what it would keep lacks one answer token (a ppo row's
reference answer may go), or the answer's header and one token before it.

What a kept example lost is reported by kind (KINDS): its prompt, its answer, whole earlier turns
(sft: a conversation's user, assistant or tool messages), tool calls or tool results; dropped
examples by reason. `Counts` keeps the totals and the first row numbers of each (row numbers of
the aligned input, from 1); each cut example is also recorded (`Cut`: where in the packed example
tokens were removed, and how many), for `data show --decode`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("auto", "left", "right", "drop")
KINDS = ("prompt", "answer", "turns", "tool_calls")
REASONS = ("too_long", "no_answer", "image")   # why an example was dropped
FIRST = 5        # row numbers kept per kind
RECORDS = 1000   # cut examples recorded one by one in the summary (the counts cover all)
WARN_SHARE = 0.10
NAMES = {"prompt": "prompt cut", "answer": "answer cut", "turns": "whole turns removed",
         "tool_calls": "tool calls or results cut"}


@dataclass
class Cut:
    """What one kept example lost: KINDS, whole messages removed, and per column where tokens went
    ([position in the kept example, tokens removed there], ...)."""

    lost: list[str] = field(default_factory=list)
    turns: int = 0
    at: dict[str, list[list[int]]] = field(default_factory=dict)

    def record(self, row: int, example: int, source: int) -> dict:
        return {"row": row, "example": example, "source": source, "lost": self.lost, "at": self.at,
                **({"turns": self.turns} if self.turns else {})}


@dataclass
class Counts:
    examples: int = 0
    truncated: int = 0       # kept, with something cut
    dropped: int = 0
    lost: dict[str, int] = field(default_factory=dict)        # kind -> examples that lost it
    turns: int = 0                                            # whole messages removed, in all
    dropped_by: dict[str, int] = field(default_factory=dict)  # reason -> examples
    first: dict[str, list[int]] = field(default_factory=dict)  # kind, or "dropped" -> first row numbers

    def cut(self, row: int, cut: Cut) -> None:
        self.truncated += 1
        self.turns += cut.turns
        for kind in cut.lost:
            self.lost[kind] = self.lost.get(kind, 0) + 1
            self._note(kind, row)

    def drop(self, row: int, reason: str) -> None:
        self.dropped += 1
        self.dropped_by[reason] = self.dropped_by.get(reason, 0) + 1
        self._note("dropped", row)

    def _note(self, kind: str, row: int) -> None:
        rows = self.first.setdefault(kind, [])
        if len(rows) < FIRST:
            rows.append(row)

    def add(self, other: "Counts") -> None:
        """Another chunk's counts (chunks come in input order, so the first rows stay the first)."""
        self.examples += other.examples
        self.truncated += other.truncated
        self.dropped += other.dropped
        self.turns += other.turns
        for mine, theirs in ((self.lost, other.lost), (self.dropped_by, other.dropped_by)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n
        for key, rows in other.first.items():
            self.first[key] = (self.first.get(key, []) + rows)[:FIRST]

    def summary(self) -> dict:
        """The figures `data pack` puts in the packed file's summary (`data stats` shows them)."""
        out: dict = {"examples": self.examples, "truncated": self.truncated, "dropped": self.dropped}
        if self.lost:
            out["lost"] = {k: self.lost[k] for k in KINDS if k in self.lost}
        if self.turns:
            out["turns_removed"] = self.turns
        if self.dropped_by:
            out["dropped_by"] = {k: self.dropped_by[k] for k in REASONS if k in self.dropped_by}
        if self.first:
            out["first_rows"] = dict(self.first)
        return out


# ----------------------------------------------------------------------------- the budget

def share_budget(source: int, target: int, cutoff: int) -> tuple[int, int]:
    """How many prompt (source) and response (target) tokens to keep within `cutoff` (auto).

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


def budget(mode: str, prompt: int, answer: int, head: int, cutoff: int,
           answer_needed: bool = True) -> tuple[int, int] | None:
    """(prompt tokens, answer tokens) to keep of an example longer than `cutoff`, or None: drop it.
    `head`: the answer's header, at the end of the prompt (kept whenever the prompt is cut)."""
    if mode == "drop":
        return None
    if mode == "auto":
        keep_p, keep_r = share_budget(prompt, answer, cutoff)
    elif mode == "left":
        keep_p, keep_r = cutoff - answer, answer
    else:   # right
        keep_p, keep_r = prompt, cutoff - prompt
    if (answer_needed and keep_r < 1) or keep_r < 0 or keep_p < min(head + 1, prompt):
        return None
    return keep_p, keep_r


def kept_prompt(mode: str, length: int, keep: int, head: int) -> list[tuple[int, int]]:
    """The token ranges a prompt of `length` keeps of itself: its beginning and the answer's header
    (auto), or its end (left)."""
    if keep >= length:
        return [(0, length)]
    if mode == "left":
        return [(length - keep, length)]
    head = min(head, keep)
    return [r for r in ((0, keep - head), (length - head, length)) if r[1] > r[0]]


def holes(kept: list[tuple[int, int]], length: int) -> list[list[int]]:
    """The tokens a cut removed from a sequence of `length`, as [position in what is kept, count]."""
    out, at, done = [], 0, 0
    for start, end in kept:
        if start > done:
            out.append([at, start - done])
        at += end - start
        done = end
    if length > done:
        out.append([at, length - done])
    return out


# ----------------------------------------------------------------------------- sft conversations

def fit_conversation(mode: str, length: int, spans: list[tuple[int, int]], head: int, cutoff: int,
                     messages: list[dict], span_turns: list[int]) -> tuple[list[tuple[int, int]], Cut | None] | None:
    """The token ranges of a rendered conversation (`length` tokens, trained `spans`, the last one the
    answer) to keep within `cutoff`, and what the cut lost (None: nothing); None: drop it."""
    r0, r1 = spans[-1]
    if length <= cutoff:
        return [(0, length)], None
    if r1 <= cutoff:   # only the glue after the last turn goes
        return [(0, r1)], None
    fitted = budget(mode, r0, r1 - r0, head, cutoff)
    if fitted is None:
        return None
    keep_p, keep_r = fitted
    kept = kept_prompt(mode, r0, keep_p, head)
    if keep_r:
        if kept and kept[-1][1] == r0:
            kept[-1] = (kept[-1][0], r0 + keep_r)
        else:
            kept.append((r0, r0 + keep_r))
    cut = Cut(at={"input_ids": holes(kept, r1)})
    if keep_p < r0:
        cut.lost.append("prompt")
    if keep_r < r1 - r0:
        cut.lost.append("answer")
    _lost_turns(cut, kept, spans, head, messages, span_turns)
    return kept, cut


def _lost_turns(cut: Cut, kept: list[tuple[int, int]], spans: list[tuple[int, int]], head: int,
                messages: list[dict], span_turns: list[int]) -> None:
    """Whole messages removed and tool calls or results cut, from where the messages lie: each
    assistant turn is its trained span; the messages between two assistant turns lie between the
    first's span and the second's header."""
    if len(span_turns) != len(spans) or not messages:
        return

    def removed(a: int, b: int) -> int:
        return (b - a) - sum(max(0, min(b, y) - max(a, x)) for x, y in kept)

    tools = False
    previous_end, previous_turn = 0, -1
    for (a, b), turn in zip(spans, span_turns):
        between = [m for m in messages[previous_turn + 1:turn] if m.get("role") != "system"]
        gap = (previous_end, max(previous_end, a - head))
        gone = removed(*gap)
        if between and gone and gone == gap[1] - gap[0]:
            cut.turns += len(between)
        if gone and any(m.get("role") == "tool" for m in between):
            tools = True
        lost = removed(a, b)
        if lost and turn < len(messages):
            if lost == b - a:
                cut.turns += 1
            if messages[turn].get("tool_calls"):
                tools = True
        previous_end, previous_turn = b, turn
    if cut.turns:
        cut.lost.append("turns")
    if tools:
        cut.lost.append("tool_calls")


def describe(counts: Counts, cutoff: int, mode: str) -> tuple[str, str | None]:
    """The log line's part about cuts, and a warning when more than WARN_SHARE of the examples
    were cut or dropped ("" and None when nothing was)."""
    def rows(kind: str, before: str = "") -> str:
        first = counts.first.get(kind) or []
        named = f"rows {', '.join(map(str, first))}{', ...' if len(first) == FIRST else ''}" if first else ""
        inside = "; ".join(x for x in (before, named) if x)
        return f" ({inside})" if inside else ""

    parts = []
    if counts.truncated:
        lost = [f"{NAMES[k]} in {counts.lost[k]:,}" + rows(k, f"{counts.turns:,} turns" if k == "turns" else "")
                for k in KINDS if counts.lost.get(k)]
        parts.append(f"{counts.truncated:,} cut to fit --cutoff {cutoff} (--truncation {mode}): " + ", ".join(lost))
    if counts.dropped:
        why = {"too_long": "longer than --cutoff", "no_answer": "with nothing to train on",
               "image": "cut through an image"}
        reasons = ", ".join(f"{n:,} {why[k]}" for k, n in counts.dropped_by.items())
        parts.append(f"{counts.dropped:,} dropped: {reasons}" + rows("dropped"))
    share = (counts.truncated + counts.dropped) / counts.examples if counts.examples else 0.0
    warning = None
    if share > WARN_SHARE:
        warning = (f"pack: {share:.0%} of the examples were cut or dropped at --cutoff {cutoff}: raise --cutoff, or "
                   "choose --truncation; `lmforge data show --decode` shows what was cut")
    return "; ".join(parts), warning
