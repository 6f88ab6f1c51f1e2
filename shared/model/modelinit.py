"""`model init`: a randomly initialised model in Hugging Face format, for from-scratch runs.

The tokenizer is copied from a model (--tokenizer) or trained on aligned data
(--train-tokenizer): a byte-level BPE with <|endoftext|>, <|im_start|> and <|im_end|> as special
tokens and a ChatML chat template, so the model works with `--template chatml` or `auto`.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.shared.core import log, rundir
from lmforge.shared.core.commands.model import ARCHS, ModelInit
from lmforge.shared.core.errors import BadInput

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML; the same text as lmforge's `chatml` template (tested), so training and serving agree.
CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _texts(path: str):
    from lmforge.shared.core.arrowio import open_arrow

    source = open_arrow(path)
    if source.meta.get("kind") != "aligned":
        raise BadInput(f"--train-tokenizer {path}: needs aligned data", "make it with `lmforge data align`")
    for batch in source.batches():
        for row in batch.to_pylist():
            if row.get("system"):
                yield row["system"]
            for message in (row["prompt"] or []) + (row["response"] or []):
                yield message["content"]


def train_tokenizer(path: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_texts(path), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML_JINJA
    return tokenizer


def init_model(o: ModelInit) -> dict:
    """`model init`: a randomly initialised model (and its tokenizer) in `o.output`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out, arch, layers, hidden, heads, kv_heads = Path(o.output), o.arch, o.layers, o.hidden, o.heads, o.kv_heads
    intermediate, vocab_size, max_position = o.intermediate, o.vocab_size, o.max_position
    tokenizer_dir, train_from, seed, overwrite = o.tokenizer, o.train_tokenizer, o.seed, o.overwrite

    if arch not in ARCHS:
        raise BadInput(f"unknown architecture '{arch}'", f"use one of {', '.join(ARCHS)}")
    if bool(tokenizer_dir) == bool(train_from):
        raise BadInput("give exactly one of --tokenizer DIR and --train-tokenizer DATA")
    kv_heads = kv_heads or heads
    if hidden % heads or heads % kv_heads or (hidden // heads) % 2:
        raise BadInput(f"--hidden {hidden} / --heads {heads} / --kv-heads {kv_heads} do not fit",
                       "hidden must split into an even head size; heads must be a multiple of kv-heads")
    if min(layers, hidden, heads, vocab_size, max_position) < 1:
        raise BadInput("sizes must be positive")
    smallest = 256 + len(SPECIALS)   # byte-level BPE starts from every byte, then adds the special tokens
    if train_from and vocab_size < smallest:
        raise BadInput(f"--vocab-size {vocab_size}: a byte-level BPE tokenizer needs at least {smallest} tokens "
                       f"(256 bytes + {len(SPECIALS)} special tokens)", f"give --vocab-size {smallest} or more")
    busy = (out.is_dir() and any(out.iterdir())) or (out.exists() and not out.is_dir())
    if busy and not overwrite:
        raise BadInput(f"{out}: exists", "pass --overwrite to replace it")
    if tokenizer_dir:
        from lmforge.shared.modeldir.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        assert train_from  # exactly one of the two, checked above
        tokenizer = train_tokenizer(train_from, vocab_size)
        log.info(f"model init: trained a {len(tokenizer):,}-token BPE tokenizer on {train_from}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.for_model(
        arch, vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_position, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if arch == "qwen3":
        config.head_dim = hidden // heads
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with rundir.staged(out) as tmp:
        model.save_pretrained(str(tmp))
        from lmforge.shared.modeldir.tokenizers import save_tokenizer

        save_tokenizer(tokenizer, str(tmp))  # checked to load back alike
        from lmforge.shared.modeldir.weights import write_generation_config

        stops = ["<|im_end|>"] if "<|im_end|>" in tokenizer.get_vocab() else [tokenizer.eos_token]
        write_generation_config(str(tmp), tmp, tokenizer, stops)
        parameters = sum(p.numel() for p in model.parameters())
        record = rundir.record(
            "model", method="init", arch=arch, parameters=parameters, seed=seed, stop_words=stops,
            config={"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
                    "intermediate": config.intermediate_size, "vocab_size": len(tokenizer),
                    "max_position": max_position},
            tokenizer={"trained_on": train_from} if train_from else {"from": tokenizer_dir})
        rundir.write_record(tmp, record)
    log.info(f"model init: {arch}, {layers} layers, hidden {hidden}, {parameters:,} parameters -> {out}")
    return record
