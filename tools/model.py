"""`lmforge model ...`: make and transform model directories."""

from __future__ import annotations

from ._cli import command, declared, group, print_path

app = group("Make and transform model directories (quantize, init, export).")


@command(app, "quantize")
@declared("model quantize")
def quantize(o) -> None:
    """Quantize a model; prints perplexity before and after (stderr) and the directory (stdout)."""
    from lmforge.shared.core import log
    from lmforge.shared.model import quantize as quantizing

    log.quiet_libraries()
    with log.stdout_guard():
        quantizing.quantize(o)
    print_path(o.output)


@command(app, "init")
@declared("model init")
def init(o) -> None:
    """A randomly initialised model in Hugging Face format (with a tokenizer trained on data when asked)."""
    from lmforge.shared.core import log
    from lmforge.shared.model import modelinit

    log.quiet_libraries()
    with log.stdout_guard():
        modelinit.init_model(o)
    print_path(o.output)


@command(app, "export")
@declared("model export")
def export(o) -> None:
    """A model (plus an adapter) as one GGUF file for llama.cpp / Ollama / LM Studio; prints its path."""
    from lmforge.shared.core import log
    from lmforge.shared.model import export as exporting

    log.quiet_libraries()
    with log.stdout_guard():
        exporting.export(o)
    print_path(o.output)
