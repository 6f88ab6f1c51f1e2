"""`serve`: an OpenAI-compatible HTTP API (FastAPI) over an engine, with SSE streaming.

Prompts are rendered with the same template code that `data pack` trains with, so a model is
served with exactly what it was trained on. Requests are validated by the models in
`protocol` (imported where the app is built, so `lmforge --help` never loads pydantic); the
engines that generate are in `engines`.
"""

# no `from __future__ import annotations`: FastAPI resolves the route parameters' annotations
# (Request, imported inside create_app) at run time.

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from lmforge.shared.core.catalog import defaults
from lmforge.shared.core.errors import BadInput
from lmforge.shared.infer.engines import MAX_IMAGES, HFEngine, Job, VLLMEngine
from lmforge.shared.model.generation import encode_chat_prompt

SERVE = defaults("serve")
# requests whose images are decoded at once: a decoded image takes up to --max-image-pixels x 7
# bytes (its pixels, then their RGB copy) until it is scaled to the model's size, so this (not
# the number of clients) bounds the memory images take
IMAGE_DECODES = 2


@dataclass
class Served:
    """A model ready to answer: its engine, tokenizer and template, and how it is served."""

    engine: Any                 # HFEngine or VLLMEngine
    tokenizer: Any
    renderer: Any               # a templates renderer
    name: str
    context: int
    api_key: str | None
    max_concurrency: int
    created: int = field(default_factory=lambda: int(time.time()))
    max_request_bytes: int = SERVE["max_request_bytes"]   # a larger body is refused with 413 before it is read whole
    vision: Any = None          # a vision-language model's image facts (multimodal.Vision)
    media_dir: str | None = None   # serve --media-dir: where requests may name images by path
    max_images: int = SERVE["max_images"]               # per request (400 above)
    max_image_bytes: int = SERVE["max_image_bytes"]     # per image (413 above)
    max_image_pixels: int = SERVE["max_image_pixels"]   # per image, from its header, before decoding (413 above)


def media_dir_of(value: str | None) -> str | None:
    """serve --media-dir, checked: an existing directory, resolved."""
    from pathlib import Path

    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise BadInput(f"--media-dir {value}: not a directory", "give the directory clients' image paths are in")
    return str(path.resolve())


