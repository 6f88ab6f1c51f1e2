"""Tools the policy may call during a rollout, each run by a command.

A tool is a name, an argv (the command) and, optionally, its OpenAI-style schema (what the model
is shown; rendered into prompts that the rollout builds itself). A call's arguments reach the
command as one line of JSON on stdin; what it prints on stdout is the result the model reads.

Tool sets come from a tools file (a JSON list of schemas, each with a "command") and from
`--tool NAME=COMMAND` (repeatable; it replaces the command of a same-named tool from the file).
A command is split like a shell line (shlex) but never run by a shell; its words that name
existing files are made absolute, because every episode runs its tools in a fresh, empty
working directory of its own.

Failures are the model's to see, never the run's to crash on: a timeout, a non-zero exit, output
over the cap (kept up to the cap), undecodable bytes (replaced) all become the result text, with
`error` set so that the rollout counts them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterable

from lmforge.shared.core.errors import BadInput, RunFailure, close_names
from lmforge.shared.train.agent import commands

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
TIMEOUT = 10.0     # seconds a tool call may take (--tool-timeout)
OUTPUT_CAP = 4096  # bytes of a tool's stdout the model sees (--tool-output-cap)


@dataclass
class Tool:
    name: str
    argv: list[str]
    schema: dict | None = None   # {"type": "function", "function": {name, description, parameters}}

    @property
    def required(self) -> list[str]:
        params = ((self.schema or {}).get("function") or {}).get("parameters") or {}
        required = params.get("required") if isinstance(params, dict) else None
        return [r for r in required if isinstance(r, str)] if isinstance(required, list) else []


@dataclass
class Result:
    """One call's outcome, as the model will read it."""
    text: str
    error: bool = False
    kind: str = "ok"   # ok | unknown | arguments | timeout | exit | cut


@dataclass
class ToolSet:
    tools: dict[str, Tool] = field(default_factory=dict)
    timeout: float = TIMEOUT
    cap: int = OUTPUT_CAP

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise BadInput(f"--tool-timeout {self.timeout:g}: must be above 0 seconds")
        if self.cap < 1:
            raise BadInput(f"--tool-output-cap {self.cap}: must be at least 1 byte")

    def __bool__(self) -> bool:
        return bool(self.tools)

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    def schemas(self) -> list[dict]:
        """The schemas of the tools that have one, for prompts the rollout renders itself."""
        return [t.schema for t in self.tools.values() if t.schema is not None]

    def missing(self, schemas_json: str) -> list[str]:
        """The names in a row's tools column (JSON text) that no command runs."""
        return [n for n in names_of(schemas_json) if n not in self.tools]

    def call(self, name: str, arguments: object, workdir: str | None, episode: str = "",
             offered: Collection[str] | None = None) -> Result:
        """Run one call. `offered`: the tools the episode's prompt offers (its row's), when it
        names them; a call to any other is an unknown tool, even one a command runs."""
        tool = self.tools.get(name)
        if tool is None or (offered is not None and name not in offered):
            known = ", ".join(n for n in self.tools if offered is None or n in offered) or "none"
            return Result(f"error: there is no tool named {name!r} (tools: {known})", True, "unknown")
        if not isinstance(arguments, dict):
            return Result(f"error: the arguments of {name} must be a JSON object, not {_kind(arguments)}",
                          True, "arguments")
        absent = [r for r in tool.required if r not in arguments]
        if absent:
            return Result(f"error: {name} needs the argument{'s' if len(absent) > 1 else ''} "
                          f"{', '.join(absent)}", True, "arguments")
        try:
            data = (json.dumps(arguments, ensure_ascii=False) + "\n").encode("utf-8")
        except UnicodeEncodeError:   # a lone surrogate (a "\\ud800" escape): keep it escaped
            data = (json.dumps(arguments) + "\n").encode("ascii")
        env = {**os.environ, "LMFORGE_TOOL": name, "LMFORGE_EPISODE": episode}
        try:
            ran = commands.run(tool.argv, data, cwd=workdir, timeout=self.timeout, cap=self.cap, env=env)
        except OSError as exc:   # checked at set-up; it vanished since, or is not executable
            raise RunFailure(f"tool {name}: cannot start `{shlex.join(tool.argv)}` ({exc.strerror or exc})",
                             "check the command of --tool / the tools file") from None
        out = ran.stdout.decode("utf-8", "replace")
        if ran.timed_out:
            return Result(f"error: {name} did not answer within {self.timeout:g}s", True, "timeout")
        if ran.cut:
            return Result(f"{out}\n[error: {name} wrote more than {self.cap} bytes; cut there]", True, "cut")
        if ran.code != 0:
            said = _last_line(ran.stderr.decode("utf-8", "replace")) or _last_line(out) or "no message"
            return Result(f"error: {name} failed (exit {ran.code}): {said}", True, "exit")
        return Result(out[:-1] if out.endswith("\n") else out)


def names_of(schemas_json: str) -> list[str]:
    """The tool names of a tools column's JSON text (OpenAI schemas or bare functions); none for
    "" or text that is no JSON list."""
    if not schemas_json:
        return []
    try:
        listed = json.loads(schemas_json)
    except ValueError:
        return []
    if not isinstance(listed, list):
        return []
    names = [((t.get("function") or t) if isinstance(t, dict) else {}).get("name") for t in listed]
    return [n for n in names if isinstance(n, str)]


