"""`chat`: a conversation with a model in the terminal, streamed as it is written."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from lmforge.shared.infer.engines import Job
from lmforge.shared.model.generation import encode_chat_prompt

if TYPE_CHECKING:
    from lmforge.shared.infer.app import Served


def chat_loop(served: Served, system: str, max_tokens: int, temperature: float, read, write) -> None:
    """A terminal conversation: each line is a user turn; /reset starts over, /exit (or EOF) ends;
    `/image PATH` (a local file or a data: URL) puts an image before the next turn's text, for a
    vision-language model (issue 17)."""
    from lmforge.shared.data.aligned import RowError, message
    from lmforge.shared.data.formats import image_part

    turns: list[dict] = []
    pending: list[dict] = []   # images for the next user turn

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
            turns, pending = [], []
            write("[conversation reset]\n")
            continue
        if line.strip().startswith("/image"):
            if served.vision is None:
                write("[this model reads text only]\n")
                continue
            try:
                pending.append(image_part(line.strip()[len("/image"):].strip(), None, "/image"))
            except RowError as exc:
                write(f"[{exc}]\n")
                continue
            write(f"[image {len(pending)} attached to your next message]\n")
            continue
        text_part = {"type": "text", "text": line, "image": None, "format": None}
        turns.append(message("user", line, parts=[*pending, text_part] if pending else None))
        images: list[bytes] = []
        if any(m.get("parts") for m in turns):   # images in the conversation: laid out as `data pack` does
            from lmforge.shared.data.multimodal import generation_inputs

            ids, lead, images, _ = generation_inputs(served.vision, served.renderer, turns, system, "",
                                                     lambda text: encode_chat_prompt(served.tokenizer, text))
        else:
            ids, lead = encode_chat_prompt(served.tokenizer, served.renderer.generation_prompt(turns, system))
        pending = []
        if len(ids) >= served.context:
            write("[the conversation no longer fits the model's context: /reset]\n")
            turns.pop()
            continue
        job = Job(prompt_ids=ids, max_tokens=min(max_tokens, served.context - len(ids)), temperature=temperature,
                  lead=lead, images=images)
        turns.append(message("assistant", asyncio.run(answer(job))))
