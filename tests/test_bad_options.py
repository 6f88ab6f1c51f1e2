"""Bad option values, for every option of every command (from the option declarations): a word
where a number belongs, a value outside a fixed set, a number under an option's minimum. Each
gives exit 2, one line that names the option and points to --help, no traceback, nothing written."""

from __future__ import annotations

import pytest
from conftest import bad

from lmforge.shared.core import catalog


def _cases() -> list[tuple[str, list[str], str]]:
    cases = []
    for command, options in catalog.COMMANDS.items():
        for opt in options:
            if opt.argument:
                continue
            flag = opt.long
            if opt.type in ("int", "float"):
                cases.append((f"{command}:{flag}=word", [*command.split(), flag, "twelve"], flag))
                if opt.min is not None:
                    below = str(int(opt.min) - 1) if opt.type == "int" else str(opt.min - 1.5)
                    cases.append((f"{command}:{flag}<min", [*command.split(), flag, below], flag))
            elif opt.choices:
                cases.append((f"{command}:{flag}=choice", [*command.split(), flag, "no-such-choice"], flag))
    return cases


OPTION_CASES = _cases()


@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_bad_option_value_is_one_clean_line(tmp_path, monkeypatch, case):
    _, args, flag = case
    monkeypatch.chdir(tmp_path)
    line = bad(args)
    assert flag in line or flag.lstrip("-") in line, line
    assert "--help" in line, line
    assert list(tmp_path.iterdir()) == []
