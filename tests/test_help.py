"""`--help` read where it is not a terminal (a log, a pipe): nothing cut short."""

from __future__ import annotations

import subprocess

import pytest
from conftest import LMFORGE

from lmforge.shared.core import catalog


@pytest.mark.parametrize("command", sorted(catalog.COMMANDS))
def test_help_into_a_pipe_cuts_nothing(command):
    result = subprocess.run([*LMFORGE, *command.split(), "--help"], capture_output=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    text = result.stdout.decode()
    assert result.returncode == 0 and "Usage:" in text, result.stderr.decode()
    assert "…" not in text, [line for line in text.splitlines() if "…" in line]


def test_bash_completes_template_names_after_t():
    from conftest import ROOT

    script = (f"source {ROOT / 'completions' / 'lmforge.bash'}; COMP_WORDS=(lmforge data pack -t ch); "
              "COMP_CWORD=4; _lmforge; echo ${COMPREPLY[@]}")
    result = subprocess.run(["bash", "-c", script], capture_output=True, timeout=30)
    assert result.stdout.decode().split() == ["chatml"], result.stderr.decode()
