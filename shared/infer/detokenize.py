"""One generated row's answer text as its tokens come: what may be streamed now, and whether a
stop string has ended it.

Decoding the whole answer again for every new token costs time quadratic in its length, on the
generation thread, for every row of the batch. Instead each token decodes only a short window,
as vLLM and TGI do (incremental detokenization): the tokens from `prefix` on, where
tokens[prefix:read] are those whose text settled last time. The new text is what that window's
text adds to the text of tokens[prefix:read] alone; it settles once it does not end in U+FFFD
(a character whose bytes have not all come yet). Stop strings are looked for only in the text
that is new since the last token, plus the (longest stop - 1) characters before it.

The text at every step is the one a full decode gives, so what streams, where a stop string cuts
and the final answer are those of decoding the whole answer each time. Decoders are local (a
token changes only the text near it), with one exception handled here: a byte-fallback
tokenizer (sentencepiece) writes a whole run of byte tokens as U+FFFD while it is not valid
UTF-8, so a byte token can turn text already settled into U+FFFD, for a moment (a character
begun) or for good (invalid bytes). While the window's only change is U+FFFD at its end, a full
decode shows nothing new either, so the row waits. Any other rewrite, and new text with U+FFFD
inside it (where a run may have rewritten text before the window), is decoded whole, once, and
the window starts again from there. Byte-level BPE (GPT-2's scheme) never rewrites: its tokens
skip that check.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


def visible(text: str, lead: str) -> str:
    """The answer without the spaces that belong to the prompt (decoders may already drop them)."""
    return text[len(lead):] if lead and text.startswith(lead) else text


def first_stop(text: str, stops: list[str]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


def stop_prefix(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could begin a stop string (held back from the stream)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


def safe_prefix(text: str, stops: list[str]) -> str:
    """Text that can be streamed now: no trailing partial character, no possible stop-string start."""
    text = text.rstrip(REPLACEMENT)
    hold = stop_prefix(text, stops)
    return text[:len(text) - hold] if hold else text


def byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer decodes as byte-level BPE alone (GPT-2's scheme: Qwen, Llama 3): its
    text is its tokens' bytes read as UTF-8, so a token never rewrites the text before it, even
    after invalid bytes."""
    try:
        from tokenizers import decoders

        return isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel)
    except (ImportError, AttributeError):
        return False


