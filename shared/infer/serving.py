"""`serve` and `chat`: an OpenAI-compatible API over a model, and the engines behind it.

Prompts are rendered with the same template code that `data pack` trains with, so a model is
served with exactly what it was trained on.

Engines
- HFEngine (default): transformers' generate() in one worker thread, so requests never block
  the event loop. Requests that arrive while a batch runs wait for the next one; requests with
  the same sampling settings are generated together in one batch (each row stops on its own: at
  a stop token, its own token limit or stop string, or when its client disconnects). Tokens are
  streamed back per request as they are produced.
- VLLMEngine (`--backend vllm`, on a GPU with vllm installed): vLLM's async engine, with the
  adapter as a LoRA request.
"""

# no `from __future__ import annotations`: FastAPI resolves the route parameters' annotations
# (Request, imported inside create_app) at run time.

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from lmforge.shared.core.errors import BadInput
from lmforge.shared.model.generation import encode_chat_prompt

# ----------------------------------------------------------------------------- requests

class APIError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request's generation: its prompt, settings, and where its events go."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    lead: str = ""              # spaces ending the rendered prompt that the model writes itself
    cancelled: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None

    def key(self) -> tuple:
        """Requests with the same key can share a batch."""
        greedy = self.temperature == 0
        return (greedy, None if greedy else self.temperature, None if greedy else self.top_p, self.seed)

    def emit(self, event: dict) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def messages_to_turns(messages: object) -> tuple[str, list[tuple[str, str]]]:
    """OpenAI chat messages -> (system, aligned turns); raises APIError on a malformed list."""
    from lmforge.shared.data.aligned import (
        ASSISTANT,
        FUNCTION,
        OBSERVATION,
        USER,
        RowError,
        check_turns,
    )
    from lmforge.shared.data.formats import normalize_call

    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    system_parts: list[str] = []
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param="messages")
        role, content = m.get("role"), m.get("content")
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if content is not None and not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param="messages")
        if role in ("system", "developer"):
            if turns:
                raise APIError(400, f"messages[{i}]: a system message must come first", param="messages")
            system_parts.append(content or "")
        elif role == "user":
            turns.append((USER, content or ""))
        elif role == "assistant":
            if m.get("tool_calls"):
                calls = [c.get("function", c) if isinstance(c, dict) else c for c in m["tool_calls"]]
                try:
                    turns.append((FUNCTION, normalize_call(calls if len(calls) > 1 else calls[0])))
                except RowError as exc:
                    raise APIError(400, f"messages[{i}].tool_calls: {exc}", param="messages") from None
            else:
                turns.append((ASSISTANT, content or ""))
        elif role in ("tool", "function"):
            if turns and turns[-1][0] == OBSERVATION:  # parallel results stay together
                prev = turns[-1][1]
                merged = json.loads(prev) if prev.startswith("[") else [prev]
                turns[-1] = (OBSERVATION, json.dumps(merged + [content or ""], ensure_ascii=False))
            else:
                turns.append((OBSERVATION, content or ""))
        else:
            raise APIError(400, f"messages[{i}]: unknown role {role!r}", param="messages")
    try:
        check_turns(turns, [(ASSISTANT, "x")], "sft")
    except RowError as exc:
        raise APIError(400, f"invalid messages: {exc}", param="messages") from None
    return "\n".join(system_parts), turns


# ----------------------------------------------------------------------------- engines

