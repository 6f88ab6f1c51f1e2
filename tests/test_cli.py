"""The command line itself: fast help, version, exit codes, completions."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT, bad, ok, run

HEAVY = ("torch", "transformers", "datasets", "peft", "trl", "pyarrow", "accelerate", "deepspeed",
         "bitsandbytes", "pandas")


def _imports_after(argv: list[str]) -> list[str]:
    code = ("import sys\nfrom lmforge.tools.main import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print('\\n' + __import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    return json.loads(result.stdout.decode().strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["data", "--help"], ["data", "align", "--help"],
                                  ["completion", "bash"], ["--version"]])
def test_help_and_completion_import_no_heavy_library(argv):
    assert _imports_after(argv) == []


@pytest.mark.parametrize("argv", [["--help"], ["data", "align", "--help"], ["train", "sft", "-h"], ["--version"]])
def test_help_skips_typers_pydantic_coercion(argv):
    """Typer coerces option values through pydantic (~90 ms to import); help and --version need none."""
    code = ("import sys\nfrom lmforge.tools.main import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('\\n' + str('pydantic' in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.stdout.decode().strip().splitlines()[-1] == "False"


def test_every_command_help_imports_nothing_heavy():
    from lmforge.tools.completion import _walk
    from lmforge.tools.main import app
    from typer.main import get_command

    paths = [list(p) for p, _ in _walk(get_command(app)) if p]
    code = ("import sys\nfrom lmforge.tools.main import main\n"
            f"for argv in {paths!r}:\n"
            "    try:\n        main(argv + ['--help'])\n    except SystemExit:\n        pass\n"
            f"print('\\n' + __import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert json.loads(result.stdout.decode().strip().splitlines()[-1]) == []


def test_version():
    from lmforge.shared import __version__

    assert ok(["--version"]).stdout.decode().strip() == f"lmforge {__version__}"


def test_usage_errors_are_one_line_exit_2():
    assert "No such option" in bad(["data", "align", "--no-such-flag"])
    assert "No such command" in bad(["dta"])


def test_no_arguments_shows_help():
    result = run([])
    assert result.returncode == 2 and b"Usage" in result.stderr + result.stdout


@pytest.mark.parametrize("shell, name", [("bash", "lmforge.bash"), ("zsh", "_lmforge"), ("fish", "lmforge.fish")])
def test_completion_scripts_are_fresh(shell, name):
    committed = (ROOT / "completions" / name).read_text()
    generated = ok(["completion", shell]).stdout.decode()
    assert committed == generated, f"completions/{name} is stale: run `make completions`"


def _bash_complete(line: str) -> list[str]:
    script = ROOT / "completions" / "lmforge.bash"
    words = line.split(" ")
    program = (f"source {script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)})\n"
               f"COMP_CWORD={len(words) - 1}\n_lmforge\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True, timeout=30)
    return result.stdout.decode().split()


def test_bash_completion_function():
    assert _bash_complete("lmforge da") == ["data"]
    assert "align" in _bash_complete("lmforge data ")
    assert _bash_complete("lmforge data align --form") == ["--format"]
    assert "sharegpt" in _bash_complete("lmforge data align --format ")


def test_real_bash_completes_da_tab_to_data(tmp_path):
    """An interactive bash on a pseudo-terminal: type `lmforge da<TAB>`, read back the line."""
    main, secondary = pty.openpty()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TERM": "dumb", "PS1": "$ ", "INPUTRC": "/dev/null"}
    proc = subprocess.Popen(["bash", "--norc", "--noprofile", "-i"], stdin=secondary, stdout=secondary,
                            stderr=secondary, env=env, close_fds=True)
    os.close(secondary)

    def read_until(marker: bytes, timeout: float = 20) -> bytes:
        seen = b""
        end = time.time() + timeout
        while time.time() < end and marker not in seen:
            ready, _, _ = select.select([main], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(main, 4096)
                except OSError:
                    break
        return seen

    try:
        os.write(main, f"source {ROOT / 'completions' / 'lmforge.bash'}\n".encode())
        os.write(main, b"echo READY\n")
        read_until(b"READY\r\n$ ")
        os.write(main, b"lmforge da\t")
        echoed = read_until(b"lmforge data ")
        assert b"lmforge data " in echoed, echoed
    finally:
        proc.kill()
        proc.wait()
        os.close(main)


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completion():
    script = ROOT / "completions" / "lmforge.fish"
    result = subprocess.run(["fish", "-c", f"source {script}; complete -C 'lmforge da'"],
                            capture_output=True, timeout=30)
    assert result.stdout.decode().split("\t")[0] == "data"


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_script_loads():
    script = ROOT / "completions" / "_lmforge"
    result = subprocess.run(["zsh", "-c", f"autoload -U compinit && compinit -u; source {script}; "
                             "whence -w _lmforge"], capture_output=True, timeout=30)
    assert b"_lmforge: function" in result.stdout, result.stderr


def _commands():
    """(path, click command) for every leaf command."""
    import typer
    from lmforge.tools.main import app

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, (*path, name))
        else:
            yield path, cmd

    return dict(walk(typer.main.get_command(app), ()))


def _options(cmd) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


def test_readme_names_only_real_commands_and_options():
    """The README's examples stay true: each `lmforge ...` line in a code block names a real
    command and only its options; an option named in the prose belongs to some command."""
    import re

    commands = _commands()
    wrong = []
    for n, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        if not line.startswith("    "):
            continue
        for part in re.split(r"\||&&|;", line.split("  #")[0]):
            words = [w.rsplit("/", 1)[-1] if i < 3 else w for i, w in enumerate(part.split())]
            if "lmforge" not in words[:3] or words[-1:] == ["lmforge"]:
                continue
            rest = words[words.index("lmforge") + 1:]
            if rest[:1] in (["--version"], ["--help"]):
                continue
            path = next((p for p in sorted(commands, key=len, reverse=True) if tuple(rest[:len(p)]) == p), None)
            if path is None:
                wrong.append(f"line {n}: no command {' '.join(rest[:2])}")
                continue
            known = _options(commands[path])
            wrong += [f"line {n}: {' '.join(path)} has no {w}" for w in rest[len(path):]
                      if w.startswith("--") and w.split("=")[0] not in known]
    everywhere = set().union(*map(_options, commands.values())) | {"--version", "--help", "--nproc-per-node"}
    prose = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", (ROOT / "README.md").read_text()))
    wrong += [f"README names {o}, which no command has" for o in sorted(prose - everywhere)]
    assert not wrong, "\n".join(wrong)
