"""What the board's endpoints accept, typed: a body of the wrong shape is refused with one line
(HTTP 400) before any of it is used, never half-read."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmforge.shared.core.errors import BadInput

MAX_BODY = 1 << 20   # the page sends forms and chats: a megabyte is far more than any of them

Scalar = Union[str, int, float, bool, None]
OptionValue = Union[Scalar, list[Union[str, int, float]]]
Options = dict[str, OptionValue]


class TooLarge(BadInput):
    """A body over the size limit: HTTP 413."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False)


class DataChoice(_Strict):
    files: list[str] = []
    dataset_info: str = ""
    names: list[str] = []


class PipelineBody(_Strict):
    """A training pipeline as the page describes it."""

    stage: str = "sft"
    model: str = ""
    run: str | None = None
    data: DataChoice = DataChoice()
    options: dict[str, Options] = {}


class EvalBody(_Strict):
    kind: str = ""
    options: Options = {}


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: Annotated[str, Field(max_length=100_000)]


class ChatBody(_Strict):
    run: str
    messages: list[Message]
    system: str = ""
    max_tokens: Annotated[int, Field(ge=1, le=8192)] = 128
    temperature: Annotated[float, Field(ge=0, le=5)] = 0.0


class Empty(_Strict):
    pass


def parse(raw: bytes, model: type[BaseModel], what: str) -> Any:
    """The body as `model`, or BadInput naming the first field that is wrong."""
    if len(raw) > MAX_BODY:
        raise TooLarge(f"{what}: the request is larger than {MAX_BODY >> 20} MiB")
    try:
        data = json.loads(raw or b"{}")
    except RecursionError:
        raise BadInput(f"{what}: the request is nested too deeply") from None
    except ValueError:
        raise BadInput(f"{what}: the request is not JSON") from None
    if not isinstance(data, dict):
        raise BadInput(f"{what}: the request is not a JSON object")
    try:
        return model.model_validate(data)
    except RecursionError:
        raise BadInput(f"{what}: the request is nested too deeply") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadInput(f"{what}: {where}: {first['msg']}", "fix that field and send it again") from None