async def read_body(request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes: from its
    Content-Length when given, else while it streams in."""
    from lmforge.shared.infer.protocol import APIError

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared):,} bytes; this server takes at most {limit:,} "
                            "(lmforge serve --max-request-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body exceeds {limit:,} bytes (lmforge serve --max-request-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(served: Served):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from lmforge.shared.data.reasoning import prompt_opens_think
    from lmforge.shared.data.tool_calls import parse_calls
    from lmforge.shared.infer import protocol as api
    from lmforge.shared.infer.protocol import APIError

    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None)
    slots = asyncio.Semaphore(served.max_concurrency)
    decoding = asyncio.Semaphore(IMAGE_DECODES)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        # never an HTML/plain 500 page: an OpenAI-shaped error (the details go to the server's log)
        import logging

        logging.getLogger("lmforge.serve").exception("request failed")
        return JSONResponse(APIError(500, f"the server failed on this request ({type(exc).__name__})",
                                     kind="server_error", code="server_error").body(), status_code=500)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(404)
    async def not_found(request, exc):
        return JSONResponse(APIError(404, f"no route {request.url.path}", code="not_found").body(), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request, exc):
        return JSONResponse(APIError(405, f"{request.method} is not allowed on {request.url.path}").body(),
                            status_code=405)

    def authorise(request: Request) -> None:
        if served.api_key and request.headers.get("authorization", "") != f"Bearer {served.api_key}":
            raise APIError(401, "invalid or missing API key", kind="authentication_error", code="invalid_api_key")

    def job_for(body: dict, prompt_ids: list[int]):
        """The request's generation settings, checked against its prompt -> (Job, Settings)."""
        settings = api.Settings.check(body, prompt_tokens=len(prompt_ids), context=served.context)
        job = Job(prompt_ids=prompt_ids, max_tokens=settings.max_tokens, temperature=settings.temperature,
                  top_p=settings.top_p, seed=settings.seed, n=settings.n, stop=settings.stop,
                  repetition_penalty=settings.repetition_penalty, frequency_penalty=settings.frequency_penalty,
                  presence_penalty=settings.presence_penalty)
        return job, settings

    by_thinking: dict[str, object] = {}

    def renderer_for_request(body: dict):
        """The served renderer, or (when the request sets enable_thinking) the same template with
        that thinking switch."""
        thinking = api.thinking_of(body)
        base = served.renderer
        if thinking == "auto" or not hasattr(base, "with_reasoning"):
            return base
        if thinking not in by_thinking:
            from dataclasses import replace

            try:
                by_thinking[thinking] = base.with_reasoning(replace(base.reasoning, thinking=thinking))
            except BadInput as exc:
                raise APIError(400, exc.message, param="enable_thinking") from None
        return by_thinking[thinking]

    @app.get("/health")
    async def health():
        stats = served.engine.stats() if hasattr(served.engine, "stats") else {}
        return {"status": "ok", "model": served.name, **stats}

    @app.get("/v1/models")
    async def models(request: Request):
        authorise(request)
        return api.ModelList(data=[api.ModelCard(id=served.name, created=served.created)]).model_dump()

    def check_images(turns: list[dict]) -> None:
        """The request's images against the serve limits, from their headers: nothing is decoded yet."""
        from lmforge.shared.data.multimodal import ImageTooLarge, image_size

        images = [p["image"] for m in turns for p in m.get("parts") or [] if p.get("type") == "image"]
        if len(images) > served.max_images:
            raise APIError(400, f"{len(images)} images in one request; this server takes at most "
                                f"{served.max_images} (lmforge serve --max-images)", param="messages")
        for k, data in enumerate(images):
            if len(data) > served.max_image_bytes:
                raise APIError(413, f"image {k + 1} is {len(data):,} bytes; this server takes at most "
                                    f"{served.max_image_bytes:,} (lmforge serve --max-image-bytes)", param="messages")
            try:
                image_size(data, f"image {k + 1}", served.max_image_pixels)
            except ImageTooLarge as exc:
                raise APIError(413, f"{exc.message} (lmforge serve --max-image-pixels)", param="messages") from None

    async def prompt_of(asked, renderer):
        """The request's prompt -> (ids, lead, images, prompt text), rendered and tokenized off the
        event loop; its images checked against the limits first, then decoded (a few requests at once)."""
        from lmforge.shared.data.aligned import has_images

        images = any(has_images(m) for m in asked.turns)
        if images:
            await run_in_threadpool(check_images, asked.turns)
        if images and served.vision is not None:
            from lmforge.shared.data.multimodal import generation_inputs

            async with decoding:
                return await run_in_threadpool(
                    generation_inputs, served.vision, renderer, asked.turns, asked.system, asked.tools or "",
                    lambda text: encode_chat_prompt(served.tokenizer, text),
                    not isinstance(served.engine, VLLMEngine))   # vLLM expands the placeholders itself
        # (a text model's template refuses images, saying so)
        prompt = await run_in_threadpool(renderer.generation_prompt, asked.turns, asked.system, asked.tools or "")
        ids, lead = await run_in_threadpool(encode_chat_prompt, served.tokenizer, prompt)
        return ids, lead, [], prompt

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        from lmforge.shared.data.multimodal import ImageTooLarge

        authorise(request)
        # parsing, checking and tokenizing a large request take CPU time: off the event loop, so
        # health checks and streams of other requests go on meanwhile
        body = await run_in_threadpool(api.parse_body, await read_body(request, served.max_request_bytes))
        renderer = renderer_for_request(body)
        try:
            asked = api.ChatRequest.check(body, served_name=served.name, renderer=renderer,
                                          media_dir=served.media_dir, max_image_bytes=served.max_image_bytes)
            ids, lead, images, prompt = await prompt_of(asked, renderer)
        except ImageTooLarge as exc:
            raise APIError(413, exc.message, param="messages") from None
        except BadInput as exc:
            raise APIError(400, exc.message, param="messages") from None
        except RecursionError:
            # JSON text inside the request (a tool result, say) nested deeper than Python parses
            raise APIError(400, "the request holds JSON nested too deeply to read", param="messages") from None
        tools = asked.tools is not None
        job, settings = job_for(body, ids)
        job.lead = lead
        job.images = images
        style = getattr(getattr(served.renderer, "tpl", None), "tool_style", None) or ("qwen" if tools else None)
        chat_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        # thinking models: is the answer's reasoning split off (and does the prompt open the block)?
        thinks = bool(getattr(renderer, "thinking", False))
        opened = thinks and prompt_opens_think(prompt)
        if settings.stream:
            return StreamingResponse(_stream_chat(served, slots, request, job, chat_id, tools, style,
                                                  settings.include_usage, thinks, opened),
                                     media_type="text/event-stream")
        async with slots:
            final = await _collect(served, request, job)
        choices = []
        for c in sorted(final["choices"], key=lambda c: c["index"]):
            # thinking models: the reasoning apart from the answer, as reasoning_content
            reasoning, text = renderer.split_reasoning(c["text"], opened) if thinks else (None, c["text"])
            message = api.Message(content=text, reasoning_content=reasoning)
            reason = c["finish_reason"]
            if tools:
                content, calls = parse_calls(style, text)
                if calls:
                    message = api.Message(content=content or None, reasoning_content=reasoning,
                                          tool_calls=_tool_calls(calls))
                    reason = "tool_calls"
            choices.append(api.ChatChoice(index=c["index"], message=message, finish_reason=reason))
        completion = sum(c["completion_tokens"] for c in final["choices"])
        return api.ChatCompletion(id=chat_id, created=int(time.time()), model=served.name, choices=choices,
                                  usage=api.Usage.of(final["prompt_tokens"], completion)).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorise(request)
        body = await run_in_threadpool(api.parse_body, await read_body(request, served.max_request_bytes))
        asked = api.CompletionRequest.check(body, served_name=served.name)
        ids = (await run_in_threadpool(served.tokenizer, asked.prompt, add_special_tokens=True)).input_ids
        job, settings = job_for(body, ids)
        cmpl_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        if settings.stream:
            return StreamingResponse(_stream_text(served, slots, request, job, cmpl_id, settings.include_usage),
                                     media_type="text/event-stream")
        async with slots:
            final = await _collect(served, request, job)
        choices = [api.TextChoice(index=c["index"], text=c["text"], finish_reason=c["finish_reason"])
                   for c in sorted(final["choices"], key=lambda c: c["index"])]
        completion = sum(c["completion_tokens"] for c in final["choices"])
        return api.TextCompletion(id=cmpl_id, created=int(time.time()), model=served.name, choices=choices,
                                  usage=api.Usage.of(final["prompt_tokens"], completion)).model_dump()

    return app


def _tool_calls(calls: list[dict]) -> list:
    """Parsed calls -> protocol.ToolCall, each with a fresh id."""
    from lmforge.shared.infer.protocol import Function, ToolCall

    return [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                     function=Function(name=c["name"], arguments=json.dumps(c["arguments"], ensure_ascii=False)))
            for c in calls]


