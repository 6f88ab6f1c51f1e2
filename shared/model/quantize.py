"""`model quantize`: a quantized model directory that transformers loads, with perplexity before
and after on held-out text.

Methods and the libraries behind them (auto-gptq and autoawq are unmaintained and do not work
with transformers 5; their maintained successor is GPTQModel, which transformers itself uses to
load GPTQ and AWQ checkpoints):
- bnb-nf4, bnb-int8: bitsandbytes 4-bit NF4 (double quantisation) / 8-bit, no calibration;
  runs on CPU and GPU;
- gptq: GPTQModel, calibrated on --calib rows; runs on CPU (slowly) and GPU;
- awq: GPTQModel's AWQ, calibrated; its quantizer needs a CUDA GPU.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from lmforge.shared.core import log, rundir
from lmforge.shared.core.commands.model import QUANT_METHODS, ModelQuantize
from lmforge.shared.core.errors import BadInput, LmforgeError, RunFailure

METHODS = QUANT_METHODS
_GPTQ_MIN_TOKENS = 10   # GPTQModel removes calibration rows of this many tokens or fewer
BITS = {"bnb-nf4": (4,), "bnb-int8": (8,), "gptq": (4, 8, 3, 2), "awq": (4,)}  # the first is the default


def _texts_and_ids(path: str | None, tokenizer, limit: int, max_length: int):
    from lmforge.shared.core.arrowio import open_arrow
    from lmforge.shared.model.perplexity import sequences_from

    if not path:
        return []
    return sequences_from(open_arrow(path), tokenizer, limit=limit, max_length=max_length)


def quantize(o: ModelQuantize) -> dict:
    """`model quantize`: the quantized model in `o.output`; returns perplexity before and after."""
    import torch
    from lmforge.shared.modeldir.tokenizers import load_tokenizer
    from lmforge.shared.model.models import attention_for, choose_device
    from lmforge.shared.modeldir.config import load_config
    from lmforge.shared.model.perplexity import perplexity

    model, out, method, bits, group_size = o.model, Path(o.output), o.method, o.bits, o.group_size
    calib, calib_samples, eval_data, eval_samples = o.calib, o.calib_samples, o.eval_data, o.eval_samples
    max_length, overwrite, seed, attn = o.max_length, o.overwrite, o.seed, o.attn
    if method not in METHODS:
        raise BadInput(f"unknown method '{method}'", f"use one of {', '.join(METHODS)}")
    bits = bits or BITS[method][0]
    if bits not in BITS[method]:
        raise BadInput(f"--bits {bits} does not go with --method {method}", f"use {' or '.join(map(str, BITS[method]))}")
    config = load_config(model)   # a missing or unusable model is named first
    if method in ("gptq", "awq") and not calib:
        raise BadInput(f"--method {method} needs calibration data", "pass --calib an aligned or packed dataset")
    busy = (out.is_dir() and any(out.iterdir())) or (out.exists() and not out.is_dir())
    if busy and not overwrite:
        raise BadInput(f"{out}: exists", "pass --overwrite to replace it")
    device = choose_device()
    # the attention kernel of every model loaded here (gemma2, gpt_oss: eager only; archrules)
    kernel = attention_for(config, attn, device.kind, "fp32" if device.kind == "cpu" else "bf16")
    if method == "awq" and device.kind != "cuda":
        raise BadInput("--method awq quantizes on a CUDA GPU only (GPTQModel's AWQ quantizer)",
                       "use gptq, bnb-int8 or bnb-nf4 on a CPU; AWQ checkpoints made elsewhere still load here")
    if method == "gptq":   # before calibration: what GPTQModel cannot pack or run fails late (or kills the process)
        _check_gptq_widths(config, bits, group_size, device.kind)
    tokenizer = load_tokenizer(model)
    torch.manual_seed(seed)
    measured = bool(calib or eval_data)   # bitsandbytes needs no data: perplexity only when some is given
    calib_rows = _texts_and_ids(calib, tokenizer, calib_samples + (0 if eval_data else eval_samples), max_length) \
        if calib else []
    if eval_data:
        held_out = _texts_and_ids(eval_data, tokenizer, eval_samples, max_length)
    else:  # the last rows of the calibration data, not used to calibrate
        held_out, calib_rows = calib_rows[-eval_samples:], calib_rows[:-eval_samples] or calib_rows
    if measured and not held_out:
        raise BadInput("no usable rows to measure perplexity on", "check --eval-data/--calib")
    from transformers import AutoModelForCausalLM

    if method in ("gptq", "awq") and not any(len(ids) > _GPTQ_MIN_TOKENS for ids, _ in calib_rows):
        raise BadInput(f"--calib {calib}: no calibration row is longer than {_GPTQ_MIN_TOKENS} tokens "
                       "(GPTQModel drops shorter ones)", "give longer texts (pre-training text works well)")
    before = None
    if measured:
        reference = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32, attn_implementation=kernel)
        before = perplexity(reference, held_out)
        del reference
        log.info(f"quantize: perplexity before {before['perplexity']:.4f} on {before['tokens']:,} held-out tokens")
    else:
        log.info("quantize: no --eval-data or --calib: quantizing without measuring perplexity")
    started = time.monotonic()
    with rundir.staged(out) as tmp:
        with log.captured("quantize"):  # GPTQModel draws progress bars on stdout
            if method.startswith("bnb"):
                _bitsandbytes(model, tmp, bits, device, kernel)
            else:
                try:
                    _gptqmodel(model, tmp, method, bits, group_size, [ids for ids, _ in calib_rows], device, kernel)
                except (LmforgeError, KeyboardInterrupt):
                    raise
                except Exception as exc:   # GPTQModel's own failures can carry no message at all
                    raise RunFailure(f"GPTQModel could not quantize to {bits} bits ({type(exc).__name__}: "
                                     f"{str(exc).strip() or 'no message'})",
                                     ("try --bits 4 or 8, or " if bits not in (4, 8) else "")
                                     + "run with --debug to see where it failed") from exc
        from lmforge.shared.modeldir.tokenizers import save_tokenizer

        save_tokenizer(tokenizer, str(tmp))  # checked to load back alike
        with log.captured("quantize"):
            quantized = AutoModelForCausalLM.from_pretrained(str(tmp), device_map="cpu" if device.kind == "cpu" else "auto",
                                                             attn_implementation=kernel)
        try:
            after = perplexity(quantized, held_out) if measured else None
        except AssertionError as exc:  # bitsandbytes' CPU 4-bit kernels want widths divisible by their block size
            raise RunFailure(f"the {method} model does not run here ({exc})",
                             "the model's layer widths do not suit this kernel; try bnb-int8 or gptq") from None
        report = rundir.record(
            "model", method=f"quantize-{method}", bits=bits,
            group_size=group_size if method in ("gptq", "awq") else None, base_model=rundir.model_ref(model),
            calibration={"data": calib, "rows": len(calib_rows)} if method in ("gptq", "awq") else None,
            perplexity=None if before is None or after is None else {
                "before": before["perplexity"], "after": after["perplexity"],
                "change": after["perplexity"] / before["perplexity"] - 1.0,
                "tokens": after["tokens"], "data": eval_data or calib},
            seconds=round(time.monotonic() - started, 1),
            size_bytes=sum(f.stat().st_size for f in tmp.rglob("*.safetensors")))
        rundir.write_record(tmp, report)
    change = (f"perplexity after {after['perplexity']:.4f} ({report['perplexity']['change']:+.2%}); "
              if after is not None else "")
    log.info(f"quantize: {change}{report['size_bytes'] / 2**20:.1f} MiB of weights")
    return report


def _bitsandbytes(model: str, target: Path, bits: int, device, kernel: str = "sdpa") -> None:
    from lmforge.shared.model.models import quantization_config
    from transformers import AutoModelForCausalLM

    config = quantization_config(bits, device)
    loaded = AutoModelForCausalLM.from_pretrained(str(model), quantization_config=config, attn_implementation=kernel,
                                                  device_map={"": 0} if device.kind == "cuda" else {"": "cpu"})
    loaded.save_pretrained(str(target))


def _decoder_linears(config) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of the decoder layers' linear layers, the ones GPTQModel
    quantizes, from the model built on the meta device (no weights read)."""
    import re

    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return [(name, m.in_features, m.out_features) for name, m in skeleton.named_modules()
            if isinstance(m, torch.nn.Linear) and re.search(r"\.layers\.\d+\.", name) and "vis" not in name]


