"""An exact, faster tokenizer path for byte-level BPE tokenizers (Qwen, Llama-3, GPT-2/SmolLM).

Hugging Face's Rust tokenizer tracks character offsets for every token; `data pack` only needs
token ids and a few boundaries per example. For byte-level BPE vocabularies whose merge order
equals their id order (true for Qwen, Llama-3 and GPT-2 style tokenizers, which came from
tiktoken or were built that way), `tiktoken` produces the same ids about three times faster.

Exactness is guarded three ways: conversion refuses any tokenizer feature it does not model
(normalizers other than NFC, other pre-tokenizers, added-token flags, merge order != id order);
every batch is spot-checked against the Hugging Face tokenizer (any difference turns the fast
path off for the rest of the run); and an example is cut into pieces only at positions where the
tokenizer itself must split (next to a special token, or at a boundary of the pre-tokenizer's
regex, checked on the text around it). Otherwise the caller falls back to offsets.

tiktoken is optional (`pip install lmforge[fast]`); without it this path is simply not used.
"""

from __future__ import annotations

import json
import unicodedata

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_WINDOW = 256   # how far back to look for a point where the regex scan is known to restart
_AHEAD = 64


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-character table (byte-level BPE vocabularies are written in it)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


class FastBPE:
    def __init__(self, encoding, pattern: str, nfc: bool, specials: list[str]):
        import regex

        self.encoding = encoding
        self.allowed = frozenset(specials)
        self.nfc = nfc
        self.pattern = regex.compile(pattern)
        ordered = sorted(specials, key=len, reverse=True)
        self.special = regex.compile("|".join(regex.escape(s) for s in ordered)) if ordered else None
        self.longest_special = max((len(s) for s in specials), default=0)
        self.enabled = True

    @classmethod
    def from_hf(cls, tokenizer) -> "FastBPE | None":
        try:
            import tiktoken
        except ImportError:
            return None
        from lmforge.shared.modeldir.tokenizers import backend_json

        cfg = json.loads(backend_json(tokenizer))
        model = cfg.get("model") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout"):
            return None
        if (cfg.get("decoder") or {}).get("type") != "ByteLevel":
            return None  # (the post-processor is not used: we encode without special tokens)
        normalizer = cfg.get("normalizer")
        if normalizer not in (None, {"type": "NFC"}):
            return None
        pattern = _pattern(cfg.get("pre_tokenizer"))
        if pattern is None:
            return None
        for added in cfg.get("added_tokens", []):
            if added.get("lstrip") or added.get("rstrip") or added.get("single_word") or added.get("normalized"):
                return None
        vocab = model["vocab"]
        merges = model.get("merges", [])
        # tiktoken merges the pair whose result has the lowest id; HF follows the merges list:
        # the same only when merged ids grow along the list
        last = -1
        for merge in merges:
            a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
            merged = vocab.get(a + b)
            if merged is None or merged <= last:
                return None
            last = merged
        to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        try:
            ranks = {bytes(to_byte[c] for c in token): i for token, i in vocab.items()}
        except KeyError:
            return None
        if len(ranks) != len(vocab):
            return None
        if any(bytes([b]) not in ranks for b in range(256)):
            return None   # tiktoken needs every single byte as a token (it panics on text it cannot cover)
        specials = {a["content"]: a["id"] for a in cfg.get("added_tokens", [])}
        try:
            encoding = tiktoken.Encoding(f"lmforge-{id(tokenizer)}", pat_str=pattern, mergeable_ranks=ranks,
                                         special_tokens=specials)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a pattern its regex engine does not take; a Rust panic (BaseException)
            if type(exc).__name__ == "Terminated":
                raise
            return None
        return cls(encoding, pattern, normalizer is not None, list(specials))

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.nfc:
            texts = [t if unicodedata.is_normalized("NFC", t) else unicodedata.normalize("NFC", t) for t in texts]
        encode, allowed = self.encoding.encode, self.allowed  # a plain loop: encode_batch's thread pool
        return [encode(t, allowed_special=allowed, disallowed_special=()) for t in texts]  # costs more here

    def safe_cut(self, text: str, p: int) -> bool:
        """Does tokenizing text[:p] and text[p:] apart give the same tokens as the whole?"""
        if p <= 0 or p >= len(text):
            return True
        sync = 0
        if self.special is not None:
            if self.special.match(text, p):
                return True
            start = max(0, p - _WINDOW)
            for m in self.special.finditer(text, start, p + self.longest_special):
                if m.end() == p:
                    return True
                if m.end() < p:
                    sync = m.end()
                elif m.start() < p:
                    return False  # p falls inside a special token
            if sync == 0 and start > 0:
                return False
        elif p > _WINDOW:
            return False
        end = min(len(text), p + _AHEAD)
        if self.special is not None:
            nxt = self.special.search(text, p, end)
            if nxt:
                end = nxt.start()
        # the regex scan restarts at `sync`; p must be where one of its pieces begins
        return any(m.start() == p for m in self.pattern.finditer(text, sync, end))


def _pattern(pre: dict | None) -> str | None:
    """The regex of a byte-level pre-tokenizer, or None when it is another kind."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") != "Sequence":
        return None
    parts = pre.get("pretokenizers") or []
    if len(parts) != 2:
        return None
    split, level = parts
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or "Regex" not in (split.get("pattern") or {})):
        return None
    if level.get("type") != "ByteLevel" or level.get("use_regex") or level.get("add_prefix_space"):
        return None
    return split["pattern"]["Regex"]
