"""Command lines of a pipeline of lmforge commands, and the pipeline as shell text and as a Makefile.

The board (shared/board/pipeline.py) and job files (`lmforge run`, shared/core/jobs.py) both write
their pipelines through these functions, so the Makefile a board run exports and the one
`lmforge run --print make` prints are made the same way.

A step, as these functions read it, is a dict with
    argv      the command line, a list of words ("lmforge", "train", "sft", "--model=...", ...)
    target    the file the step makes last (its Makefile target), or None for a step that makes
              no file (a phony target named by `phony`)
    deps      the prerequisites of its Makefile rule (absent: the target of the step before it)
    redirect  a file the command's stdout is saved to (written whole, then renamed into place)
    mkdir     directories to create first (where the step writes)
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from lmforge.shared.core import catalog
from lmforge.shared.core.options import REQUIRED, Opt


def same_as_default(value: Any, default: Any) -> bool:
    if default is REQUIRED:
        return False
    if isinstance(value, bool) or isinstance(default, bool):
        return bool(value) == bool(default)
    if default is None:
        return value in (None, "", [])
    return str(value).strip() == str(default)


def argv(command: str, values: dict[str, Any], *, always: Collection[str] = (),
         path: Callable[[Opt, str], str] | None = None) -> list[str]:
    """`lmforge COMMAND ...` as an argument list, options in declaration order: those of `values`
    that differ from their defaults, and those named in `always` whatever their value. `path`
    rewrites each value of the options not in `always` (the board confines paths with it).
    Values are written `--flag=value`, so a value never reads as an option; arguments go last,
    after `--` when one of them starts with a dash."""
    head, tail = ["lmforge", *command.split()], []
    for o in catalog.COMMANDS[command]:
        if o.name not in values:
            continue
        value = values[o.name]
        if o.name not in always:
            if same_as_default(value, o.default):
                continue
            if o.type != "bool" and not o.many:
                value = str(value).strip()
        if value is None or value == "" or value == []:
            continue
        if o.type == "bool":
            value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
            if value:
                head.append(o.long)
            elif not o.flags:
                head.append("--no-" + o.name.replace("_", "-"))
            continue
        items = value if isinstance(value, list) else [value]
        items = [path(o, str(v).strip()) if path is not None and o.name not in always else str(v)
                 for v in items if str(v).strip()]
        if o.argument:
            tail += items
        else:
            head += [f"{o.long}={v}" for v in items]
    return head + (["--", *tail] if any(t.startswith("-") and t != "-" for t in tail) else tail)


def command_line(step: dict[str, Any]) -> str:
    """One step as a line of shell: its words quoted, its stdout saved whole to `redirect`."""
    line = shlex.join(step["argv"])
    if step.get("mkdir"):
        line = shlex.join(["mkdir", "-p", *step["mkdir"]]) + " && " + line
    redirect = step.get("redirect")
    if redirect:
        part = shlex.quote(str(redirect) + ".part")
        line += f" > {part} && mv {part} {shlex.quote(str(redirect))}"
    return line


def shell(steps: list[dict[str, Any]]) -> str:
    """The pipeline as one shell command: each step runs when the one before it succeeded."""
    return " && \\\n  ".join(command_line(s) for s in steps)


_PHONY_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def phony(name: str) -> str:
    """A Makefile target name for a step that makes no file."""
    return _PHONY_NAME.sub("-", name).strip("-") or "step"


def _make_path(path: str) -> str:
    """A file name as a Makefile rule line reads it (spaces, '#', ':' and '$' escaped)."""
    return re.sub(r"([ #:])", r"\\\1", str(path)).replace("$", "$$")


def makefile(steps: list[dict[str, Any]], header: str, goals: list[str] | None = None) -> str:
    """The pipeline as a Makefile: one rule per step, its target made from its prerequisites by its
    command line; `make` (the `all` goal: `goals`, else the last step's target) remakes what is out
    of date. Steps without a target are phony (they run every time)."""
    def target(step: dict[str, Any]) -> str:
        return _make_path(step["target"]) if step.get("target") else phony(step["name"])

    phonies = [phony(s["name"]) for s in steps if not s.get("target")]
    lines = [*(f"# {line}".rstrip() for line in header.splitlines()), "", f".PHONY: {' '.join(['all', *phonies])}",
             f"all: {' '.join(_make_path(g) for g in goals) if goals else target(steps[-1])}", ""]
    before: list[str] = []
    for s in steps:
        deps = s["deps"] if "deps" in s else before
        lines += [f"{target(s)}: {' '.join(_make_path(d) for d in deps)}".rstrip(),
                  "\t" + command_line(s).replace("$", "$$"), ""]
        before = [s["target"]] if s.get("target") else []
    return "\n".join(lines)


def relative(path: str | Path, start: Path) -> str:
    """`path` as written from `start` when it lies below it, else as it is."""
    try:
        return str(Path(path).relative_to(start))
    except ValueError:
        return str(path)