class HFEngine:
    """transformers generate() in a worker thread, batching compatible requests."""

    def __init__(self, model, tokenizer, stop_ids: list[int], max_batch: int = 8):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.max_batch = max_batch
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        self.device = next(model.parameters()).device
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.waiting: list[Job] = []
        self.running = 0        # jobs in the current batch (for /health)
        self.generated = 0      # tokens generated since start (for /health)
        self.thread = threading.Thread(target=self._loop, name="lmforge-generate", daemon=True)
        self.thread.start()

    async def generate(self, job: Job):
        """Events for a job: {"index", "text"} deltas, then {"done": True, "choices": [...]}"""
        job.loop = asyncio.get_running_loop()
        job.events = asyncio.Queue()
        self.jobs.put(job)
        try:
            while True:
                event = await job.events.get()
                yield event
                if event.get("done"):
                    return
        finally:
            job.cancelled = True  # the client went away (or we finished): stop its rows

    # -- the worker thread
    def _loop(self) -> None:
        while True:
            if not self.waiting:
                self.waiting.append(self.jobs.get())
            while True:  # take everything that has arrived
                try:
                    self.waiting.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            first = self.waiting[0]
            batch = [j for j in self.waiting if j.key() == first.key()]
            rows = 0
            taken = []
            for job in batch:
                if rows + job.n > self.max_batch and taken:
                    break
                taken.append(job)
                rows += job.n
            for job in taken:
                self.waiting.remove(job)
            try:
                self.running = len(taken)
                self._run([j for j in taken if not j.cancelled])
            except Exception as exc:  # report to the waiting clients, keep serving
                for job in taken:
                    job.emit({"done": True, "error": f"{type(exc).__name__}: {exc}"})
            finally:
                self.running = 0
                _release_memory()

    def stats(self) -> dict:
        return {"running": self.running, "waiting": len(self.waiting) + self.jobs.qsize(),
                "generated_tokens": self.generated}

    def _run(self, jobs: list[Job]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        if not jobs:
            return
        rows = [(job, i) for job in jobs for i in range(job.n)]
        prompts = [job.prompt_ids for job, _ in rows]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        tokens: list[list[int]] = [[] for _ in rows]
        sent = [""] * len(rows)                 # text already streamed per row
        done = [False] * len(rows)
        finish = ["length"] * len(rows)
        tokenizer, stops, engine = self.tokenizer, set(self.stop_ids), self

        def text_of(r: int) -> str:
            return _visible(tokenizer.decode(tokens[r], skip_special_tokens=True), rows[r][0].lead)

        class Rows(BaseStreamer):
            """Receives each step's new token for every row and streams text to the clients."""

            started = False

            def put(self, value):
                if not self.started:  # the first call carries the prompt
                    self.started = True
                    return
                for r, token in enumerate(value.view(-1).tolist()):
                    if done[r]:
                        continue
                    job, index = rows[r]
                    if token in stops:
                        done[r], finish[r] = True, "stop"
                        continue
                    tokens[r].append(token)
                    engine.generated += 1
                    text = text_of(r)
                    cut = _first_stop(text, job.stop)
                    if cut is not None:
                        text, done[r], finish[r] = text[:cut], True, "stop"
                    elif len(tokens[r]) >= job.max_tokens:
                        done[r] = True
                    # hold back an incomplete character or a possible stop-string prefix
                    safe = text if done[r] else _safe_prefix(text, job.stop)
                    if len(safe) > len(sent[r]) and safe.startswith(sent[r]):
                        job.emit({"index": index, "text": safe[len(sent[r]):]})
                        sent[r] = safe

            def end(self):
                pass

        class RowStop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                for r, (job, _) in enumerate(rows):
                    if job.cancelled:
                        done[r] = True
                return torch.tensor(done, device=input_ids.device)

        first = jobs[0]
        kwargs = dict(max_new_tokens=max(job.max_tokens for job in jobs), eos_token_id=self.stop_ids,
                      pad_token_id=self.pad_id, use_cache=True, streamer=Rows(),
                      stopping_criteria=StoppingCriteriaList([RowStop()]))
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if first.seed is not None:
            torch.manual_seed(first.seed)
        with torch.no_grad():
            self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        for job in jobs:
            choices = []
            for r, (owner, index) in enumerate(rows):
                if owner is job:
                    text = text_of(r)
                    cut = _first_stop(text, job.stop)
                    choices.append({"index": index, "text": text[:cut] if cut is not None else text,
                                    "finish_reason": finish[r], "completion_tokens": len(tokens[r])})
                    if len(choices[-1]["text"]) > len(sent[r]) and choices[-1]["text"].startswith(sent[r]):
                        job.emit({"index": index, "text": choices[-1]["text"][len(sent[r]):]})
            job.emit({"done": True, "choices": choices, "prompt_tokens": len(job.prompt_ids)})


def _release_memory() -> None:
    """Give freed heap back to the OS after a batch: batches of varying shapes otherwise leave
    glibc's arenas fragmented and a long-running server's RSS creeps up."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


class VLLMEngine:
    """vLLM's async engine (GPU). The adapter, if any, is served as a LoRA request."""

    def __init__(self, model_dir: str, adapter: str | None, max_concurrency: int):
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine
        except ImportError:
            raise BadInput("--backend vllm needs vllm, a GPU-only extra", "pip install 'lmforge[gpu]' on a CUDA machine") from None
        args = AsyncEngineArgs(model=str(model_dir), enable_lora=adapter is not None, max_num_seqs=max_concurrency)
        self.engine = AsyncLLMEngine.from_engine_args(args)
        self.lora = None
        if adapter:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, str(adapter))

    async def generate(self, job: Job):
        from vllm import SamplingParams

        params = SamplingParams(n=job.n, temperature=job.temperature, top_p=job.top_p, max_tokens=job.max_tokens,
                                seed=job.seed, stop=job.stop or None)
        request_id = uuid.uuid4().hex
        sent = {}
        final = None
        try:
            async for output in self.engine.generate({"prompt_token_ids": job.prompt_ids}, params, request_id,
                                                     lora_request=self.lora):
                for choice in output.outputs:
                    previous, text = sent.get(choice.index, ""), _visible(choice.text, job.lead)
                    if len(text) > len(previous) and text.startswith(previous):
                        yield {"index": choice.index, "text": text[len(previous):]}
                        sent[choice.index] = text
                final = output
        except asyncio.CancelledError:
            await self.engine.abort(request_id)
            raise
        choices = [{"index": c.index, "text": _visible(c.text, job.lead), "finish_reason": c.finish_reason or "stop",
                    "completion_tokens": len(c.token_ids)} for c in final.outputs]
        yield {"done": True, "choices": choices, "prompt_tokens": len(job.prompt_ids)}


