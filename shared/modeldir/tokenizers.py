"""A model directory's tokenizer: loading it (with the tokens `data pack` added), its fingerprint,
the special tokens a chat template needs, and saving it beside trained weights.

The fingerprint identifies a tokenizer by content (its serialized Rust tokenizer, special
tokens included), so `train` can refuse data packed with another tokenizer, naming both.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lmforge.shared.core.errors import BadInput, RunFailure


def load_tokenizer(name: str | Path):
    """A fast (Rust) tokenizer from a local directory or a Hub id."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from transformers import AutoTokenizer

    local = Path(name)
    if local.exists() and not local.is_dir():
        raise BadInput(f"{name}: is a file; --model takes a model directory or a Hub id")
    if local.is_dir() and not any((local / f).exists() for f in (
            "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise BadInput(f"{name}: no tokenizer files (tokenizer.json, tokenizer_config.json...) in this directory",
                       "point --model at a model directory with its tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name))
    except OSError as exc:
        if not local.exists():
            raise BadInput(f"tokenizer '{name}' not found: not a local directory, and not loadable from the "
                           f"Hugging Face Hub", "check the path or id (and your network)") from None
        raise BadInput(f"{name}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
    except (ValueError, KeyError) as exc:
        raise BadInput(f"{name}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise RunFailure(f"{name}: has no fast (Rust) tokenizer", "convert it with transformers first")
    return tokenizer


def load_tokenizer_for(name: str | Path, added: list[str] | None = None):
    """The model's tokenizer with the tokens `data pack` added (and a pad token)."""
    tokenizer = load_tokenizer(name)
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": list(added)}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def add_special_tokens(tokenizer, tokens: list[str] | tuple[str, ...]) -> list[str]:
    """Add the markers a template needs as special tokens when the tokenizer lacks them.

    Returns the tokens added (train adds the same ones and resizes the embeddings)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                     replace_extra_special_tokens=False)
    return missing


def backend_json(tokenizer) -> str:
    """The serialized Rust tokenizer (cached: it takes a while for large vocabularies)."""
    cached = getattr(tokenizer, "_lmforge_json", None)
    if cached is None or cached[0] != len(tokenizer):
        cached = (len(tokenizer), tokenizer.backend_tokenizer.to_str())
        tokenizer._lmforge_json = cached
    return cached[1]


def fingerprint(tokenizer) -> str:
    """What tokenizes, not which Python class holds it: the model (vocabulary, merges), the
    normaliser and pre-tokeniser, the added and special tokens, whether BOS/EOS are added to plain
    text, and the chat template. Byte-identical tokenizer files loaded for different model types
    give the same fingerprint whenever they give the same ids."""
    import json

    backend = json.loads(backend_json(tokenizer))
    added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in backend.get("added_tokens") or [])
    probe = tokenizer("a b").input_ids  # what the post-processor adds around plain text
    content = {
        "model": backend.get("model"), "normalizer": backend.get("normalizer"),
        "pre_tokenizer": backend.get("pre_tokenizer"), "added": added,
        "around_text": [probe[0] if probe and probe[0] in (tokenizer.bos_token_id,) else None,
                        probe[-1] if probe and probe[-1] in (tokenizer.eos_token_id,) else None],
        "bos": tokenizer.bos_token, "eos": tokenizer.eos_token,   # (not pad: training sets one when missing)
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def save_tokenizer(tokenizer, out: str | Path) -> None:
    """`tokenizer.save_pretrained(out)`, checked: the saved tokenizer must load back tokenizing as
    this one does (the same fingerprint), or data packed for the base would be refused with the
    result. transformers 5 leaves Llama's `legacy` out of the saved tokenizer_config.json although it
    chooses the Metaspace pre-tokenizer's prepend scheme on load ("always" vs "first": how text after
    a special token starts), so a sentencepiece model re-saved by a full fine-tune tokenized
    differently; it is written back."""
    import json

    from transformers import AutoTokenizer

    from lmforge.shared.core import log

    tokenizer.save_pretrained(str(out))
    want = fingerprint(tokenizer)
    if fingerprint(AutoTokenizer.from_pretrained(str(out))) == want:
        return
    config_path = Path(out) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if getattr(tokenizer, "legacy", None) is not None:
        config["legacy"] = tokenizer.legacy
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if fingerprint(AutoTokenizer.from_pretrained(str(out))) == want:
            return
    log.warn(f"the tokenizer saved in {out} loads back tokenizing differently from the one trained "
             "(transformers changed it on saving); data packed for the base model may be refused with it")


def describe(tokenizer, name: str | Path, added: list[str]) -> dict:
    """What packed data records about its tokenizer."""
    return {"name": str(name), "fingerprint": fingerprint(tokenizer), "vocab_size": len(tokenizer),
            "bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "added_tokens": list(added)}


def adds_bos(tokenizer) -> bool:
    """Does this tokenizer put BOS in front of plain text by default (Llama, Gemma do)?"""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id
