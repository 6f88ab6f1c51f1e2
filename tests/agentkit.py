"""Helpers for the agent tests: a word-level tokenizer whose decoding gives back the text exactly
(tool calls are JSON, which a space-joining decoder would break), and a scripted "model"."""

from __future__ import annotations

import re
from pathlib import Path

PIECES = r"\s|\d|[A-Za-z_]+|[^\w\s]"   # a space, a digit, a word, one punctuation character


def pieces(text: str, pattern: str = PIECES) -> list[str]:
    return re.findall(pattern, text)


def exact_tokenizer(directory: Path, texts: list[str], specials: list[str], *, eos: str,
                    bos: str | None = None, pad: str | None = None, pattern: str = PIECES) -> Path:
    """A tokenizer with one id per piece of `texts` (see PIECES; `pattern` may cut otherwise, e.g.
    whole numbers) and per special token, whose decode(encode(text)) == text for any text made of
    those pieces. Saved as a model directory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({p for t in texts for p in pieces(t, pattern)} - set(specials))
    vocab = {w: i for i, w in enumerate(["[UNK]", *specials, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token=eos, bos_token=bos,
                                        pad_token=pad or eos, clean_up_tokenization_spaces=False,
                                        additional_special_tokens=[s for s in specials if s not in (eos, bos, pad)])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return directory


class Scripted:
    """A "model" whose turns are given: script[episode] is the list of its turns' texts (each
    written with its end-of-turn token). Records the sequences it was asked to continue."""

    def __init__(self, tokenizer, script: dict[int, list[str]]):
        self.tokenizer, self.script = tokenizer, script
        self.turn: dict[int, int] = {}
        self.seen: list[tuple[int, list[int]]] = []

    def __call__(self, sequences, max_new_tokens, episodes):
        out = []
        for seq, e in zip(sequences, episodes):
            self.seen.append((e, list(seq)))
            k = self.turn.get(e, 0)
            self.turn[e] = k + 1
            out.append(self.tokenizer(self.script[e][k], add_special_tokens=False).input_ids[:max_new_tokens])
        return out, None
