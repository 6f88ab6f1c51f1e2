"""config.json of a model directory or Hub id: the transformers config, the raw dict, and what
kind of directory it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.shared.core.errors import BadInput

def load_config(name: str | Path):
    """The transformers config, or one line saying why there is none."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(name))
    except OSError:
        if Path(name).exists():
            raise BadInput(f"{name}: not a model directory (no config.json)",
                           "point --model at a Hugging Face model directory") from None
        raise BadInput(f"model '{name}' not found: not a local directory, and not loadable from the "
                       "Hugging Face Hub", "check the path or id (and your network)") from None
    except ValueError as exc:
        raise BadInput(f"{name}: cannot read its config ({str(exc).splitlines()[0]})") from None


def config_dict(name: str | Path) -> dict[str, Any] | None:
    """A local directory's config.json as a dict (None: none, or unreadable)."""
    try:
        data = json.loads((Path(name) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def context_length(config, default: int = 4096) -> int:
    """The model's context (its text part's, for a vision-language model)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "max_position_embeddings", None) or default)


def is_quantized(name: str | Path) -> bool:
    """A GPTQ/AWQ/bitsandbytes model directory (its config carries a quantization_config)."""
    return "quantization_config" in (config_dict(name) or {})


def is_adapter(name: str | Path) -> bool:
    """A PEFT adapter directory."""
    return (Path(name) / "adapter_config.json").is_file()


def is_vision(name: str | Path) -> bool:
    """A vision-language model: an image processor beside a config with a vision tower (which
    families lmforge supports is data/multimodal.py's to say)."""
    if not (Path(name) / "preprocessor_config.json").is_file():
        return False
    return "vision_config" in (config_dict(name) or {})
