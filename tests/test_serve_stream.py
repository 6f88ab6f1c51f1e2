"""The streamer's incremental detokenization (`infer.detokenize.RowText`) against decoding the
whole answer at every token, as `serve` streamed before: over random token sequences from a
byte-level BPE tokenizer (Qwen3) and a sentencepiece one with byte fallback (stories260K), with
multi-byte characters, special tokens, stop strings split across tokens, and the prompt's lead.
Every step must stream the same pieces and stop at the same token."""

from __future__ import annotations

import random

import pytest
from conftest import shared_path

pytest.importorskip("transformers")


def full_decoding(tokenizer, tokens: list[int], lead: str, stops: list[str], max_tokens: int):
    """What streaming by decoding the whole answer at each token sends: (pieces, tokens taken, stopped)."""
    from lmforge.shared.infer.detokenize import first_stop, safe_prefix, visible

    sent, pieces = "", []
    for n in range(1, len(tokens) + 1):
        text = visible(tokenizer.decode(tokens[:n], skip_special_tokens=True), lead)
        cut = first_stop(text, stops)
        if cut is not None:
            text = text[:cut]
        done = cut is not None or n >= max_tokens
        safe = text if done else safe_prefix(text, stops)
        if len(safe) > len(sent) and safe.startswith(sent):
            pieces.append(safe[len(sent):])
            sent = safe
        if done:
            return pieces, n, cut is not None
    return pieces, len(tokens), False


def incremental(tokenizer, tokens: list[int], lead: str, stops: list[str], max_tokens: int):
    from lmforge.shared.infer.detokenize import RowText

    row, pieces = RowText(tokenizer, lead, stops), []
    for n, token in enumerate(tokens, 1):
        piece, stopped = row.add(token, last=n >= max_tokens)
        if piece:
            pieces.append(piece)
        if stopped or n >= max_tokens:
            return pieces, n, stopped
    return pieces, len(tokens), False


def random_rows(tokenizer, seed: int, count: int, long_every: int = 40):
    """(tokens, lead, stops, max_tokens): tokens drawn from all ids, with many multi-byte and some
    special ones; stop strings cut from the decoded text at random places (so they often span
    tokens, and sometimes hold U+FFFD); every `long_every`-th row is 300-900 tokens long."""
    rng = random.Random(seed)
    ids = range(len(tokenizer))
    multibyte = [i for i in ids if any(ord(c) > 127 for c in tokenizer.convert_ids_to_tokens(i) or "")]
    special = list(tokenizer.all_special_ids)
    for k in range(count):
        length = rng.randint(300, 900) if k % long_every == long_every - 1 else rng.randint(1, 50)
        tokens = []
        for _ in range(length):
            r = rng.random()
            tokens.append(rng.choice(multibyte) if r < 0.35 else rng.choice(special) if r < 0.4 else rng.choice(ids))
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        stops = []
        for _ in range(rng.randint(0, 3)):
            if len(text) > 2:
                at = rng.randrange(len(text) - 1)
                stops.append(text[at:at + rng.randint(1, 6)])
        yield tokens, rng.choice(["", "", " ", "  "]), stops, rng.randint(1, length + 3)


@pytest.mark.parametrize("name", ["tokenizers/qwen3", "models/stories260K"])
def test_incremental_detokenizing_streams_what_full_decoding_streams(name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(shared_path(name)))
    checked = stopped = 0
    for tokens, lead, stops, max_tokens in random_rows(tokenizer, seed=11, count=1500):
        expected = full_decoding(tokenizer, tokens, lead, stops, max_tokens)
        assert incremental(tokenizer, tokens, lead, stops, max_tokens) == expected, (tokens, lead, stops, max_tokens)
        checked += 1
        stopped += expected[2]
    assert checked == 1500 and stopped > 300   # stop strings did end many rows


def byte_tokens(tokenizer, text: str) -> list[int]:
    """`text` as one token per UTF-8 byte: byte-level BPE's byte alphabet (GPT-2's mapping of bytes
    to printable characters), or sentencepiece's <0xNN> byte-fallback pieces."""
    data = text.encode("utf-8")
    if tokenizer.convert_tokens_to_ids("<0x41>") not in (None, tokenizer.unk_token_id):
        return tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in data])
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    alphabet = {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}
    return tokenizer.convert_tokens_to_ids([alphabet[b] for b in data])


@pytest.mark.parametrize("name", ["tokenizers/qwen3", "models/stories260K"])
def test_characters_and_stop_strings_split_across_tokens(name):
    """A CJK character and an emoji whose bytes come one token at a time, and stop strings that
    span tokens: the same pieces as full decoding, and the answer whole at the end."""
    from lmforge.shared.infer.detokenize import first_stop
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(shared_path(name)))
    words = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    tokens = [*words("Once upon"), *byte_tokens(tokenizer, "中文"), *words(" and"), *byte_tokens(tokenizer, " 😀"),
              *words(" the END of it")]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    assert "中文" in text and "😀" in text
    first_byte = len(words("Once upon")) + 1
    assert tokenizer.decode(tokens[:first_byte]).endswith("\ufffd")   # a character really is split
    for stops in ([], ["END"], ["D of", "文 a"], ["😀"], ["中"], ["n中", "x"]):
        expected = full_decoding(tokenizer, tokens, "", stops, len(tokens))
        got = incremental(tokenizer, tokens, "", stops, len(tokens))
        assert got == expected, stops
        cut = first_stop(text, stops)
        assert "".join(got[0]) == (text[:cut] if cut is not None else text)
        assert got[2] == (cut is not None)


def test_a_long_answer_decodes_a_window_per_token_not_the_whole_answer():
    """The work per token stays flat: decoding calls see a few tokens, however long the answer."""
    from lmforge.shared.infer.detokenize import RowText
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(shared_path("tokenizers/qwen3")))
    tokens = tokenizer("The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸。 " * 200,
                       add_special_tokens=False).input_ids[:2000]
    seen: list[int] = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            seen.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    row = RowText(Counting(), " ", ["STOP HERE"])
    streamed = "".join(row.add(t, last=n == len(tokens))[0] for n, t in enumerate(tokens, 1))
    assert streamed == tokenizer.decode(tokens, skip_special_tokens=True).removeprefix(" ")
    assert max(seen) == len(tokens)   # the last token: the answer is decoded whole once, at its end
    assert sorted(seen)[-2] <= 8      # every other call: a window of a few tokens
