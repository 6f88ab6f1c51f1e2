"""`lmforge adapter merge` as a function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.shared.api._options import options
from lmforge.shared.core.commands.model import AdapterMerge


def merge(o: AdapterMerge | None = None, **values: Any) -> Path:
    """The base model with the adapters folded in, a plain model directory at `output`."""
    from lmforge.shared.model.merging import merge as merge_adapters

    return merge_adapters(options(AdapterMerge, o, values))
