"""Reasoning (thinking) in conversations: the `--reasoning` / `--thinking` settings, and a
generated answer's think block told apart from its answer, whole or as it streams."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reasoning:
    """How reasoning is rendered (data pack --reasoning / --thinking, eval, serve).

    keep: `auto` = the template's own rule for earlier turns (Qwen3 drops the reasoning of turns
    before the last user message); `keep` = every turn keeps its reasoning; `drop` = no turn does.
    thinking: `auto` = the template's default; `on` / `off` = the enable_thinking switch.
    mask_empty_think: an empty think block (`<think>\\n\\n</think>\\n\\n`) gets no loss."""
    keep: str = "auto"
    thinking: str = "auto"
    mask_empty_think: bool = False

    def template_kwargs(self) -> dict:
        return {} if self.thinking == "auto" else {"enable_thinking": self.thinking == "on"}


EMPTY_THINK = "<think>\n\n</think>\n\n"


def split_think(content: str) -> tuple[str, str]:
    """Qwen3: (reasoning, answer) of an assistant message, as its template splits them."""
    if "</think>" not in content:
        return "", content
    answer = content.split("</think>")[-1].lstrip("\n")
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, answer


def split_generated(text: str, opened: bool = False) -> tuple[str | None, str]:
    """A generated answer that may open with a think block -> (reasoning, answer).

    `opened`: the prompt itself ended with `<think>` (the model continues inside the block). A
    block that never closes (the answer cut off by max_tokens) is all reasoning and no answer."""
    if not opened:
        head = text.lstrip()
        if not head.startswith("<think>"):
            return None, text
        text = head[len("<think>"):]
    reasoning, _, answer = text.partition("</think>")
    return reasoning.strip("\n"), answer.lstrip("\n")


def prompt_opens_think(prompt: str) -> bool:
    """Does the generation prompt leave a think block open (the model's output starts inside it)?"""
    return prompt.rstrip().endswith("<think>")


class ThinkStream:
    """`split_generated` for text that arrives in pieces (serve's streamed answers): `feed` returns
    ("reasoning" | "content", text) pieces as soon as they are certain, so that joining each kind
    gives exactly what `split_generated` gives for the whole text. Held back meanwhile: an opening
    that may still become `<think>`, a tail that may still become `</think>`, and newlines at the
    ends of the reasoning (split_generated strips them)."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, opened: bool = False):
        self.state = "reasoning" if opened else "start"
        self.lead = opened        # newlines at the start of the reasoning are dropped
        self.buf = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while self.buf:
            if self.state == "start":
                head = self.buf.lstrip()
                if self.OPEN.startswith(head):          # still undecided ("", "<", "<th", ...)
                    break
                if head.startswith(self.OPEN):
                    self.buf, self.state, self.lead = head[len(self.OPEN):], "reasoning", True
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                if self.lead:
                    self.buf = self.buf.lstrip("\n")
                    if not self.buf:
                        break
                    self.lead = False
                end = self.buf.find(self.CLOSE)
                if end >= 0:
                    piece = self.buf[:end].rstrip("\n")
                    if piece:
                        out.append(("reasoning", piece))
                    self.buf, self.state = self.buf[end + len(self.CLOSE):], "after"
                    continue
                # hold a tail that may begin `</think>`, and the newlines before it
                keep = next((k for k in range(min(len(self.CLOSE) - 1, len(self.buf)), 0, -1)
                             if self.buf.endswith(self.CLOSE[:k])), 0)
                ready = self.buf[:len(self.buf) - keep]
                sure = ready.rstrip("\n")
                if sure:
                    out.append(("reasoning", sure))
                self.buf = self.buf[len(sure):]
                break
            elif self.state == "after":
                self.buf = self.buf.lstrip("\n")
                if self.buf:
                    self.state = "content"
            else:
                out.append(("content", self.buf))
                self.buf = ""
        return out

    def finish(self) -> list[tuple[str, str]]:
        """What is still held when generation ends."""
        held, self.buf = self.buf, ""
        if self.state == "start":
            return [("content", held)] if held else []
        if self.state == "reasoning":
            held = held.lstrip("\n") if self.lead else held
            return [("reasoning", held.rstrip("\n"))] if held.strip("\n") else []
        return [("content", held)] if held and self.state == "content" else []
