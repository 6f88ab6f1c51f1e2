"""`chat`: a conversation with a model in the terminal, streamed as it is written.

The model answers from this process (`LocalModel`: loaded as `serve` loads it, generating on the
engine's thread) or from a running `lmforge serve` (`chat_remote.RemoteModel`, `chat --url`).

Lines starting with "/" are commands, handled here and never sent to the model (HELP lists
them; "//text" sends "/text"). Ctrl-C while an answer streams stops that answer: the generation
is cancelled (its engine stops at the next token) and the prompt comes back, the words already
written kept as the answer. Ctrl-C at the prompt drops the line being typed; a second one in a
row leaves, as Ctrl-D (end of input) and /exit do, with exit status 0.

On a terminal, lines are read with Python's readline: line editing, and a history kept in
$XDG_STATE_HOME/lmforge/chat_history (else ~/.cache/lmforge/chat_history).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from lmforge.shared.infer.engines import Job
from lmforge.shared.model.generation import encode_chat_prompt

if TYPE_CHECKING:
    from lmforge.shared.infer.app import Served

HELP = """\
commands (never sent to the model):
  /help          this list
  /reset         start the conversation over (the system prompt stays)
  /system TEXT   use TEXT as the system prompt from the next answer on
  /system        show the system prompt; /system - removes it
  /image PATH    attach an image (a file or a data: URL) to your next message (vision models)
  /exit          leave (also /quit, Ctrl-D, or Ctrl-C twice at the prompt)
  //TEXT         send TEXT starting with a single /
Ctrl-C while an answer is written stops it; what was written stays in the conversation.
"""
COMMANDS = ("help", "reset", "system", "image", "exit", "quit")


@dataclass
class Settings:
    """How answers are sampled (chat's options)."""

    max_tokens: int | None = 512      # None: the server's own limit (chat --url without --max-tokens)
    temperature: float = 0.7
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


@dataclass
class Answer:
    text: str
    stopped: bool = False     # Ctrl-C stopped it
    error: str | None = None  # the turn failed: nothing to keep (the user turn is taken back)


class Model(Protocol):
    """What the conversation talks to."""

    name: str
    reads_images: bool | None     # None: unknown (a server decides when it gets one)

    def answer(self, turns: list[dict], system: str, settings: Settings, write: Callable[[str], None]) -> Answer:
        ...

    def interrupt(self) -> None:
        """Called from the Ctrl-C handler while `answer` runs: stop the answer soon."""


class LocalModel:
    """A model loaded in this process (`app.prepare`), answering through its engine: generate() runs
    on the engine's thread, and a cancelled job stops at its next token, so that Ctrl-C never leaves
    the thread generating while the process moves on (or exits under it)."""

    def __init__(self, served: Served):
        self.served = served
        self.name = served.name
        self.reads_images: bool | None = served.vision is not None
        self.loop = asyncio.new_event_loop()   # one for the whole session: the engine posts events to it
        self.job: Job | None = None
        self.stopped = False

    def interrupt(self) -> None:
        self.stopped = True
        if self.job is not None:
            self.job.cancelled = True

    def answer(self, turns: list[dict], system: str, settings: Settings, write: Callable[[str], None]) -> Answer:
        served = self.served
        self.stopped = False
        if any(m.get("parts") for m in turns):   # images in the conversation: laid out as `data pack` does
            from lmforge.shared.data.multimodal import generation_inputs

            ids, lead, images, _ = generation_inputs(served.vision, served.renderer, turns, system, "",
                                                     lambda text: encode_chat_prompt(served.tokenizer, text))
        else:
            ids, lead = encode_chat_prompt(served.tokenizer, served.renderer.generation_prompt(turns, system))
            images = []
        if len(ids) >= served.context:
            return Answer("", error="the conversation no longer fits the model's context: /reset starts over")
        limit = served.context - len(ids)
        job = Job(prompt_ids=ids, max_tokens=min(settings.max_tokens or limit, limit),
                  temperature=settings.temperature, lead=lead, images=images,
                  repetition_penalty=settings.repetition_penalty, frequency_penalty=settings.frequency_penalty,
                  presence_penalty=settings.presence_penalty)
        job.cancelled = self.stopped   # Ctrl-C while the prompt was prepared
        self.job = job
        try:
            text, error = self.loop.run_until_complete(self._stream(job, write))
        finally:
            self.job = None
        return Answer(text, stopped=self.stopped, error=error)

    async def _stream(self, job: Job, write: Callable[[str], None]) -> tuple[str, str | None]:
        parts: list[str] = []
        async for event in self.served.engine.generate(job):
            if event.get("done"):
                return "".join(parts), event.get("error")
            if not self.stopped:   # pieces already on their way when Ctrl-C came are not shown
                parts.append(event["text"])
                write(event["text"])
        return "".join(parts), None

    def close(self) -> None:
        self.loop.close()


def chat_loop(model: Model, system: str, settings: Settings, read: Callable[[], str | None],
              write: Callable[[str], None]) -> None:
    """A terminal conversation: each line is a user turn, or a command (HELP). `read` returns the
    next line (None at the end of input) and raises KeyboardInterrupt on Ctrl-C; `write` prints."""
    from lmforge.shared.data.aligned import RowError, message
    from lmforge.shared.data.image_parts import image_part

    turns: list[dict] = []
    pending: list[dict] = []   # images for the next user turn
    interrupted = False        # the last thing at the prompt was a Ctrl-C

    while True:
        try:
            line = read()
        except KeyboardInterrupt:
            if interrupted:
                write("\n")
                return
            interrupted = True
            write("\n[Ctrl-C again or Ctrl-D to leave]\n")
            continue
        interrupted = False
        if line is None:
            return
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        stripped = line.strip()
        if stripped.startswith("/") and not stripped.startswith("//"):
            name, _, argument = stripped[1:].partition(" ")
            argument = argument.strip()
            if name in ("exit", "quit"):
                return
            if name == "help":
                write(HELP)
            elif name == "reset":
                turns, pending = [], []
                write("[conversation reset]\n")
            elif name == "system":
                if not argument:
                    write(f"[system prompt: {system}]\n" if system else "[no system prompt]\n")
                else:
                    system = "" if argument == "-" else argument
                    write("[system prompt removed]\n" if not system else "[system prompt set]\n")
            elif name == "image":
                if model.reads_images is False:
                    write("[this model reads text only]\n")
                elif not argument:
                    write("[give the image: /image PATH]\n")
                else:
                    try:
                        pending.append(image_part(argument, None, "/image"))
                    except RowError as exc:
                        write(f"[{exc}]\n")
                    else:
                        write(f"[image {len(pending)} attached to your next message]\n")
            else:
                write(f"[unknown command /{name}: /help lists the commands; //{name} sends the text]\n")
            continue
        if stripped.startswith("//"):
            line = line.replace("//", "/", 1)
        text_part = {"type": "text", "text": line, "image": None, "format": None}
        turns.append(message("user", line, parts=[*pending, text_part] if pending else None))
        pending = []
        with _ctrl_c_stops(model):
            got = model.answer(turns, system, settings, write)
        if got.error is not None:
            write(f"\n[{got.error}]\n" if got.text else f"[{got.error}]\n")
            turns.pop()
            continue
        write("\n[stopped]\n" if got.stopped else "\n")
        if got.text:
            turns.append(message("assistant", got.text))
        else:   # stopped before a word: as if the question had not been asked
            turns.pop()


class _ctrl_c_stops:
    """While an answer streams, Ctrl-C (SIGINT) asks the model to stop it instead of raising
    KeyboardInterrupt wherever the main thread happens to be (the default handler comes back after)."""

    def __init__(self, model: Model):
        self.model = model
        self.previous: object = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, lambda signum, frame: self.model.interrupt())
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)   # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the terminal