async def _collect(served: Served, request, job: Job) -> dict:
    from lmforge.shared.infer.protocol import APIError

    async for event in served.engine.generate(job):
        if event.get("done"):
            if event.get("error"):
                raise APIError(500, event["error"], kind="server_error")
            return event
        if await request.is_disconnected():
            job.cancelled = True
    raise APIError(500, "generation ended without a result", kind="server_error")


def _sse(obj: object) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(served: Served, slots, request, job: Job, head: list[str], on_text, on_done):
    """The SSE loop both streaming routes share. Once a slot is held, send `head`, then the lines
    `on_text(event)` makes of each piece of text, then those of `on_done(event)` and [DONE]. A client
    that goes away cancels its rows in the engine; a failed generation ends in an SSE error event."""
    async with slots:
        for line in head:
            yield line
        async for event in served.engine.generate(job):
            if await request.is_disconnected():
                job.cancelled = True
                return
            if not event.get("done"):
                for line in on_text(event):
                    yield line
                continue
            if event.get("error"):
                yield _sse({"error": {"message": event["error"], "type": "server_error"}})
                return
            for line in on_done(event):
                yield line
            yield "data: [DONE]\n\n"
            return


def _stream_chat(served: Served, slots, request, job: Job, chat_id: str, tools: bool, style: str | None,
                 usage: bool, thinks: bool = False, opened: bool = False):
    from lmforge.shared.data.reasoning import ThinkStream, split_generated
    from lmforge.shared.data.tool_calls import parse_calls
    from lmforge.shared.infer.protocol import ChatChunk, ChunkChoice, Delta, Usage

    created = int(time.time())
    held: dict[int, str] = {}  # with tools: text held back until it is clearly not a tool call
    released: set[int] = set()
    # thinking models: each choice's text split into reasoning_content and content as it comes
    splitters = {i: ThinkStream(opened) for i in range(job.n)} if thinks else {}

    def chunk(index: int, delta: Delta, reason=None) -> str:
        return _sse(ChatChunk(id=chat_id, created=created, model=served.name,
                              choices=[ChunkChoice(index=index, delta=delta, finish_reason=reason)]).model_dump())

    def answer_piece(index: int, text: str):
        if tools and index not in released:
            held[index] = held.get(index, "") + text
            if _could_be_call(held[index], style):
                return
            released.add(index)
            text = held.pop(index)
        yield chunk(index, Delta(content=text))

    def pieces(index: int, split: list[tuple[str, str]]):
        for kind, text in split:
            if kind == "reasoning":
                yield chunk(index, Delta(reasoning_content=text))
            else:
                yield from answer_piece(index, text)

    def on_text(event: dict):
        index, text = event["index"], event["text"]
        if thinks:
            yield from pieces(index, splitters[index].feed(text))
        else:
            yield from answer_piece(index, text)

    def on_done(event: dict):
        for c in sorted(event["choices"], key=lambda c: c["index"]):
            reason = c["finish_reason"]
            answer = c["text"]
            if thinks:
                yield from pieces(c["index"], splitters[c["index"]].finish())
                answer = split_generated(answer, opened)[1]
            if tools and c["index"] not in released:
                content, calls = parse_calls(style, answer)
                if calls:
                    for k, call in enumerate(_tool_calls(calls)):
                        yield chunk(c["index"], Delta(tool_calls=[call.model_copy(update={"index": k})]))
                    reason = "tool_calls"
                elif held.get(c["index"]):
                    yield chunk(c["index"], Delta(content=held[c["index"]]))
            yield chunk(c["index"], Delta(), reason)
        if usage:  # stream_options.include_usage, as OpenAI: a last chunk with no choices
            completion = sum(c["completion_tokens"] for c in event["choices"])
            yield _sse(ChatChunk(id=chat_id, created=created, model=served.name, choices=[],
                                 usage=Usage.of(event["prompt_tokens"], completion)).model_dump())

    head = [chunk(i, Delta(role="assistant", content="")) for i in range(job.n)]
    return _stream(served, slots, request, job, head, on_text, on_done)


