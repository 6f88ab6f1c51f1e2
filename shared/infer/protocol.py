"""The OpenAI protocol `serve` speaks: request models that validate a body (answering in OpenAI's
error shape), and the response bodies it sends.

Requests are checked in two steps, as the routes need them: the request itself (`ChatRequest`:
model, messages, tools; `CompletionRequest`: model, prompt), then, once the prompt is tokenized,
the generation settings (`Settings`), whose token limit is checked against the prompt's length and
the model's context. Each step reports the first problem in the order its fields are declared.

pydantic is imported here at module level: import this module only where an app is built or a
request is answered, never on the way to `lmforge --help`.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import AliasChoices, BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_serializer
from pydantic_core import PydanticCustomError

# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _invalid(message: str, param: str | None, code: str | None = None, status: int = 400) -> PydanticCustomError:
    """A validation error that becomes exactly this APIError (see `_api_error`)."""
    return PydanticCustomError("lmforge", "{message}", {"message": message, "param": param, "code": code,
                                                        "status": status})


def _api_error(exc: ValidationError) -> APIError:
    """The first problem pydantic found, as the APIError it stands for. A ValueError or
    AssertionError that a check did not mean to raise is a bug, not a bad request: it is raised
    again, to end as a server error."""
    error = exc.errors()[0]
    ctx = error.get("ctx") or {}
    if error["type"] == "lmforge":
        return APIError(ctx["status"], ctx["message"], param=ctx["param"], code=ctx["code"])
    if isinstance(ctx.get("error"), Exception):
        raise ctx["error"]
    loc = error.get("loc") or ()
    return APIError(400, error["msg"], param=str(loc[0]) if loc else None)


MAX_NESTING = 64   # a chat request is a few levels deep; thousands of levels only attack the parser


def _no_constant(name: str):
    raise APIError(400, f"the request body holds {name}, which is not a JSON number", code="invalid_value")


def parse_body(raw: bytes) -> dict:
    """A request body: a JSON object, else an APIError (400): not UTF-8 (JSON's encoding; Python's
    json would also guess UTF-16 and UTF-32, which the nesting scan cannot read), invalid JSON,
    NaN or Infinity (Python's json accepts them; JSON does not), or nesting deeper than MAX_NESTING."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the request body is not UTF-8 (byte {exc.start})") from None
    if _depth_exceeds(text, MAX_NESTING):
        raise APIError(400, f"the request body is nested more than {MAX_NESTING} levels deep")
    try:
        body = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _finite(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        _no_constant(text)
    return value


def _depth_exceeds(text: str, limit: int) -> bool:
    """Whether brackets outside strings nest deeper than `limit` (a linear scan, before parsing)."""
    if text.count("[") + text.count("{") <= limit:
        return False   # the usual case: too few brackets to nest that deep
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _json_text(value: object, where: str, param: str) -> None:
    """A string the request means as JSON text (tool-call arguments, tools): refused when it nests
    deeper than MAX_NESTING, before anything parses it."""
    if isinstance(value, str) and _depth_exceeds(value, MAX_NESTING):
        raise _invalid(f"{where} is JSON nested more than {MAX_NESTING} levels deep", param)


class _Checked(BaseModel):
    """A request part checked with `check(body, **context)`: APIError on the first problem."""

    @classmethod
    def check(cls, body: dict, **context):
        try:
            return cls.model_validate(body, context=context)
        except ValidationError as exc:
            raise _api_error(exc) from None


def _context(info: ValidationInfo) -> dict:
    """What `check(body, **context)` was given."""
    return info.context or {}


def _number(key: str, value, default, low=None, high=None, kind=float):
    """A JSON number setting: null means the default; booleans and fractional integers are refused."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise _invalid(f"'{key}' must be {'an integer' if kind is int else 'a number'}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise _invalid(f"'{key}' must be between {low} and {high}", key)
    return kind(value)


# ----------------------------------------------------------------------------- requests


class _Request(_Checked):
    """What both routes take first: the model asked for (context: served_name)."""

    model: Any = None

    @field_validator("model", mode="before")
    @classmethod
    def _served_model(cls, value, info: ValidationInfo):
        name = _context(info)["served_name"]
        if value not in (None, name):
            raise _invalid(f"the model '{value}' does not exist; this server serves '{name}'", "model",
                           code="model_not_found", status=404)
        return value


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")   # OpenAI's values


class ChatRequest(_Request):
    """/v1/chat/completions: the conversation, as (system, aligned turns), and the tool schemas
    (context: served_name, renderer)."""

    messages: Any = Field(None, validate_default=True)
    tools: Any = None             # None: no tools asked for; else their normalized JSON ("" if none given)
    reasoning_effort: Any = None  # OpenAI's reasoning switch: checked, and not used (see thinking_of)

    @field_validator("messages", mode="before")
    @classmethod
    def _turns(cls, value, info: ValidationInfo):
        context = _context(info)
        return messages_to_turns(value, context.get("media_dir"), context.get("max_image_bytes"))

    @field_validator("tools", mode="before")
    @classmethod
    def _tools(cls, value, info: ValidationInfo):
        if not value:
            return None
        from lmforge.shared.data.aligned import RowError
        from lmforge.shared.data.row_values import normalize_tools

        renderer = _context(info)["renderer"]
        if not renderer.supports_tools:
            raise _invalid(f"the template '{renderer.name}' has no tool support", "tools")
        _json_text(value, "'tools'", "tools")
        try:
            tools = normalize_tools(value)
        except RowError as exc:
            raise _invalid(f"invalid tools: {exc}", "tools") from None
        for k, tool in enumerate(json.loads(tools) if tools else []):
            function = tool["function"]
            name = function.get("name")
            if not isinstance(name, str) or not name.strip():
                raise _invalid(f"tools[{k}]: a tool needs a 'name' (a non-empty string)", "tools")
            if not isinstance(function.get("description", ""), str):
                raise _invalid(f"tools[{k}] ({name}): 'description' must be a string", "tools")
            if not isinstance(function.get("parameters", {}), dict):
                raise _invalid(f"tools[{k}] ({name}): 'parameters' must be a JSON Schema object", "tools")
        return tools

    @field_validator("reasoning_effort", mode="before")
    @classmethod
    def _reasoning_effort(cls, value):
        if value is not None and value not in REASONING_EFFORTS:
            raise _invalid(f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}", "reasoning_effort")
        return value

    @property
    def system(self) -> str:
        return self.messages[0]

    @property
    def turns(self) -> list[dict]:
        return self.messages[1]


class CompletionRequest(_Request):
    """/v1/completions: one prompt string (a list of one string is taken as that string)."""

    prompt: Any = Field(None, validate_default=True)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str) or not value:
            raise _invalid("'prompt' must be a non-empty string", "prompt")
        return value


class Settings(_Checked):
    """The generation settings of a request whose prompt is tokenized (context: prompt_tokens, and
    the model's context length)."""

    max_tokens: Any = Field(None, validation_alias=AliasChoices("max_completion_tokens", "max_tokens"),
                            validate_default=True)
    stop: Any = Field(None, validate_default=True)
    stream: Any = False
    stream_options: Any = None
    temperature: Any = 1.0
    top_p: Any = 1.0
    seed: Any = None
    n: Any = 1
    frequency_penalty: Any = 0.0
    presence_penalty: Any = 0.0
    repetition_penalty: Any = 1.0   # not OpenAI's: vLLM's and transformers' (1: off)

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _max_tokens(cls, value, info: ValidationInfo):
        value = _number("max_tokens", value, None, 1, None, int)
        prompt, context = _context(info)["prompt_tokens"], _context(info)["context"]
        room = context - prompt
        if room <= 0:
            raise _invalid(f"the prompt has {prompt} tokens; the model's context is {context}", "messages",
                           code="context_length_exceeded")
        if value is None:
            return min(room, 512)
        if prompt + value > context:
            raise _invalid(f"prompt ({prompt} tokens) + max_tokens ({value}) exceeds the model's "
                           f"context of {context} tokens", "max_tokens", code="context_length_exceeded")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value):
        if isinstance(value, str):
            value = [value]
        if value is not None and (not isinstance(value, list) or not all(isinstance(s, str) for s in value)
                                  or len(value) > 4):
            raise _invalid("'stop' must be a string or a list of up to 4 strings", "stop")
        return value or []

    @field_validator("stream", mode="before")
    @classmethod
    def _stream(cls, value):
        if not isinstance(value, bool):
            raise _invalid("'stream' must be true or false", "stream")
        return value

    @field_validator("stream_options", mode="before")
    @classmethod
    def _stream_options(cls, value):
        if value is not None and not isinstance(value, dict):
            raise _invalid("'stream_options' must be an object", "stream_options")
        return value

    @field_validator("temperature", mode="before")
    @classmethod
    def _temperature(cls, value):
        return _number("temperature", value, 1.0, 0, 2)

    @field_validator("top_p", mode="before")
    @classmethod
    def _top_p(cls, value):
        return _number("top_p", value, 1.0, 0, 1)

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value):
        return _number("seed", value, None, -(1 << 63), (1 << 63) - 1, int)   # a 64-bit seed, as torch takes it

    @field_validator("n", mode="before")
    @classmethod
    def _n(cls, value):
        return _number("n", value, 1, 1, 16, int)

    @field_validator("frequency_penalty", "presence_penalty", mode="before")
    @classmethod
    def _occurrence_penalty(cls, value, info: ValidationInfo):
        return _number(str(info.field_name), value, 0.0, -2, 2)

    @field_validator("repetition_penalty", mode="before")
    @classmethod
    def _repetition_penalty(cls, value):
        value = _number("repetition_penalty", value, 1.0)
        if value <= 0:
            raise _invalid("'repetition_penalty' must be above 0 (1: no penalty)", "repetition_penalty")
        return value

    @property
    def include_usage(self) -> bool:
        """stream_options.include_usage: end the stream with a chunk carrying the usage."""
        return bool((self.stream_options or {}).get("include_usage"))


def messages_to_turns(messages: object, media_dir: str | None = None,
                      max_image_bytes: int | None = None) -> tuple[str, list[dict]]:
    """OpenAI chat messages -> (system, aligned messages), read as `data align` reads OpenAI data
    (reasoning_content, tool_calls with ids, tool_call_id); a validation error on a malformed list.
    Images as data: URLs; by local path or file:// URL only inside `media_dir` (serve --media-dir):
    a client must not make the server read any file it likes, nor fetch URLs."""
    from lmforge.shared.data.aligned import RowError, check_turns, message
    from lmforge.shared.data.converters import converter
    from lmforge.shared.data.formats import make_spec

    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty list", "messages")
    system_parts: list[str] = []
    rest: list = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _invalid(f"messages[{i}] must be an object", "messages")
        _call_arguments(m, f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):
            for k, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") in (None, "text") or _data_url_image(part):
                    continue
                local = _local_image(part, media_dir, f"messages[{i}].content[{k}]", max_image_bytes)
                if local is None:
                    raise _invalid(f"messages[{i}]: only text content parts and images as data: URLs are served"
                                   + (", or local paths inside the --media-dir" if media_dir else
                                      " (serve --media-dir DIR lets requests name image files inside DIR)")
                                   + "; nothing is fetched from URLs", "messages")
                content[k] = {"type": "image_url", "image_url": {"url": local}}
        if m.get("role") in ("system", "developer"):
            if rest:
                raise _invalid(f"messages[{i}]: a system message must come first", "messages")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if content is not None and not isinstance(content, str):
                raise _invalid(f"messages[{i}].content must be a string", "messages")
            system_parts.append(content or "")
            continue
        if m.get("role") not in ("user", "assistant", "tool", "function"):
            raise _invalid(f"messages[{i}]: unknown role {m.get('role')!r}", "messages")
        if content is not None and not isinstance(content, (str, list)):
            raise _invalid(f"messages[{i}].content must be a string", "messages")
        rest.append(m)
    convert = converter(make_spec("openai", "sft"))
    try:
        turns, _, _, _, _ = convert({"messages": rest + [{"role": "assistant", "content": "x"}]})
    except RowError as exc:
        raise _invalid(f"invalid messages: {exc}", "messages") from None
    try:
        check_turns(turns, [message("assistant", "x")], "sft")
    except RowError as exc:
        raise _invalid(f"invalid messages: {exc}", "messages") from None
    return "\n".join(system_parts), turns


def _call_arguments(m: dict, where: str) -> None:
    """A message's tool-call arguments, JSON text the conversion parses: refused when nested too deep."""
    calls = m.get("tool_calls")
    for k, call in enumerate(calls if isinstance(calls, list) else []):
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            _json_text(function.get("arguments"), f"{where}.tool_calls[{k}].function.arguments", "messages")
    legacy = m.get("function_call")
    if isinstance(legacy, dict):
        _json_text(legacy.get("arguments"), f"{where}.function_call.arguments", "messages")


def _local_image(part: dict, media_dir: str | None, where: str, max_bytes: int | None = None) -> str | None:
    """An image part naming a local file (a path or file:// URL) inside media_dir -> its resolved path;
    None when it names no local file or there is no media_dir; refused when it leaves the directory,
    is not a regular file, or is over `max_bytes` (413, from its size on disk: it is not read)."""
    import os
    import stat
    from pathlib import Path

    if media_dir is None or part.get("type") not in ("image_url", "input_image"):
        return None
    source = part.get("image_url")
    url = source.get("url") if isinstance(source, dict) else source
    if not isinstance(url, str) or not url or ("://" in url and not url.startswith("file://")):
        return None
    if "\x00" in url:   # no file name holds one (the OS refuses the path outright)
        raise _invalid(f"{where}: the image path holds a NUL character", "messages")
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    resolved = (path if path.is_absolute() else Path(media_dir) / path).resolve()
    if not resolved.is_relative_to(media_dir):
        raise _invalid(f"{where}: image '{url[:80]}' is outside the server's --media-dir", "messages")
    try:
        facts = os.stat(resolved)
    except OSError as exc:
        raise _invalid(f"{where}: image '{url[:80]}' cannot be read ({exc.strerror})", "messages") from None
    if not stat.S_ISREG(facts.st_mode):   # a directory, a pipe or a device: never read
        raise _invalid(f"{where}: image '{url[:80]}' is not a file", "messages")
    if max_bytes is not None and facts.st_size > max_bytes:
        raise _invalid(f"{where}: image '{url[:80]}' is {facts.st_size:,} bytes; this server takes at most "
                       f"{max_bytes:,} per image (lmforge serve --max-image-bytes)", "messages", status=413)
    return str(resolved)


def _data_url_image(part: dict) -> bool:
    """An OpenAI image part whose image is inline (served vision-language models)."""
    if part.get("type") not in ("image_url", "input_image"):
        return False
    source = part.get("image_url")
    url = source.get("url") if isinstance(source, dict) else source
    return isinstance(url, str) and url.startswith("data:")


def thinking_of(body: dict) -> str:
    """The request's thinking switch: `chat_template_kwargs.enable_thinking` (as vLLM and SGLang
    take it) or a top-level `enable_thinking` -> "on" | "off" | "auto". OpenAI's `reasoning_effort`
    has no counterpart in the templates: ChatRequest checks it, and it changes nothing."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise APIError(400, "'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    value = kwargs.get("enable_thinking") if isinstance(kwargs, dict) else None
    if value is None:
        value = body.get("enable_thinking")
    if value is None:
        return "auto"
    if not isinstance(value, bool):
        raise APIError(400, "'enable_thinking' must be true or false", param="enable_thinking")
    return "on" if value else "off"


# ----------------------------------------------------------------------------- responses


class _Body(BaseModel):
    """A response body; the fields named in OPTIONAL are left out while they are None."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _leave_out_unset(self, handler):
        data = handler(self)
        for key in self.OPTIONAL:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class Usage(_Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> "Usage":
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class Function(_Body):
    name: str
    arguments: str                # JSON text


class ToolCall(_Body):
    OPTIONAL = ("index",)

    index: int | None = None      # in a stream: the call's place in the answer
    id: str
    type: str = "function"
    function: Function


class Message(_Body):
    OPTIONAL = ("tool_calls", "reasoning_content")

    role: str = "assistant"
    content: str | None
    reasoning_content: str | None = None   # thinking models: the reasoning, apart from the answer
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Body):
    index: int
    message: Message
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(_Body):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(_Body):
    OPTIONAL = ("role", "content", "tool_calls", "reasoning_content")

    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None   # thinking models: pieces of the reasoning, as they come
    tool_calls: list[ToolCall] | None = None


class ChunkChoice(_Body):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatChunk(_Body):
    OPTIONAL = ("usage",)

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class TextChoice(_Body):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class TextCompletion(_Body):
    """A /v1/completions answer, and (with usage only on the last) each chunk of its stream."""

    OPTIONAL = ("usage",)

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class ModelCard(_Body):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "lmforge"


class ModelList(_Body):
    object: str = "list"
    data: list[ModelCard]