class RowText:
    """A row's answer, token by token: `add(token, last)` -> (text to stream now, stopped)."""

    def __init__(self, tokenizer: Any, lead: str = "", stops: list[str] | tuple[str, ...] = ()):
        self.tokenizer, self.lead = tokenizer, lead
        self.stops = [s for s in stops if s]
        self.reach = max((len(s) for s in self.stops), default=1) - 1   # characters a stop reaches back
        # a stop string holding U+FFFD could match a character whose bytes have not all come: such
        # rows decode whole at every token
        self.whole = any(REPLACEMENT in s for s in self.stops)
        self.local = byte_level(tokenizer)
        self.tokens: list[int] = []
        self.prefix = self.read = 0
        self.prefix_text = ""      # the text of tokens[prefix:read] decoded alone
        self.size = 0              # characters settled: the full decode of tokens[:read]
        self.pending = ""          # the unsettled text after them
        self.tail, self.tail_at = "", 0   # the settled text from character tail_at on (all still looked at)
        self.sent: list[str] = []  # the pieces streamed so far
        self.sent_size = 0
        self.in_step = True        # the text still begins with what was streamed
        self.cut = 0               # len(lead) when the text begins with the lead, else 0
        self.lead_known = not lead  # whether the settled text decides `cut`
        self.search_from = 0       # where in the visible text the next stop search starts
        self.stale = False         # settled text was rewritten and has not settled again
        self.full: tuple[int, str] = (0, "")   # the last full decode: (tokens, text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self) -> str:
        """The answer so far, decoded whole, without the prompt's lead."""
        if self.full[0] != len(self.tokens):
            self.full = (len(self.tokens), self.decode(self.tokens))
        return visible(self.full[1], self.lead)

    def streamed(self) -> str:
        return "".join(self.sent)

    def add(self, token: int, last: bool = False) -> tuple[str, bool]:
        """Take the next token -> (text to stream now, whether a stop string ended the answer).
        `last`: no token follows (the row's token limit), so nothing is held back."""
        self.tokens.append(token)
        if self.whole or last or self.stale:
            return self._whole(last)
        window = self.decode(self.tokens[self.prefix:])
        if not window.startswith(self.prefix_text):
            changed = window[_common_prefix(window, self.prefix_text):]
            if changed and not changed.strip(REPLACEMENT):
                return "", False   # byte fallback mid-character: a full decode shows nothing new either
            self.stale = True
            return self._whole(last)
        added = window[len(self.prefix_text):]
        if not self.local and REPLACEMENT in added.rstrip(REPLACEMENT):
            # U+FFFD inside the new text: invalid bytes, which may also have rewritten text before the
            # window (byte fallback writes a whole invalid run so): decoded whole, to be sure
            self.stale = True
            return self._whole(last)
        if added and not window.endswith(REPLACEMENT):
            self.tail += added
            self.size += len(added)
            self.prefix, self.read = self.read, len(self.tokens)
            self.prefix_text = self.decode(self.tokens[self.prefix:self.read])
            self.pending = ""
        else:
            self.pending = added
        if not self.lead_known:
            # the lead is not settled yet: the text is a few characters, looked at whole (nothing
            # has been trimmed from tail: that happens only once the lead is settled)
            return self._observe(self.tail + self.pending, last)
        return self._step()

    def _step(self) -> tuple[str, bool]:
        """What streams and stops, looking at the new text only: the text settled before it was
        searched already (up to `reach` characters back) and streamed already (up to the held back)."""
        low = self._low()                                         # a character index in the full text
        recent = self.tail[low - self.tail_at:] + self.pending
        begin = self.sent_size + self.cut - low                   # where the unsent text starts in `recent`
        out, stopped = "", False
        hit = first_stop(recent[self.search_from + self.cut - low:], self.stops) if self.stops else None
        if hit is not None:
            end, stopped = self.search_from + self.cut - low + hit, True
        else:
            shown = recent.rstrip(REPLACEMENT)
            end = len(shown) - stop_prefix(shown, self.stops)
        if self.in_step and end > begin:
            out = recent[begin:end]
            self._sent(out)
        self.search_from = max(self.search_from, self.size - self.cut - self.reach)
        keep = self._low()
        if keep - self.tail_at > 1024:   # drop settled text nothing looks at any more, in batches
            self.tail, self.tail_at = self.tail[keep - self.tail_at:], keep
        return out, stopped

    def _low(self) -> int:
        """Where the text still looked at starts: the unsent text (while the stream can go on) and
        the stop search's reach back."""
        return (min(self.sent_size, self.search_from) if self.in_step else self.search_from) + self.cut

    def _whole(self, last: bool) -> tuple[str, bool]:
        """This step from a full decode. After a rewrite, once the text settles again the window
        starts over from it."""
        self.text()
        full = self.full[1]
        if self.stale and not full.endswith(REPLACEMENT):
            self.stale = False
            self.tail, self.tail_at, self.size, self.pending = full, 0, len(full), ""
            self.read = len(self.tokens)
            self.prefix_text = self.decode(self.tokens[self.prefix:])
        return self._observe(full, last)

    def _observe(self, full: str, last: bool) -> tuple[str, bool]:
        """A step over the whole text, as decoding the whole answer every token does it."""
        shown = visible(full, self.lead)
        self.cut = len(full) - len(shown)
        self.in_step = shown.startswith(self.streamed())
        cut = first_stop(shown, self.stops)
        if cut is not None:
            safe = shown[:cut]
        else:
            safe = shown if last else safe_prefix(shown, self.stops)
        out = ""
        if self.in_step and len(safe) > self.sent_size:
            out = safe[self.sent_size:]
            self._sent(out)
        self.search_from = max(0, min(len(shown), self.size - self.cut) - self.reach)
        self.lead_known = self.size >= len(self.lead) and not self.stale
        return out, cut is not None

    def _sent(self, text: str) -> None:
        self.sent.append(text)
        self.sent_size += len(text)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
