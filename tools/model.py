"""`lmforge model ...`: make and transform model directories."""

from __future__ import annotations



from ._cli import command, declared, group, print_path

app = group("Make and transform model directories (quantize, init, export).")


@command(app, "quantize")
@declared("model quantize")
def quantize(
    model, output, method, bits, group_size, calib, calib_samples, eval_data, eval_samples, max_length,
    attn, overwrite, seed,
) -> None:
    """Quantize a model; prints perplexity before and after (stderr) and the directory (stdout)."""
    from lmforge.shared.core import log
    from lmforge.shared.model import quantize as quantizing

    log.quiet_libraries()
    with log.stdout_guard():
        quantizing.quantize(model, output, method, bits, group_size, calib, calib_samples, eval_data, eval_samples,
                            max_length, overwrite, seed, attn)
    print_path(output)


@command(app, "init")
@declared("model init")
def init(
    output, arch, layers, hidden, heads, kv_heads, intermediate, vocab_size, max_position, tokenizer,
    train_tokenizer, seed, overwrite,
) -> None:
    """A randomly initialised model in Hugging Face format (with a tokenizer trained on data when asked)."""
    from lmforge.shared.core import log
    from lmforge.shared.model import modelinit

    log.quiet_libraries()
    with log.stdout_guard():
        modelinit.init_model(output, arch, layers, hidden, heads, kv_heads, intermediate, vocab_size, max_position,
                             tokenizer, train_tokenizer, seed, overwrite)
    print_path(output)


@command(app, "export")
@declared("model export")
def export(model, adapter, output, format, quant, template, system, ollama, overwrite) -> None:
    """A model (plus an adapter) as one GGUF file for llama.cpp / Ollama / LM Studio; prints its path."""
    from lmforge.shared.core import log
    from lmforge.shared.model import export as exporting

    log.quiet_libraries()
    with log.stdout_guard():
        exporting.export(model, adapter, output, format, quant, template, system, ollama, overwrite)
    print_path(output)