def history_file() -> Path:
    """Where the chat history is kept: $XDG_STATE_HOME/lmforge, else ~/.cache/lmforge."""
    state = os.environ.get("XDG_STATE_HOME")
    return (Path(state) if state else Path.home() / ".cache") / "lmforge" / "chat_history"


HISTORY_LINES = 1000


class Terminal:
    """Reads the user's lines: with readline's editing and history when stdin and stdout are a
    terminal; with a "> " prompt on stderr when only stdin is; plainly from a pipe."""

    def __init__(self, stdin, stdout, stderr):
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.interactive = stdin.isatty()
        self.readline = None
        if self.interactive and stdout.isatty():
            try:
                import readline
            except ImportError:   # a Python built without it: plain lines
                readline = None   # type: ignore[assignment]
            self.readline = readline
        self.history = history_file() if self.readline is not None else None
        if self.readline is not None and self.history is not None:
            try:
                self.readline.read_history_file(str(self.history))
            except OSError:   # no history yet (or unreadable): start one
                pass
            self.readline.set_history_length(HISTORY_LINES)

    def read(self) -> str | None:
        if self.readline is not None:
            try:
                return input("> ")
            except EOFError:
                self.stdout.write("\n")
                return None
        if self.interactive:
            self.stderr.write("> ")
            self.stderr.flush()
        line = self.stdin.readline()
        return line if line else None

    def write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def close(self) -> None:
        if self.readline is not None and self.history is not None:
            try:
                self.history.parent.mkdir(parents=True, exist_ok=True)
                self.readline.write_history_file(str(self.history))
            except OSError:   # a read-only home: the session worked, only its history is not kept
                pass