def _could_be_call(text: str, style: str | None) -> bool:
    """Could this start of an answer still turn into a tool call (so it must not be streamed yet)?"""
    start = text.lstrip()
    if not start:
        return True
    if style == "qwen":
        return "<tool_call>".startswith(start[:11]) or start.startswith("<tool_call>") or "<tool_call>" in text
    if style == "mistral":
        return "[TOOL_CALLS]".startswith(start[:12]) or start.startswith("[TOOL_CALLS]")
    return start.startswith("{") or start.startswith("[")


def _stream_text(served: Served, slots, request, job: Job, cmpl_id: str, usage: bool):
    from lmforge.shared.infer.protocol import TextChoice, TextCompletion, Usage

    created = int(time.time())

    def line(choices: list, usage=None) -> str:
        return _sse(TextCompletion(id=cmpl_id, created=created, model=served.name, choices=choices,
                                   usage=usage).model_dump())

    def on_text(event: dict):
        yield line([TextChoice(index=event["index"], text=event["text"], finish_reason=None)])

    def on_done(event: dict):
        for c in event["choices"]:
            yield line([TextChoice(index=c["index"], text="", finish_reason=c["finish_reason"])])
        if usage:
            completion = sum(c["completion_tokens"] for c in event["choices"])
            yield line([], usage=Usage.of(event["prompt_tokens"], completion))

    return _stream(served, slots, request, job, [], on_text, on_done)


# ----------------------------------------------------------------------------- set-up

def prepare(model_dir: str, adapter: str | None, template: str, backend: str, max_concurrency: int,
            max_batch: int, api_key: str | None, name: str | None, max_images: int = MAX_IMAGES) -> Served:
    from pathlib import Path

    from lmforge.shared.data.templates import renderer_for
    from lmforge.shared.model.generation import stop_token_ids
    from lmforge.shared.model.models import load_for_inference as load

    from lmforge.shared.data import modalities

    from lmforge.shared.modeldir.config import context_length, load_config

    if backend == "vllm":
        from lmforge.shared.modeldir.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(adapter or model_dir)
        config = load_config(model_dir)
    else:
        model, tokenizer = load(model_dir, adapter)
        config = model.config
    render = renderer_for(template, tokenizer, model_dir, adapter)
    # a vision-language model's requests carry their images (to vLLM's own processor with vllm)
    media = modalities.of_model_dir(model_dir)
    vision = media.encoder(model_dir, tokenizer) if media is not None else None
    engine: HFEngine | VLLMEngine
    if backend == "vllm":
        engine = VLLMEngine(model_dir, adapter, max_concurrency, images=vision is not None, max_images=max_images)
    else:
        engine = HFEngine(model, tokenizer, stop_token_ids(tokenizer, render.stop_words()), max_batch, vision)
    context = context_length(config)
    served_name = name or Path(adapter or model_dir).name or str(model_dir)
    return Served(engine, tokenizer, render, served_name, context, api_key, max_concurrency, vision=vision,
                  max_images=max_images)


def limit_images(served: Served, max_bytes: int, max_pixels: int) -> None:
    """serve --max-image-bytes / --max-image-pixels. PIL's own guard against decompression bombs
    (an error above twice its MAX_IMAGE_PIXELS, about 179 million pixels) is raised with the limit
    when the limit is above it, so the option is what decides."""
    from PIL import Image

    served.max_image_bytes, served.max_image_pixels = max_bytes, max_pixels
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def check_port(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise BadInput(f"cannot listen on {host}:{port} ({exc.strerror})", "pick another --port or --host") from None
