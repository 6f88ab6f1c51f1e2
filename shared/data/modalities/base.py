"""The interface every modality implements (see the package's docstring)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class Modality(ABC):
    name: str = ""

    # ------------------------------------------------------------------ the model directory
    @abstractmethod
    def reads(self, model_dir: str) -> bool:
        """The directory's model takes this modality (its processor and config say so)."""

    @abstractmethod
    def encoder(self, model_dir: str, tokenizer: Any, **limits: int) -> Any:
        """What lays the modality's media out as tokens (data pack; generation prompts); `limits`
        are the modality's own size options (images: max_pixels, min_pixels)."""

    # ------------------------------------------------------------------ batches
    @abstractmethod
    def check(self, model: Any, model_dir: str, data: Any) -> None:
        """Refuse (BadInput) a model that cannot take the data's media."""

    @abstractmethod
    def sft_collator(self, model_dir: str, model: Any, tokenizer: Any, data: Any) -> Any:
        """pt/sft: a collator whose batches carry the rows' media as model inputs."""

    @abstractmethod
    def pair_collator(self, collate: Any, model_dir: str, model: Any, tokenizer: Any, data: Any,
                      paired: bool = True) -> Any:
        """rm/dpo (paired) and kto: `collate`'s batches plus the prompts' media."""

    @abstractmethod
    def prompts(self, model_dir: str, model: Any, tokenizer: Any, data: Any) -> Any:
        """grpo/ppo: the prompt rows' media as model inputs, by row number."""

    # ------------------------------------------------------------------ the model's parts
    @abstractmethod
    def tower_modules(self, model: Any) -> list[str]:
        """The modules that encode the media (outermost), empty for a text model."""

    @abstractmethod
    def freeze(self, model: Any, train_projector: bool, train_tower: bool) -> None:
        """What trains of the towers and projector, for methods that train weights in place."""

    @abstractmethod
    def language_linears(self, model: Any, linears: list[str]) -> list[str]:
        """The linear layers of the language model (what LoRA adapts by default)."""

    @abstractmethod
    def modules_to_save(self, model: Any, train_projector: bool, train_tower: bool) -> list[str]:
        """LoRA: the tower parts that train fully beside the adapter."""
