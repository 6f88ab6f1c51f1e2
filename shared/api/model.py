"""`lmforge model ...` as functions: init, quantize, export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.shared.api._options import options
from lmforge.shared.core.commands.model import ModelExport, ModelInit, ModelQuantize


def init(o: ModelInit | None = None, **values: Any) -> Path:
    """A randomly initialised model (and tokenizer) at `output`; returns its directory."""
    from lmforge.shared.model.modelinit import init_model

    o = options(ModelInit, o, values)
    init_model(o)
    return Path(o.output)


def quantize(o: ModelQuantize | None = None, **values: Any) -> dict:
    """A quantized copy of `model` at `output`; returns perplexity before and after."""
    from lmforge.shared.model.quantize import quantize as quantize_model

    return quantize_model(options(ModelQuantize, o, values))


def export(o: ModelExport | None = None, **values: Any) -> Path:
    """`model` (with an adapter merged in) as one GGUF file at `output`; returns its path."""
    from lmforge.shared.model.export import export as export_model

    return export_model(options(ModelExport, o, values))