def _kind(value: object) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _last_line(text: str) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


# ----------------------------------------------------------------------------- set-up

def command_argv(command: str | list, base: Path, what: str) -> list[str]:
    """A user's command (shell-like text or an argv list) -> an argv with its program found and its
    file arguments absolute. Refused (BadInput) when the program cannot be found."""
    if isinstance(command, list):
        if not command or not all(isinstance(w, str) and w for w in command):
            raise BadInput(f"{what}: a command list must hold non-empty strings")
        words = list(command)
    elif isinstance(command, str):
        try:
            words = shlex.split(command)
        except ValueError as exc:
            raise BadInput(f"{what}: cannot read the command `{command}` ({exc})", "check its quotes") from None
        if not words:
            raise BadInput(f"{what}: empty command")
    else:
        raise BadInput(f"{what}: the command must be text or a list of words")
    program = words[0]
    if os.sep in program:
        path = (base / program).resolve()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise BadInput(f"{what}: {program} is not an executable file",
                           f"give a program on PATH or a path to an executable (relative to {base})")
        words[0] = str(path)
    elif shutil.which(program) is None:
        raise BadInput(f"{what}: no program `{program}` on PATH", "install it or give its path")
    for i in range(1, len(words)):
        candidate = base / words[i]
        if not words[i].startswith("-") and candidate.exists():
            words[i] = str(candidate.resolve())
    return words


def _schema(entry: dict, where: str) -> tuple[str, dict | None]:
    fn = entry.get("function") if entry.get("type") == "function" else entry
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise BadInput(f"{where}: a tool needs a 'name'", 'e.g. {"name": "calc", "parameters": {...}, "command": "..."}')
    name = fn["name"]
    if not NAME.fullmatch(name):
        raise BadInput(f"{where}: tool name {name!r} must be letters, digits, _ . - (at most 64)")
    if "parameters" in fn and not isinstance(fn["parameters"], dict):
        raise BadInput(f"{where} ({name}): 'parameters' must be a JSON Schema object")
    if "description" in fn and not isinstance(fn["description"], str):
        raise BadInput(f"{where} ({name}): 'description' must be text")
    schema = {k: v for k, v in fn.items() if k != "command"}
    if set(schema) == {"name"}:
        return name, None   # a bare name: nothing to show the model beyond it
    return name, {"type": "function", "function": schema}


def load_file(path: str) -> list[Tool]:
    """A tools file: a JSON list of OpenAI tool schemas, each with a "command"."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"--tools {path}: no such file")
    try:
        value = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"--tools {path}: not valid JSON ({exc})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise BadInput(f"--tools {path}: give a JSON list of tools", 'e.g. [{"name": "calc", "command": "./calc.py"}]')
    tools: list[Tool] = []
    for k, entry in enumerate(value, 1):
        where = f"--tools {path}, tool {k}"
        if not isinstance(entry, dict):
            raise BadInput(f"{where}: not a JSON object")
        name, schema = _schema(entry, where)
        if "command" not in entry:
            raise BadInput(f"{where} ({name}): no \"command\"", "add the command that runs it (text or a list of words)")
        tools.append(Tool(name, command_argv(entry["command"], p.parent, f"{where} ({name})"), schema))
    return tools


def parse_spec(spec: str) -> Tool:
    """`--tool NAME=COMMAND`."""
    name, sep, command = spec.partition("=")
    name = name.strip()
    if not sep or not name:
        raise BadInput(f"--tool {spec}: give NAME=COMMAND", "e.g. --tool calc='python3 calc.py'")
    if not NAME.fullmatch(name):
        raise BadInput(f"--tool {spec}: tool name {name!r} must be letters, digits, _ . - (at most 64)")
    return Tool(name, command_argv(command, Path.cwd(), f"--tool {name}"))


def toolset(files: list[str] | str | None = None, specs: list[str] | None = None, *,
            timeout: float = TIMEOUT, cap: int = OUTPUT_CAP) -> ToolSet:
    """The tools of a run: those of the tools file(s), then each --tool (replacing a same-named
    tool's command and keeping its schema)."""
    found: dict[str, Tool] = {}
    for path in [files] if isinstance(files, str) else list(files or []):
        for tool in load_file(path):
            if tool.name in found:
                raise BadInput(f"--tools {path}: tool {tool.name!r} is defined twice")
            found[tool.name] = tool
    for spec in specs or []:
        tool = parse_spec(spec)
        if tool.name in found and found[tool.name].schema is not None:
            tool.schema = found[tool.name].schema
        found[tool.name] = tool
    return ToolSet(found, timeout, cap)


def check_rows(tools: ToolSet, column: Iterable[str | None], env_handles: bool = False, where: str = "") -> None:
    """Refuse data whose rows offer the model a tool that nothing runs (unless an environment
    may run it). `where` begins the message (say, "--data FILE: ")."""
    if env_handles:
        return
    for n, text in enumerate(column, 1):
        absent = tools.missing(text or "")
        if absent:
            raise BadInput(f"{where}row {n} offers the tool {absent[0]!r}, which no command runs",
                           f"add --tool {absent[0]}=COMMAND or an entry in the --tools file "
                           f"({close_names(absent[0], tools.names) if tools.names else 'no tools given'})")