def _visible(text: str, lead: str) -> str:
    """The answer without the spaces that belong to the prompt (decoders may already drop them)."""
    return text[len(lead):] if lead and text.startswith(lead) else text


def _first_stop(text: str, stops: list[str]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


def _safe_prefix(text: str, stops: list[str]) -> str:
    """Text that can be streamed now: no trailing partial character, no possible stop-string start."""
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return text[:len(text) - hold] if hold else text


# ----------------------------------------------------------------------------- the API

@dataclass
class Served:
    engine: object
    tokenizer: object
    renderer: object
    name: str
    context: int
    api_key: str | None
    max_concurrency: int
    created: int = field(default_factory=lambda: int(time.time()))


def _number(body: dict, key: str, default, low=None, high=None, kind=float):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise APIError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}", param=key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(400, f"'{key}' must be between {low} and {high}", param=key)
    return kind(value)


def build_job(served: Served, body: dict, prompt_ids: list[int]) -> Job:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, 1, None, int)
    room = served.context - len(prompt_ids)
    if room <= 0:
        raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; the model's context is {served.context}",
                       param="messages", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(room, 512)
    elif len(prompt_ids) + max_tokens > served.context:
        raise APIError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                       f"context of {served.context} tokens", param="max_tokens", code="context_length_exceeded")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4):
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    if not isinstance(body.get("stream", False), bool):
        raise APIError(400, "'stream' must be true or false", param="stream")
    _include_usage(body)  # checks stream_options
    return Job(prompt_ids=prompt_ids, max_tokens=max_tokens,
               temperature=_number(body, "temperature", 1.0, 0, 2), top_p=_number(body, "top_p", 1.0, 0, 1),
               seed=_number(body, "seed", None, kind=int), n=_number(body, "n", 1, 1, 16, int), stop=stop or [])


