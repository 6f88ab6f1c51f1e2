"""The reference pages under docs/reference/: one markdown page per command, generated from the
command's declaration (lmforge.shared.core.catalog), so the pages say what `--help` says and
cannot drift from it (tests/test_docs.py fails when a page on disk differs from `render`).

    python -m lmforge.shared.core.reference docs/reference     # `make docs`

A page holds the command's summary (its options class's `summary`), the usage line, its
arguments and options grouped by help panel (spellings, type, default, choices, range, help), the
options every command takes, and the class's `examples`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lmforge.shared.core import catalog
from lmforge.shared.core.options import Opt

GROUPS = {   # the index's sections: each command's first word
    "data": "Data",
    "model": "Models and adapters",
    "adapter": "Models and adapters",
    "train": "Training",
    "eval": "Evaluation",
}
OTHER = "Serving and tools"
API_GROUPS = ("data", "model", "adapter", "train", "eval")   # lmforge.shared.api's modules
NO_API = ("data show", "data templates")
KINDS = {"str": "text", "int": "integer", "float": "number", "bool": "flag", "path": "path"}


def page_name(command: str) -> str:
    """"train sft" -> "train-sft.md"."""
    return command.replace(" ", "-") + ".md"


def summary(command: str) -> str:
    return str(getattr(catalog.declaration_of(command), "summary", "")).strip()


def examples(command: str) -> list[str]:
    """The class's example command lines that run `command` (a class serving several commands,
    as eval mmlu/cmmlu/ceval do, holds examples of each)."""
    lines = list(getattr(catalog.declaration_of(command), "examples", ()))
    return [line for line in lines if _runs(line, command)]


def _runs(line: str, command: str) -> bool:
    words = line.split()
    return words[: 1 + len(command.split())] == ["lmforge", *command.split()]


def spellings(opt: Opt) -> list[str]:
    """The option's spellings as the command line takes them: `--packing/--no-packing` for a
    boolean Typer names itself, the declared flags otherwise, the argument's NAME."""
    if opt.argument:
        return [opt.long]
    if opt.flags:
        return list(opt.flags)
    flag = "--" + opt.name.replace("_", "-")
    return [f"{flag}/--no-{flag[2:]}"] if opt.type == "bool" else [flag]


def python_function(command: str) -> str | None:
    """The Python API's function for `command` ("api.train.sft"), or None for the commands that
    have none (they print, serve or talk rather than make something)."""
    group, _, name = command.partition(" ")
    if group not in API_GROUPS or command in NO_API:
        return None
    return f"api.{group}.{name}"


def _keyword(command: str) -> str:
    """How an option reads as a keyword argument, shown on one of the command's own options."""
    opts = [o for o in catalog.options(command) if not o.argument]
    opt = next((o for o in opts if "_" in o.name), opts[0])
    return f"`{opt.long}` is `{opt.name}=`"


def usage(command: str) -> str:
    parts = ["lmforge", command, "[OPTIONS]"]
    for opt in catalog.options(command):
        if opt.argument:
            name = opt.long + ("..." if opt.many else "")
            parts.append(name if opt.required else f"[{name}]")
    return " ".join(parts)


def _kind(opt: Opt) -> str:
    text = " \\| ".join(f"`{c}`" for c in opt.choices) if opt.choices else KINDS[opt.type]
    if opt.many:
        text += " (one or more)" if opt.argument else " (repeatable)"
    if opt.type in ("int", "float") and (opt.min is not None or opt.max is not None):
        text += f", {_range(opt)}"
    return text


def _range(opt: Opt) -> str:
    words = opt.range_text()
    return words.replace("above", "at least") if opt.type == "int" else words


def _default(opt: Opt) -> str:
    if opt.required:
        return "required"
    value: Any = opt.default
    if value is None or not opt.show_default:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, Path):
        return f"`{value}`"
    if isinstance(value, list):
        return ", ".join(f"`{v}`" for v in value) or ""
    return f"`{value}`" if value != "" else '`""`'


