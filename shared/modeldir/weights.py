"""A model directory's weights, and the files written beside trained weights: the value head of a
reward model, the image processor of a vision-language model, a generation config that stops at
the template's stop words."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lmforge.shared.core.errors import BadInput
from lmforge.shared.modeldir.config import is_vision

HEAD_FILE = "value_head.safetensors"


def model_class(name: str | Path) -> Any:
    """AutoModelForCausalLM, or AutoModelForImageTextToText for a vision-language model."""
    if is_vision(name):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def load_weights(name: str | Path, loader: Any = None, **kwargs: Any):
    """`loader.from_pretrained(name, **kwargs)` (the model's own class by default), or one line
    saying why it cannot load."""
    loader = loader or model_class(name)
    try:
        return loader.from_pretrained(str(name), **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"{name}: cannot load the model ({first})") from None


def load_value_head(directory: str | Path, hidden: int):
    """A reward model's value head (a linear map from the last hidden state to a score)."""
    import torch
    from safetensors.torch import load_file

    path = Path(directory) / HEAD_FILE
    if not path.exists():
        raise BadInput(f"{directory}: not a reward model (no {HEAD_FILE})", "train one with `lmforge train rm`")
    head = torch.nn.Linear(hidden, 1)
    head.load_state_dict(load_file(str(path)))
    return head


def save_value_head(head, directory: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
              str(Path(directory) / HEAD_FILE))


def copy_image_processor(base: str | Path, out: Path) -> None:
    """A vision-language model's image processor travels with its trained or merged weights."""
    source = Path(base) / "preprocessor_config.json"
    if source.is_file():
        shutil.copyfile(source, out / "preprocessor_config.json")


def load_image_processor(name: str | Path):
    """The image processor alone (AutoImageProcessor): the Qwen-VL processors would also want a
    video processor, which needs torchvision; lmforge needs only the images."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(name))
    except (OSError, ValueError) as exc:
        raise BadInput(f"{name}: cannot load the image processor ({str(exc).splitlines()[0]})") from None


def write_generation_config(base: str | Path, out: Path, tokenizer, stop_words: list[str]) -> None:
    """generation_config.json whose EOS ids are the template's stop words (so generation stops)."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(str(base))
    except (OSError, ValueError):
        config = GenerationConfig()
    ids = [i for i in tokenizer.convert_tokens_to_ids(list(stop_words)) if i is not None and i != tokenizer.unk_token_id]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    config.eos_token_id = ids if len(ids) > 1 else (ids[0] if ids else None)
    config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(str(out))
