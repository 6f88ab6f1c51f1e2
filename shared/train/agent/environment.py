"""An environment: one long-running process that plays many episodes over JSON lines.

lmforge starts the command once (its own process group, stopped whole at the end) and writes one
JSON object per line on its stdin; the environment answers every line with exactly one JSON
object on one line of stdout, in order. `type` and `episode` come first on every line lmforge
writes, so line-oriented programs (awk, sed) can read them with a pattern.

    {"type": "reset", "episode": ID, "row": {...the prompt row...}}
        -> {"episode": ID, "observation": TEXT?, "system": TEXT?, "tools": [schemas]?}
    {"type": "step", "episode": ID, "text": TEXT, "content": TEXT, "calls": [{"name", "arguments"}]}
        -> {"episode": ID, "observation": TEXT?, "results": [TEXT, ...]?, "reward": NUMBER?, "done": BOOL?}
    {"type": "end", "episode": ID}
        -> {"episode": ID, "reward": NUMBER?}

Each request is answered before the next is written. An environment that exits, stays silent
past the timeout, or answers with something else (not JSON, another episode, a reward that is
not a finite number) stops the run with one line naming the episode and what it said.
"""

from __future__ import annotations

import collections
import json
import math
import queue
import subprocess
import threading
import weakref
from pathlib import Path

from lmforge.shared.core.errors import BadInput, RunFailure
from lmforge.shared.train.agent import commands
from lmforge.shared.train.agent.tools import command_argv

TIMEOUT = 60.0           # seconds an environment may take to answer one line (--environment-timeout)
LINE_LIMIT = 1 << 22     # bytes in one answer line
_EOF = object()


