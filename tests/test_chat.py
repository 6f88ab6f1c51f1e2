"""`chat` in a real terminal (a pseudo-terminal): Ctrl-C stops an answer and the session goes on,
Ctrl-D leaves with 0, lines are edited and kept in a history; local commands; `chat --url` against
a running `lmforge serve`."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import termios
import time
from pathlib import Path

import pytest
from conftest import LMFORGE, bad, ok, shared_path

STORIES = "models/stories260K"


class Terminal:
    """`lmforge ARGS` on a pseudo-terminal it has as its controlling terminal, so that Ctrl-C typed
    there is a SIGINT, as in a shell."""

    def __init__(self, args: list, env: dict):
        main, secondary = pty.openpty()

        def controlling_terminal() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen([*LMFORGE, *map(str, args)], stdin=secondary, stdout=secondary,
                                     stderr=secondary, preexec_fn=controlling_terminal, env=env, close_fds=True)
        os.close(secondary)
        self.fd = main
        self.seen = b""

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, wanted: bytes, after: int = 0, timeout: float = 120) -> int:
        """Read until `wanted` appears after offset `after` of the output; the offset where it ends."""
        deadline = time.monotonic() + timeout
        while wanted not in self.seen[after:]:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"no {wanted!r} within {timeout}s; the terminal shows:\n{self.text()}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:   # EIO: the program ended and closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the program ended before {wanted!r}; the terminal shows:\n{self.text()}")
            self.seen += chunk
        return self.seen.index(wanted, after) + len(wanted)

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        while True:   # what is left on the terminal
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if not ready:
                break
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            self.seen += chunk
        os.close(self.fd)
        return code

    def text(self) -> str:
        return self.seen.decode("utf-8", "replace")


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LMFORGE_DEBUG", "LMFORGE_API_KEY")}
    return {**env, "TERM": "dumb", "XDG_STATE_HOME": str(tmp_path / "state")}


def test_ctrl_c_stops_the_answer_and_the_session_goes_on(tmp_path):
    """Ctrl-C in the middle of a long answer: the answer stops, the prompt comes back, the next
    question is answered; Ctrl-D leaves with 0 and no abort (the generation thread was stopped)."""
    term = Terminal(["chat", "-m", shared_path(STORIES), "--template", "default", "--temperature", "0",
                     "--max-tokens", "100000"], _env(tmp_path))
    try:
        at = term.expect(b"> ")
        term.type("Once upon a time\r")
        at = term.expect(b"Once upon a time", at)       # the line, echoed
        at = term.expect(b" ", at + 4)                   # ... and the first words of the answer
        term.type("\x03")
        at = term.expect(b"[stopped]", at)
        at = term.expect(b"> ", at)                      # the prompt is back
        term.type("The dog\r")
        answered = term.expect(b"The dog", at)
        at = term.expect(b"> ", answered)                # answered in full this time
        assert len(term.seen[answered:at].strip()) > 20, term.text()
        assert b"[stopped]" not in term.seen[answered:at]
        term.type("\x04")                                # Ctrl-D at an empty prompt
        code = term.finish()
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    out = term.text()
    assert code == 0, out
    for sign in ("Aborted", "terminate called", "Traceback", "error:"):
        assert sign not in out, out
    history = (tmp_path / "state" / "lmforge" / "chat_history").read_text()
    assert "Once upon a time" in history and "The dog" in history


def test_ctrl_c_twice_at_the_prompt_leaves(tmp_path):
    term = Terminal(["chat", "-m", shared_path(STORIES), "--template", "default"], _env(tmp_path))
    try:
        at = term.expect(b"> ")
        term.type("half a line")
        at = term.expect(b"half a line", at)
        term.type("\x03")                                # drops the line
        at = term.expect(b"Ctrl-C again or Ctrl-D to leave", at)
        at = term.expect(b"> ", at)
        term.type("\x03")
        code = term.finish()
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert code == 0 and "Traceback" not in term.text() and "error:" not in term.text(), term.text()


def test_commands_are_handled_here_and_never_sent():
    stories = shared_path(STORIES)
    got = ok(["chat", "-m", stories, "--template", "default", "--temperature", "0", "--max-tokens", "8"],
             input=b"/help\n/nonsense\n/system\n/system Be brief.\n/system\n/image\n/system -\n/quit\nnever read\n")
    out = got.stdout.decode()
    assert out.startswith("commands (never sent to the model):\n") and "/reset" in out and "/image PATH" in out
    assert "[unknown command /nonsense: /help lists the commands" in out
    assert out.count("[no system prompt]") == 1 and "[system prompt: Be brief.]" in out
    assert "[system prompt removed]" in out and "[this model reads text only]" in out
    said = [line for line in out.splitlines() if line and not line.startswith(("[", " ", "commands", "Ctrl-C"))]
    assert said == [], said   # no answer: nothing reached the model


def test_system_command_and_double_slash_reach_the_model():
    stories = shared_path(STORIES)
    args = ["chat", "-m", stories, "--template", "default", "--temperature", "0", "--max-tokens", "12"]
    plain = ok(args, input=b"Once upon a time\n").stdout.decode().splitlines()
    with_system = ok(args, input=b"/system Lily and Tom\nOnce upon a time\n").stdout.decode().splitlines()
    flagged = ok([*args, "--system", "Lily and Tom"], input=b"Once upon a time\n").stdout.decode().splitlines()
    assert with_system[1:] == flagged and flagged != plain   # /system is --system, from the next answer on
    slashed = ok(args, input=b"//help\n").stdout.decode()
    assert "commands" not in slashed and slashed.strip()      # sent as "/help", answered


def test_penalties_change_the_answer():
    stories = shared_path(STORIES)
    args = ["chat", "-m", stories, "--template", "default", "--temperature", "0", "--max-tokens", "40"]
    plain = ok(args, input=b"Once upon a time\n").stdout
    assert ok([*args, "--repetition-penalty", "1.5"], input=b"Once upon a time\n").stdout != plain
    assert ok([*args, "--presence-penalty", "1.5"], input=b"Once upon a time\n").stdout != plain
    assert "--frequency-penalty" in bad([*args, "--frequency-penalty", "3"])


def test_chat_option_checks(tmp_path):
    assert "--model DIR" in bad(["chat"])
    assert "--adapter applies to a model chat loads" in bad(["chat", "--url", "http://127.0.0.1:9", "--adapter", "x"])
    line = bad(["chat", "--url", "http://127.0.0.1:9"], input=b"hi\n")
    assert "cannot reach the server" in line
    assert "not an http" in bad(["chat", "--url", "localhost:8000"])


# ----------------------------------------------------------------------------- chat --url

@pytest.fixture(scope="module")
def served():
    pytest.importorskip("httpx")
    from test_serve import KEY, Server

    s = Server("-m", str(shared_path(STORIES)), "--template", "default", "--name", "stories", api_key=KEY)
    yield s, KEY
    s.stop()


def test_chat_url_answers_as_the_local_model_does(served):
    server, key = served
    text = b"Once upon a time\nThe dog\n/reset\nOnce upon a time\n/exit\n"
    local = ok(["chat", "-m", shared_path(STORIES), "--template", "default", "--temperature", "0",
                "--max-tokens", "12"], input=text).stdout.decode()
    remote = ok(["chat", "--url", server.url, "--api-key", key, "--temperature", "0", "--max-tokens", "12"],
                input=text).stdout.decode()
    assert remote == local and remote.count("\n") == 4
    # the key from the environment; the served model named
    assert ok(["chat", "--url", server.url + "/v1", "--model", "stories", "--temperature", "0", "--max-tokens", "12"],
              input=text, env={"LMFORGE_API_KEY": key}).stdout.decode() == local


def test_chat_url_errors_are_one_line_or_a_note(served):
    server, key = served
    assert "wants an API key" in bad(["chat", "--url", server.url], input=b"hi\n")
    assert "serves stories" in bad(["chat", "--url", server.url, "--api-key", key, "--model", "gpt-9"])
    # a message the server refuses is said, and the chat goes on
    out = ok(["chat", "--url", server.url, "--api-key", key, "--max-tokens", "100000"],
             input=b"Once upon a time\n").stdout.decode()
    assert "[the server refused the message (HTTP 400)" in out and "context" in out


def test_ctrl_c_with_url_closes_the_stream_and_the_server_stops(served, tmp_path):
    server, key = served
    before = server.health()["generated_tokens"]
    term = Terminal(["chat", "--url", server.url, "--api-key", key, "--temperature", "0", "--max-tokens", "480"],
                    _env(tmp_path))
    try:
        at = term.expect(b"> ")
        term.type("Once upon a time\r")
        at = term.expect(b"Once upon a time", at)
        at = term.expect(b" ", at + 4)
        term.type("\x03")
        at = term.expect(b"[stopped]", at)
        term.expect(b"> ", at)
        term.type("/exit\r")
        code = term.finish()
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert code == 0 and "Traceback" not in term.text(), term.text()
    deadline = time.time() + 20
    while server.health()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert server.health()["generated_tokens"] - before < 480   # the server stopped too