def _check_gptq_widths(config, bits: int, group_size: int, device_kind: str) -> None:
    """GPTQModel packs 3-bit weights in blocks of 32 output features (other widths abort the whole
    process mid-way); on a CPU its 4-bit kernel needs outputs by 16 and groups that divide the inputs."""
    if bits not in (3, 4) or (bits == 4 and device_kind != "cpu"):
        return
    for name, inputs, outputs in _decoder_linears(config):
        if bits == 3 and outputs % 32:
            raise BadInput(f"--bits 3: GPTQModel packs 3-bit weights in blocks of 32 outputs, and {name} has "
                           f"{outputs}", "use --bits 2, 4 or 8")
        if bits == 4 and outputs % 16:
            raise BadInput(f"--bits 4 on a CPU: the 4-bit kernel needs layer widths divisible by 16, and {name} has "
                           f"{outputs} outputs", "use --bits 2 or 8, or quantize on a GPU")
        if bits == 4 and group_size > 0 and inputs % group_size:
            raise BadInput(f"--group-size {group_size}: on a CPU the 4-bit kernel needs it to divide every layer's "
                           f"input width, and {name} has {inputs}", "use a --group-size that divides it, e.g. 32")


def _gptqmodel(model: str, target: Path, method: str, bits: int, group_size: int, calibration: list, device,
               kernel: str = "sdpa") -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(2, os.cpu_count() or 1))))
    try:
        from gptqmodel import GPTQModel, QuantizeConfig
    except ImportError:
        raise BadInput(f"--method {method} needs GPTQModel", "pip install 'lmforge[gptq]'") from None
    if not calibration:
        raise BadInput("the calibration data has no usable rows")
    config = QuantizeConfig(bits=bits, group_size=group_size, method=method,
                            **({"format": "gemm"} if method == "awq" else {}))
    try:
        with _gptqmodel_logs_kept_out_of_cwd():
            loaded = GPTQModel.load(str(model), config, attn_implementation=kernel)
            loaded.quantize([{"input_ids": ids} for ids in calibration], batch_size=1)
        loaded.save(str(target))
    except (ValueError, AssertionError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise RunFailure(f"{method} quantization failed: {first}",
                         "check --group-size divides the model's layer widths (try 32 or 64)") from None


@contextmanager
def _gptqmodel_logs_kept_out_of_cwd():
    """GPTQModel writes a per-run log file into ./logs/ of whatever directory it runs in; point its
    (module-level) log directory at a temporary one for the duration instead."""
    import tempfile

    try:
        from gptqmodel.looper import loop_processor
    except ImportError:  # a GPTQModel without that module keeps its own habits
        yield
        return
    saved = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
    with tempfile.TemporaryDirectory(prefix="lmforge-gptq-") as tmp:
        loop_processor._PROJECT_LOG_DIR = Path(tmp)
        try:
            yield
        finally:
            if saved is not None:
                loop_processor._PROJECT_LOG_DIR = saved
