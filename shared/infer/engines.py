"""The engines behind `serve` and `chat`: a request's generation as a Job, and what runs it.

- HFEngine (default): transformers' generate() in one worker thread, so requests never block
  the event loop. Requests that arrive while a batch runs wait for the next one; requests with
  the same sampling settings are generated together in one batch (each row stops on its own: at
  a stop token, its own token limit or stop string, or when its client disconnects). Tokens are
  streamed back per request as they are produced.
- VLLMEngine (`--backend vllm`, on a GPU with vllm installed): vLLM's async engine, with the
  adapter as a LoRA request.

An engine's generate(job) yields events: {"index", "text"} deltas, then {"done": True, "choices":
[...], "prompt_tokens"} (or {"done": True, "error"}).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from lmforge.shared.core.catalog import defaults
from lmforge.shared.core.errors import BadInput
from lmforge.shared.infer.detokenize import RowText, first_stop, visible
from lmforge.shared.model.generation import left_pad, pad_id_of, penalty_processors, sampling_args

MAX_IMAGES: int = defaults("serve")["max_images"]   # images one request may carry (serve --max-images)


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
    images: list[bytes] = field(default_factory=list)   # a vision-language prompt's images
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    cancelled: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None

    def key(self) -> tuple:
        """Requests with the same key can share a batch."""
        greedy = self.temperature == 0
        if self.images:   # a request with images runs in a batch of its own
            return (id(self),)
        return (greedy, None if greedy else self.temperature, None if greedy else self.top_p, self.seed,
                self.repetition_penalty, self.frequency_penalty, self.presence_penalty)

    def emit(self, event: dict) -> None:
        assert self.loop is not None and self.events is not None, "emit() before generate()"
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:   # the asking event loop is closed: nobody listens, and the engine goes on
            self.cancelled = True


# ----------------------------------------------------------------------------- engines

class HFEngine:
    """transformers generate() in a worker thread, batching compatible requests."""

    def __init__(self, model, tokenizer, stop_ids: list[int], max_batch: int = 8, vision=None):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.vision = vision    # a vision-language model's image facts (multimodal.Vision)
        self.max_batch = max_batch
        self.pad_id = pad_id_of(tokenizer, stop_ids)
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
            taken: list[Job] = []
            for job in batch:
                if rows + job.n > self.max_batch and taken:
                    break
                taken.append(job)
                rows += job.n
            for job in taken:
                self.waiting.remove(job)
            for job in taken:
                if job.cancelled:   # given up before it ran: its caller may still wait for the end
                    job.emit({"done": True, "choices": [], "prompt_tokens": len(job.prompt_ids)})
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
        ids, mask = left_pad([job.prompt_ids for job, _ in rows], self.pad_id, self.device)
        # each row's text is decoded as its tokens come, a few tokens at a time (not the whole
        # answer again per token: that grew with the answer's length, on this thread, for every row)
        texts = [RowText(self.tokenizer, job.lead, job.stop) for job, _ in rows]
        done = [False] * len(rows)
        finish = ["length"] * len(rows)
        stops, engine = set(self.stop_ids), self

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
                    engine.generated += 1
                    last = len(texts[r].tokens) + 1 >= job.max_tokens
                    piece, stopped = texts[r].add(token, last)
                    if stopped:
                        done[r], finish[r] = True, "stop"
                    elif last:
                        done[r] = True
                    if piece:
                        job.emit({"index": index, "text": piece})

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
                      stopping_criteria=StoppingCriteriaList([RowStop()]),
                      **sampling_args(first.temperature, first.top_p))  # top-k: generate()'s own
        penalties = penalty_processors(ids, mask, first.repetition_penalty, first.frequency_penalty,
                                       first.presence_penalty)
        if penalties is not None:
            kwargs["logits_processor"] = penalties
        if first.images and self.vision is not None:   # one job: its images for each of its n rows
            kwargs.update({k: v.to(self.device) for k, v in self.vision.pixels(first.images * first.n).items()})
            kwargs.update(self.vision.token_types(self.model, ids))
        if first.seed is not None:
            torch.manual_seed(first.seed)
        with torch.no_grad():
            self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        for job in jobs:
            choices: list[dict[str, Any]] = []
            for r, (owner, index) in enumerate(rows):
                if owner is job:
                    text, sent = texts[r].text(), texts[r].streamed()
                    cut = first_stop(text, job.stop)
                    text = text[:cut] if cut is not None else text
                    choices.append({"index": index, "text": text, "finish_reason": finish[r],
                                    "completion_tokens": len(texts[r].tokens)})
                    if len(text) > len(sent) and text.startswith(sent):
                        job.emit({"index": index, "text": text[len(sent):]})
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


_TRIM: Any = None  # libc's malloc_trim; False where there is none


class VLLMEngine:
    """vLLM's async engine (GPU). The adapter, if any, is served as a LoRA request."""

    def __init__(self, model_dir: str, adapter: str | None, max_concurrency: int, images: bool = False,
                 max_images: int = MAX_IMAGES):
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine
        except ImportError:
            raise BadInput("--backend vllm needs vllm, a GPU-only extra", "pip install 'lmforge[gpu]' on a CUDA machine") from None
        extra: dict[str, Any] = {"limit_mm_per_prompt": {"image": max_images}} if images else {}
        args = AsyncEngineArgs(model=str(model_dir), enable_lora=adapter is not None, max_num_seqs=max_concurrency,
                               **extra)
        self.engine = AsyncLLMEngine.from_engine_args(args)
        self.lora = None
        if adapter:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, str(adapter))

    async def generate(self, job: Job):
        from vllm import SamplingParams

        params = SamplingParams(n=job.n, temperature=job.temperature, top_p=job.top_p, max_tokens=job.max_tokens,
                                seed=job.seed, stop=job.stop or None, repetition_penalty=job.repetition_penalty,
                                frequency_penalty=job.frequency_penalty, presence_penalty=job.presence_penalty)
        request_id = uuid.uuid4().hex
        sent: dict[int, str] = {}
        final: Any = None
        try:
            async for output in self.engine.generate(vllm_prompt(job), params, request_id, lora_request=self.lora):
                for choice in output.outputs:
                    previous, text = sent.get(choice.index, ""), visible(choice.text, job.lead)
                    if len(text) > len(previous) and text.startswith(previous):
                        yield {"index": choice.index, "text": text[len(previous):]}
                        sent[choice.index] = text
                final = output
        except asyncio.CancelledError:
            await self.engine.abort(request_id)
            raise
        choices = [{"index": c.index, "text": visible(c.text, job.lead), "finish_reason": c.finish_reason or "stop",
                    "completion_tokens": len(c.token_ids)} for c in final.outputs]
        prompt_tokens = len(getattr(final, "prompt_token_ids", None) or job.prompt_ids)   # with the image tokens
        yield {"done": True, "choices": choices, "prompt_tokens": prompt_tokens}


def vllm_prompt(job: Job) -> dict:
    """vLLM's prompt for a job: its token ids, and its images decoded (one placeholder each in the ids;
    vLLM's processor for the model gives every image its tokens)."""
    if not job.images:
        return {"prompt_token_ids": job.prompt_ids}
    import io

    from PIL import Image

    return {"prompt_token_ids": job.prompt_ids,
            "multi_modal_data": {"image": [Image.open(io.BytesIO(b)).convert("RGB") for b in job.images]}}