class Environment:
    def __init__(self, command: str | list, timeout: float = TIMEOUT, cwd: str | None = None):
        if not timeout > 0:
            raise BadInput(f"--environment-timeout {timeout:g}: must be above 0 seconds")
        self.argv = command_argv(command, Path(cwd or "."), "--environment")
        self.command = command if isinstance(command, str) else " ".join(command)
        self.timeout, self.cwd = timeout, cwd
        self.proc: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)
        self._finalizer: weakref.finalize | None = None

    # -- the process
    def start(self) -> None:
        if self.proc is not None:
            return
        # a process of its own: nothing the previous one said (its end, say) is read as this one's
        self._lines, self._stderr = queue.Queue(), collections.deque(maxlen=20)
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, cwd=self.cwd, start_new_session=True)
        except OSError as exc:
            raise BadInput(f"--environment `{self.command}`: cannot start it ({exc.strerror or exc})") from None
        # the readers hold the queues, not this object, so that dropping it stops the process
        threading.Thread(target=_read_lines, args=(self.proc, self._lines), daemon=True).start()
        threading.Thread(target=_read_stderr, args=(self.proc, self._stderr), daemon=True).start()
        # however the run ends (an exception past the trainer, the interpreter exiting), it goes too
        self._finalizer = weakref.finalize(self, commands.stop, self.proc)

    def close(self) -> None:
        """Stop the process (and whatever it started). Safe to call more than once."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if self._finalizer is not None:
            self._finalizer.detach()
        try:
            if proc.stdin is not None:
                proc.stdin.close()   # end of input: a well-behaved environment exits on its own
            proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        commands.stop(proc)

    def __enter__(self) -> "Environment":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the protocol
    def _said(self) -> str:
        return f" (its last words on stderr: {self._stderr[-1]})" if self._stderr else ""

    def request(self, message: dict, episode: str) -> dict:
        """Write one line, read its answer; any failure closes the process and raises."""
        self.start()
        proc = self.proc
        assert proc is not None and proc.stdin is not None
        where = f"--environment `{self.command}`, episode {episode}"
        try:
            proc.stdin.write((json.dumps(message, ensure_ascii=False) + "\n").encode("utf-8", "replace"))
            proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            code = proc.poll()
            self.close()
            raise RunFailure(f"{where}: it stopped reading (exit {code}) before the {message['type']} message"
                             f"{self._said()}", "run it by hand on the messages of the README") from None
        try:
            line = self._lines.get(timeout=self.timeout)
        except queue.Empty:
            self.close()
            raise RunFailure(f"{where}: no answer to the {message['type']} message within {self.timeout:g}s"
                             f"{self._said()}", "answer every line with one line (and flush stdout)") from None
        if line is _EOF:
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            self.close()
            raise RunFailure(f"{where}: it exited (exit {code}) instead of answering the {message['type']} "
                             f"message{self._said()}", "run it by hand on the messages of the README")
        return self._parse(line, message, episode, where)

    def _parse(self, line: bytes, message: dict, episode: str, where: str) -> dict:
        def bad(what: str) -> BadInput:
            self.close()
            shown = line.decode("utf-8", "replace").strip()
            return BadInput(f"{where}: its answer to the {message['type']} message {what}: {shown[:160]!r}",
                            "answer each line with one JSON object holding the same episode id")

        if not line.endswith(b"\n") and len(line) >= LINE_LIMIT:
            raise bad(f"is longer than {LINE_LIMIT} bytes")
        try:
            reply = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise bad("is not UTF-8") from None
        except ValueError:
            raise bad("is not JSON") from None
        if not isinstance(reply, dict):
            raise bad("is not a JSON object")
        if reply.get("episode") != episode:
            raise bad(f"names episode {reply.get('episode')!r}, not {episode!r}")
        for key in ("observation", "system"):
            if reply.get(key) is not None and not isinstance(reply[key], str):
                raise bad(f"has a {key} that is not text")
        reward = reply.get("reward", 0)
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise bad("has a reward that is not a finite number")
        if not isinstance(reply.get("done", False), bool):
            raise bad("has a done that is not true or false")
        tools = reply.get("tools")
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise bad("has tools that are not a list of tool schemas")
        results = reply.get("results")
        if results is not None and not isinstance(results, list):
            raise bad("has results that are not a list")
        return reply

    def reset(self, episode: str, row: dict) -> dict:
        return self.request({"type": "reset", "episode": episode, "row": row}, episode)

    def step(self, episode: str, text: str, content: str, calls: list[dict]) -> dict:
        reply = self.request({"type": "step", "episode": episode, "text": text, "content": content,
                              "calls": calls}, episode)
        if calls and not reply.get("done"):
            results = reply.get("results")
            if not isinstance(results, list) or len(results) != len(calls):
                self.close()
                raise BadInput(f"--environment `{self.command}`, episode {episode}: the model called "
                               f"{len(calls)} of its tools and the answer holds "
                               f"{'no results' if results is None else f'{len(results)} results'}",
                               'answer a turn with tool calls with "results": one text per call')
        elif not reply.get("done") and not isinstance(reply.get("observation"), str):
            self.close()
            raise BadInput(f"--environment `{self.command}`, episode {episode}: its answer to a step is "
                           "neither done nor an observation", 'give "observation": TEXT, or "done": true')
        return reply

    def end(self, episode: str) -> float:
        return float(self.request({"type": "end", "episode": episode}, episode).get("reward", 0))


def _read_lines(proc: subprocess.Popen, lines: queue.Queue) -> None:
    assert proc.stdout is not None
    try:
        while True:
            line = proc.stdout.readline(LINE_LIMIT)
            if not line:
                break
            lines.put(line)
    except (OSError, ValueError):
        pass
    lines.put(_EOF)


def _read_stderr(proc: subprocess.Popen, said: collections.deque) -> None:
    assert proc.stderr is not None
    try:
        for raw in proc.stderr:   # drained always, so a chatty environment never blocks on it
            text = raw.decode("utf-8", "replace").strip()
            if text:
                said.append(text[:300])
    except (OSError, ValueError):
        pass


def row_for_environment(row: dict) -> dict:
    """The JSON-able fields of a prompt row (what reset receives)."""
    out = {}
    for key, value in row.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out