def _help(opt: Opt) -> str:
    text = opt.help.replace("|", "\\|")
    if opt.envvar:
        text += f" Environment: `{opt.envvar}`."
    return text


def _table(opts: list[Opt], head: str = "option") -> list[str]:
    lines = [f"| {head} | type | default | what it does |", "| --- | --- | --- | --- |"]
    for opt in opts:
        names = ", ".join(f"`{s}`" for s in spellings(opt))
        lines.append(f"| {names} | {_kind(opt)} | {_default(opt)} | {_help(opt)} |")
    return lines


def panels(command: str) -> list[tuple[str, list[Opt]]]:
    """The command's options by help panel, as `--help` groups them: the arguments, then options
    without a panel, then each panel in the order its first option is declared."""
    opts = catalog.options(command)
    groups: dict[str, list[Opt]] = {"Arguments": [o for o in opts if o.argument],
                                    "Options": [o for o in opts if not o.argument and o.panel is None]}
    for opt in opts:
        if not opt.argument and opt.panel is not None:
            groups.setdefault(opt.panel, []).append(opt)
    return [(name, group) for name, group in groups.items() if group]


def render(command: str) -> str:
    """The reference page of `command` ("train sft"), as markdown."""
    if command not in catalog.COMMANDS:
        raise KeyError(f"no command {command!r}")
    lines = [f"# lmforge {command}", "", summary(command), "", "    " + usage(command), ""]
    python = python_function(command)
    if python:
        cls = catalog.declaration_of(command).__name__
        lines += [f"In Python: `{python}(...)`, with the options below as keyword arguments ({_keyword(command)}) or "
                  f"one `{cls}` object ([the Python API](../python.md)).", ""]
    for name, group in panels(command):
        lines += [f"## {name}", "", *_table(group, "argument" if name == "Arguments" else "option"), ""]
    lines += ["## Options every command takes", "", *_table(list(catalog.EVERY_COMMAND)), ""]
    shown = examples(command)
    if shown:
        lines += ["## Examples", "", *("    " + line for line in shown), ""]
    lines += ["Generated from the command's declaration by `make docs`; "
              "[all commands](index.md)."]
    return _header() + "\n".join(lines) + "\n"


def _header() -> str:
    return "<!-- generated by `make docs` (lmforge.shared.core.reference): do not edit -->\n\n"


def index() -> str:
    """The index page: every command with its summary, by group, and the root's options."""
    lines = ["# Command reference", "",
             "One page per command, generated from the declarations of its options (the same ones "
             "`--help`, `--config` files, the board and the Python API read). The guides are listed in the "
             "[README](../../README.md#guides).", ""]
    sections: dict[str, list[str]] = {}
    for command in catalog.COMMANDS:
        section = GROUPS.get(command.split()[0], OTHER)
        sections.setdefault(section, []).append(command)
    for section, commands in sections.items():
        lines += [f"## {section}", "", "| command | what it does |", "| --- | --- |"]
        lines += [f"| [`lmforge {c}`]({page_name(c)}) | {summary(c).replace('|', '/')} |" for c in commands]
        lines.append("")
    lines += ["## `lmforge` itself", "", "    lmforge [OPTIONS] COMMAND [ARGS]...", "", *_table(list(catalog.ROOT)), ""]
    return _header() + "\n".join(lines)


def pages() -> dict[str, str]:
    """Every page by file name: one per command, and index.md."""
    out = {page_name(command): render(command) for command in catalog.COMMANDS}
    out["index.md"] = index()
    return out


def write(directory: Path) -> list[Path]:
    """Write every page into `directory`, and remove pages of commands that no longer exist."""
    directory.mkdir(parents=True, exist_ok=True)
    made = pages()
    for stale in directory.glob("*.md"):
        if stale.name not in made:
            stale.unlink()
    written = []
    for name, text in made.items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m lmforge.shared.core.reference DIRECTORY\n")
        return 2
    written = write(Path(argv[0]))
    sys.stderr.write(f"reference: {len(pages())} pages in {argv[0]} ({len(written)} rewritten)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
