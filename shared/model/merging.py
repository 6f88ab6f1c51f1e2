"""`adapter merge`: fold one or more PEFT adapters into their base model.

The result is a plain Hugging Face model directory (safetensors shards, tokenizer with any tokens
the adapters added, a generation config whose EOS ids are the template's stop words, and
lmforge.json). It is written to a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.shared.core import log, rundir
from lmforge.shared.core.commands.model import AdapterMerge
from lmforge.shared.core.errors import BadInput


def _adapter_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise BadInput(f"{path}: not a directory", "give an adapter directory made by `lmforge train`")
    rundir.require_finished(p)
    if not (p / "adapter_config.json").exists():
        hint = "this is a full model, not an adapter" if (p / "config.json").exists() else "no adapter_config.json"
        raise BadInput(f"{path}: not a PEFT adapter ({hint})")
    return p


def load_with_adapters(base: str, adapters: list[str], dtype, device: str = "cpu", merge_all: bool = False,
                       attn: str = "auto"):
    """Base model + adapters; returns (model, tokenizer, records). All adapters but the last are
    merged in; the last stays a PEFT adapter (it can be switched off) unless merge_all."""
    from lmforge.shared.model.models import attention_for, resize_to
    from lmforge.shared.modeldir.config import load_config
    from lmforge.shared.modeldir.tokenizers import load_tokenizer_for
    from lmforge.shared.modeldir.weights import model_class

    dirs = [_adapter_dir(a) for a in adapters]
    records = [rundir.read_record(d) for d in dirs]
    half = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(dtype), "fp32")
    kernel = attention_for(load_config(base), attn, device, half)
    added = []
    for record in records:
        for token in record.get("added_tokens", []):
            if token not in added:
                added.append(token)
    tokenizer = load_tokenizer_for(base, added)
    for d, record in zip(dirs, records):
        want = record.get("tokenizer_fingerprint")
        if want:
            from lmforge.shared.modeldir.tokenizers import fingerprint

            have = fingerprint(tokenizer)
            if have != want:
                raise BadInput(f"adapter {d} was trained with tokenizer {want}, but base {base} gives {have}",
                               "merge it into the base model it was trained on")
    # a causal LM, PEFT-wrapped while an adapter is applied (PEFT forwards merge_and_unload dynamically)
    model: Any = model_class(base).from_pretrained(str(base), dtype=dtype, attn_implementation=kernel)
    resize_to(model, tokenizer)
    from peft import PeftModel

    for d in dirs:
        try:
            model = PeftModel.from_pretrained(model, str(d))
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise BadInput(f"adapter {d} does not fit base model {base} ({first})",
                           "merge it into the model it was trained on") from None
        if merge_all or d != dirs[-1]:
            model = model.merge_and_unload()
    return model.to(device), tokenizer, records


def _check_shard_size(size: str) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        ok = convert_file_size_to_int(size) > 0
    except ValueError:
        ok = False
    if not ok:
        raise BadInput(f"--max-shard-size {size}: not a size", "a whole number and a unit, e.g. 2GB or 500MB")


def merge(o: AdapterMerge) -> Path:
    """`adapter merge`: the base with the adapters folded in, a plain model directory at `o.output`."""
    import torch
    from lmforge.shared.modeldir.config import is_quantized
    from lmforge.shared.modeldir.weights import write_generation_config

    base, adapters, out, dtype_name = o.base, o.adapters, Path(o.output), o.dtype
    max_shard_size, overwrite = o.max_shard_size, o.overwrite
    _check_shard_size(max_shard_size)   # before minutes of loading
    if is_quantized(base):
        raise BadInput(f"{base}: holds quantized weights, which adapters cannot be merged into",
                       "merge into the original model, then quantize the result with `lmforge model quantize`")
    busy = (out.is_dir() and any(out.iterdir())) or (out.exists() and not out.is_dir())
    if busy and not overwrite:
        raise BadInput(f"{out}: exists", "pass --overwrite to replace it")
    dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    model, tokenizer, records = load_with_adapters(base, adapters, dtype, merge_all=True)
    with rundir.staged(out) as tmp:
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        from lmforge.shared.modeldir.tokenizers import save_tokenizer

        save_tokenizer(tokenizer, str(tmp))  # checked to load back alike
        from lmforge.shared.modeldir.weights import copy_image_processor

        copy_image_processor(base, tmp)   # a merged vision-language model stays one
        stops = []
        for record in records:
            stops += [s for s in record.get("stop_words", []) if s not in stops]
        write_generation_config(base, tmp, tokenizer, stops or [tokenizer.eos_token])
        last = records[-1] if records else {}
        rundir.write_record(tmp, rundir.record(
            "model", method="merged", base_model=rundir.model_ref(base),
            adapters=[{"path": str(Path(a).resolve()), "method": r.get("method"), "stage": r.get("stage")}
                      for a, r in zip(adapters, records)],
            template=last.get("template"), stop_words=stops, added_tokens=last.get("added_tokens", []),
            dtype=dtype_name))
    log.info(f"adapter merge: {len(adapters)} adapter(s) merged into {base} -> {out}")
    return out


def describe(directory: str | Path) -> str:
    record = rundir.read_record(directory)
    return json.dumps({k: record.get(k) for k in ("kind", "method", "stage", "base_model")})
