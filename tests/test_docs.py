"""The documentation stays true.

- docs/reference/ is what lmforge.shared.core.reference generates from the option declarations
  (`make docs` rewrites it);
- the README is short and starts with the two set-up commands;
- every relative link of the README and docs/ resolves to a file in the repository;
- no page carries development notes or points outside the repository;
- every `lmforge ...` line in a code block names a real command and only its options, and every
  option named in the prose exists;
- docs/python.md's code runs, block after block, against a tiny model.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import shared_path

from lmforge.shared.core import catalog, reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
STORIES = "models/stories260K"


def pages_on_disk() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ----------------------------------------------------------------------------- generated reference pages

def test_reference_pages_are_current():
    made = reference.pages()
    on_disk = {p.name for p in (DOCS / "reference").glob("*.md")}
    assert on_disk == set(made), (f"docs/reference/ holds {sorted(on_disk - set(made))} and lacks "
                                  f"{sorted(set(made) - on_disk)}: run `make docs`")
    for name, text in made.items():
        assert (DOCS / "reference" / name).read_text(encoding="utf-8") == text, \
            f"docs/reference/{name} is stale: run `make docs`"


def test_a_page_says_what_the_declaration_says():
    sft = reference.render("train sft")
    assert sft.splitlines()[2] == "# lmforge train sft"
    assert "    lmforge train sft [OPTIONS]" in sft
    assert "| `--learning-rate`, `--lr` | number, above 0 |  | Peak learning rate" in sft
    assert "| `--model`, `-m` | text | required |" in sft
    assert "## LoRA" in sft and "## Run" in sft and "## Options every command takes" in sft
    assert "`--gradient-checkpointing/--no-gradient-checkpointing` | flag | off |" in sft
    assert "`api.train.sft(...)`" in sft and "`TrainSFT` object" in sft
    pack = reference.render("data pack")
    assert "    lmforge data pack [OPTIONS] [INPUT]" in pack
    assert "| `--stage`, `-s` | `pt` \\| `sft` \\| `rm` \\| `dpo` \\| `kto` \\| `ppo` | `sft` |" in pack
    assert "| `--image-max-pixels` | integer, at least 1 | `589824` |" in pack
    assert "| `INPUT` | text | `-` |" in pack
    merge = reference.render("adapter merge")
    assert "    lmforge adapter merge [OPTIONS] BASE ADAPTERS..." in merge
    assert "`ADAPTERS` | text (one or more) | required |" in merge
    grpo = reference.render("train grpo")
    assert "--deepspeed" not in grpo and "| `--reward`, `-r` | text (repeatable) |  |" in grpo
    assert "in (0, 1)" in grpo   # --clip-range: both bounds open
    assert "Environment: `LMFORGE_API_KEY`" in reference.render("serve")
    assert "api." not in reference.render("serve") and "api." not in reference.render("data show")
    with pytest.raises(KeyError):
        reference.render("train nope")


def test_shared_declarations_show_each_command_its_own_examples():
    ceval = reference.render("eval ceval")
    assert "lmforge eval ceval -m" in ceval and "lmforge eval mmlu" not in ceval
    assert "lmforge eval mmlu -m" in reference.render("eval mmlu")


def test_every_command_has_a_summary_and_examples_of_its_own():
    for command, cls in catalog.CLASSES.items():
        assert reference.summary(command), f"{cls.__name__} has no summary"
        assert 1 <= len(reference.examples(command)) <= 3, f"{command}: give one to three examples"
        if list(catalog.CLASSES.values()).count(cls) == 1:
            assert "examples" in vars(cls) and "summary" in vars(cls), f"{cls.__name__} inherits its examples"


def test_the_python_function_each_page_names_exists():
    from lmforge.shared import api

    named = {c: reference.python_function(c) for c in catalog.COMMANDS}
    for command, function in named.items():
        if function:
            _, group, name = function.split(".")
            assert callable(getattr(getattr(api, group), name)), f"{command}: no {function}"
    assert named["train sft"] == "api.train.sft" and named["eval mmlu"] == "api.eval.mmlu"
    assert named["serve"] is None


def test_make_docs_writes_the_pages_and_removes_stale_ones(tmp_path):
    (tmp_path / "train-gone.md").write_text("a command that no longer exists\n")
    (tmp_path / "keep.txt").write_text("not a page\n")
    assert reference.main([str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.md")) == sorted(reference.pages())
    assert (tmp_path / "keep.txt").exists()
    assert reference.write(tmp_path) == []   # nothing to rewrite the second time
    assert reference.main([]) == 2


# ----------------------------------------------------------------------------- README and guides

def test_readme_is_short_and_starts_with_the_two_setup_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines (at most 300): move text into docs/"
    body = [line for line in lines[1:] if line.strip()]
    assert body[0].split("#")[0].split() == ["make", "demo"] and body[0].startswith("    ")
    assert body[1].split("#")[0].split() == ["make", "test"] and body[1].startswith("    ")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_readme_lists_every_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in catalog.COMMANDS:
        assert f"[`lmforge {command}`](docs/reference/{reference.page_name(command)})" in readme, command


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_every_relative_link_resolves():
    broken = []
    for page in pages_on_disk():
        text = page.read_text(encoding="utf-8")
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists() or ROOT not in path.parents:
                broken.append(f"{_name(page)}: {target}")
    assert not broken, "links that lead nowhere in the repository:\n" + "\n".join(broken)


def test_links_are_checked(tmp_path):
    assert LINK.findall("see [a](b.md#c), ![pic](../board.png) and [web](https://x.org)") == \
        ["b.md#c", "../board.png", "https://x.org"]


NOTES = re.compile(r"\.\./shared|DESIGN\.md|\bissues?\s+#?\d+", re.I)


def test_no_development_notes_and_nothing_outside_the_repository():
    found = [f"{_name(page)}:{n}: {line.strip()}" for page in pages_on_disk()
             for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1) if NOTES.search(line)]
    assert not found, "\n".join(found)
    assert NOTES.search("as issue 21 asks") and NOTES.search("see ../shared/x") and not NOTES.search("tissue 3")


def _code_lines(text: str):
    """(line number, line) of the shell code: 4-space indented blocks and non-Python fences."""
    fence = None
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fence = None if fence is not None else (line[3:].strip() or "text")
            continue
        if fence is not None:
            if fence != "python":
                yield n, line
        elif line.startswith("    "):
            yield n, line


def _spellings(options) -> set[str]:
    return {s for opt in options if not opt.argument for spelling in reference.spellings(opt)
            for s in spelling.split("/")}


def _invocations(line: str):
    """Each `lmforge COMMAND ARGS` in a line of shell: the words after `lmforge`."""
    line = re.split(r"\s#\s|^\s*#", line)[0]
    for part in re.split(r"\|\||&&|[|;>]", line):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        words = [w.split("$(")[-1].rstrip(")") if i < 4 else w for i, w in enumerate(words)]
        names = [w.rsplit("/", 1)[-1] for w in words]
        if "lmforge" in names[:4]:
            yield words[names.index("lmforge") + 1:]


def test_every_documented_command_line_is_real():
    common = _spellings(catalog.EVERY_COMMAND) | {"--help", "-h"}
    commands = sorted(catalog.COMMANDS, key=lambda c: -len(c.split()))
    wrong = []
    for page in pages_on_disk():
        for n, line in _code_lines(page.read_text(encoding="utf-8")):
            for rest in _invocations(line):
                if rest[:1] in (["--version"], ["--help"], []) or rest[0].startswith("["):   # or a usage line
                    continue
                command = next((c for c in commands if rest[:len(c.split())] == c.split()), None)
                if command is None:
                    wrong.append(f"{_name(page)}:{n}: no command {' '.join(rest[:2])}")
                    continue
                known = _spellings(catalog.COMMANDS[command]) | common
                wrong += [f"{_name(page)}:{n}: {command} has no {w}" for w in rest[len(command.split()):]
                          if re.match(r"^--?[a-z]", w) and w.split("=")[0] not in known]
    assert not wrong, "\n".join(wrong)


def test_every_example_is_real():
    """The examples the reference pages show pass the same check."""
    for command in catalog.COMMANDS:
        for example in reference.examples(command):
            rest = next(_invocations(example))
            known = _spellings(catalog.COMMANDS[command]) | _spellings(catalog.EVERY_COMMAND)
            assert [w for w in rest if re.match(r"^--?[a-z]", w) and w not in known] == [], example


OTHER_PROGRAMS = {"--nproc-per-node", "--nnodes", "--max-restarts", "--rdzv-backend", "--rdzv-endpoint",
                  "--rdzv-id", "--version", "--help"}   # torchrun's, and the root's


def test_every_option_the_prose_names_exists():
    everywhere = set().union(*(_spellings(o) for o in catalog.COMMANDS.values())) | _spellings(catalog.EVERY_COMMAND)
    wrong = []
    for page in pages_on_disk():
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", page.read_text(encoding="utf-8")))
        wrong += [f"{_name(page)} names {o}, which no command has" for o in sorted(named - everywhere - OTHER_PROGRAMS)]
    assert not wrong, "\n".join(wrong)


# ----------------------------------------------------------------------------- docs/python.md runs

def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_the_python_guide_runs(tmp_path, monkeypatch, capsys):
    """docs/python.md's pipeline, as a reader would run it: its blocks in order, in one fresh
    namespace, in an empty directory, on the tiny reference model."""
    model = shared_path(STORIES)
    monkeypatch.setenv("LMFORGE_MODEL", str(model))
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks((DOCS / "python.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 5
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(blocks, 1):
        exec(compile(block, f"docs/python.md (block {i})", "exec"), namespace)
    out = capsys.readouterr().out
    assert namespace["MODEL"] == str(model)
    assert (tmp_path / "merged" / "config.json").exists() and (tmp_path / "runs" / "sft" / "lmforge.json").exists()
    assert namespace["report"]["perplexity"] > 1
    assert "error: --lora-rank applies to --method lora / dora / pissa, not full" in out
    assert not (tmp_path / "runs" / "full").exists()   # refused before anything was written


def test_python_blocks_are_found():
    text = "a\n```python\nx = 1\n```\n\n    lmforge x\n```python\ny = 2\nz = 3\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = 2\nz = 3\n"]