def create_app(served: Served):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from lmforge.shared.data.templates import parse_calls

    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None)
    slots = asyncio.Semaphore(served.max_concurrency)

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

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model not in (None, served.name):
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{served.name}'",
                           param="model", code="model_not_found")
        return body

    @app.get("/health")
    async def health():
        stats = served.engine.stats() if hasattr(served.engine, "stats") else {}
        return {"status": "ok", "model": served.name, **stats}

    @app.get("/v1/models")
    async def models(request: Request):
        authorise(request)
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "lmforge"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorise(request)
        body = await body_of(request)
        system, turns = messages_to_turns(body.get("messages"))
        tools = body.get("tools")
        tools_json = ""
        if tools:
            from lmforge.shared.data.aligned import RowError
            from lmforge.shared.data.formats import normalize_tools

            if not served.renderer.supports_tools:
                raise APIError(400, f"the template '{served.renderer.name}' has no tool support", param="tools")
            try:
                tools_json = normalize_tools(tools)
            except RowError as exc:
                raise APIError(400, f"invalid tools: {exc}", param="tools") from None
        prompt = served.renderer.generation_prompt(turns, system, tools_json)
        ids, lead = encode_chat_prompt(served.tokenizer, prompt)
        job = build_job(served, body, ids)
        job.lead = lead
        style = getattr(getattr(served.renderer, "tpl", None), "tool_style", None) or ("qwen" if tools else None)
        chat_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.get("stream"):
            return StreamingResponse(_stream_chat(served, slots, request, job, chat_id, bool(tools), style,
                                                  _include_usage(body)),
                                     media_type="text/event-stream")
        async with slots:
            final = await _collect(served, request, job)
        choices = []
        for c in sorted(final["choices"], key=lambda c: c["index"]):
            message = {"role": "assistant", "content": c["text"]}
            reason = c["finish_reason"]
            if tools:
                content, calls = parse_calls(style, c["text"])
                if calls:
                    message = {"role": "assistant", "content": content or None, "tool_calls": _tool_calls(calls)}
                    reason = "tool_calls"
            choices.append({"index": c["index"], "message": message, "finish_reason": reason, "logprobs": None})
        completion = sum(c["completion_tokens"] for c in final["choices"])
        return {"id": chat_id, "object": "chat.completion", "created": int(time.time()), "model": served.name,
                "choices": choices, "usage": _usage(final["prompt_tokens"], completion)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorise(request)
        body = await body_of(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
        ids = served.tokenizer(prompt, add_special_tokens=True).input_ids
        job = build_job(served, body, ids)
        cmpl_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        if body.get("stream"):
            return StreamingResponse(_stream_text(served, slots, request, job, cmpl_id, _include_usage(body)), media_type="text/event-stream")
        async with slots:
            final = await _collect(served, request, job)
        choices = [{"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"], "logprobs": None}
                   for c in sorted(final["choices"], key=lambda c: c["index"])]
        completion = sum(c["completion_tokens"] for c in final["choices"])
        return {"id": cmpl_id, "object": "text_completion", "created": int(time.time()), "model": served.name,
                "choices": choices, "usage": _usage(final["prompt_tokens"], completion)}

    return app


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    return bool((options or {}).get("include_usage"))


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _tool_calls(calls: list[dict]) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


async def _collect(served: Served, request, job: Job) -> dict:
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
                 usage: bool):
    from lmforge.shared.data.templates import parse_calls

    created = int(time.time())
    held: dict[int, str] = {}  # with tools: text held back until it is clearly not a tool call
    released: set[int] = set()

    def chunk(index: int, delta: dict, reason=None) -> str:
        return _sse({"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": served.name,
                     "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}]})

    def on_text(event: dict):
        index, text = event["index"], event["text"]
        if tools and index not in released:
            held[index] = held.get(index, "") + text
            if _could_be_call(held[index], style):
                return
            released.add(index)
            text = held.pop(index)
        yield chunk(index, {"content": text})

    def on_done(event: dict):
        for c in sorted(event["choices"], key=lambda c: c["index"]):
            reason = c["finish_reason"]
            if tools and c["index"] not in released:
                content, calls = parse_calls(style, c["text"])
                if calls:
                    for k, call in enumerate(_tool_calls(calls)):
                        yield chunk(c["index"], {"tool_calls": [{"index": k, **call}]})
                    reason = "tool_calls"
                elif held.get(c["index"]):
                    yield chunk(c["index"], {"content": held[c["index"]]})
            yield chunk(c["index"], {}, reason)
        if usage:  # stream_options.include_usage, as OpenAI: a last chunk with no choices
            completion = sum(c["completion_tokens"] for c in event["choices"])
            yield _sse({"id": chat_id, "object": "chat.completion.chunk", "created": created,
                        "model": served.name, "choices": [], "usage": _usage(event["prompt_tokens"], completion)})

    head = [chunk(i, {"role": "assistant", "content": ""}) for i in range(job.n)]
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
    created = int(time.time())

    def line(choices: list[dict], **extra) -> str:
        return _sse({"id": cmpl_id, "object": "text_completion", "created": created, "model": served.name,
                     "choices": choices, **extra})

    def on_text(event: dict):
        yield line([{"index": event["index"], "text": event["text"], "finish_reason": None, "logprobs": None}])

    def on_done(event: dict):
        for c in event["choices"]:
            yield line([{"index": c["index"], "text": "", "finish_reason": c["finish_reason"], "logprobs": None}])
        if usage:
            completion = sum(c["completion_tokens"] for c in event["choices"])
            yield line([], usage=_usage(event["prompt_tokens"], completion))

    return _stream(served, slots, request, job, [], on_text, on_done)


# ----------------------------------------------------------------------------- set-up

def prepare(model_dir: str, adapter: str | None, template: str, backend: str, max_concurrency: int,
            max_batch: int, api_key: str | None, name: str | None) -> Served:
    from pathlib import Path

    from lmforge.shared.data.templates import renderer_for
    from lmforge.shared.model.generation import stop_token_ids
    from lmforge.shared.model.models import load_for_inference as load

    if backend == "vllm":
        from lmforge.shared.data.tokenizing import load_tokenizer
        from transformers import AutoConfig

        tokenizer = load_tokenizer(adapter or model_dir)
        render = renderer_for(template, tokenizer, model_dir, adapter)
        engine = VLLMEngine(model_dir, adapter, max_concurrency)
        context = getattr(AutoConfig.from_pretrained(str(model_dir)), "max_position_embeddings", 4096) or 4096
    else:
        model, tokenizer = load(model_dir, adapter)
        render = renderer_for(template, tokenizer, model_dir, adapter)
        engine = HFEngine(model, tokenizer, stop_token_ids(tokenizer, render.stop_words()), max_batch)
        context = getattr(model.config, "max_position_embeddings", 2048) or 2048
    served_name = name or Path(adapter or model_dir).name or str(model_dir)
    return Served(engine, tokenizer, render, served_name, context, api_key, max_concurrency)


def check_port(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise BadInput(f"cannot listen on {host}:{port} ({exc.strerror})", "pick another --port or --host") from None


def chat_loop(served: Served, system: str, max_tokens: int, temperature: float, read, write) -> None:
    """A terminal conversation: each line is a user turn; /reset starts over, /exit (or EOF) ends."""
    turns: list[tuple[str, str]] = []

    async def answer(job: Job) -> str:
        parts = []
        async for event in served.engine.generate(job):
            if event.get("done"):
                if event.get("error"):
                    write(f"\n[error: {event['error']}]\n")
                break
            parts.append(event["text"])
            write(event["text"])
        write("\n")
        return "".join(parts)

    while True:
        line = read()
        if line is None or line.strip() == "/exit":
            return
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/reset":
            turns = []
            write("[conversation reset]\n")
            continue
        turns.append(("user", line))
        prompt = served.renderer.generation_prompt(turns, system)
        ids, lead = encode_chat_prompt(served.tokenizer, prompt)
        if len(ids) >= served.context:
            write("[the conversation no longer fits the model's context: /reset]\n")
            turns.pop()
            continue
        job = Job(prompt_ids=ids, max_tokens=min(max_tokens, served.context - len(ids)), temperature=temperature,
                  lead=lead)
        turns.append(("assistant", asyncio.run(answer(job))))
