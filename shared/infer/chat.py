"""`chat`: a conversation with a model in the terminal, streamed as it is written."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from lmforge.shared.infer.engines import Job
from lmforge.shared.model.generation import encode_chat_prompt

if TYPE_CHECKING:
    from lmforge.shared.infer.app import Served


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
