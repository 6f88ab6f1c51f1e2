"""`--config FILE.yaml`: option values from a YAML file. Flags on the command line win.

Keys are option names, with dashes or underscores (`lora-rank` or `lora_rank`); values are what
the flag would take (a list for options that repeat or take several values).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lmforge.shared.core.errors import BadInput


_MAX_BYTES = 1 << 20


def option_key(name: str) -> str:
    return name.strip().lstrip("-").replace("-", "_")


def load_config(path: str | Path) -> dict[str, object]:
    data = read_mapping(path)
    return {option_key(str(k)): v for k, v in data.items()}


def read_mapping(path: str | Path, what: str = "config file", hint: str = "check the path given to --config",
                 shape: str = "write `option-name: value` lines") -> dict:
    """A YAML file holding a mapping, read safely: at most 1 MiB, no devices, no aliases. `what`
    names the file in errors, `hint` says what to do when it is missing, `shape` what it should hold."""
    import yaml

    path = Path(path)
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):   # /dev/zero, a terminal: no option file
                raise BadInput(f"{what} {path}: a device, not a file", shape)
            data = f.read(_MAX_BYTES + 1)   # never more: a huge file or an endless pipe must not fill the memory
        if len(data) > _MAX_BYTES:
            raise BadInput(f"{what} {path}: more than {_MAX_BYTES:,} bytes, more than an option file needs",
                           shape)
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise BadInput(f"{what} {path} not found", hint) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{what} {path} cannot be read ({exc})") from None
    try:
        # aliases (*name) refused: a few hundred bytes of nested aliases expand to gigabytes
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                mark = event.start_mark
                raise BadInput(f"{what} {path} line {mark.line + 1}: YAML aliases (*{event.anchor}) "
                               "are not allowed", "write the values out")
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise BadInput(f"{what} {path}{where}: {problem}", "fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadInput(f"{what} {path}: expected a mapping, found {type(data).__name__}", shape)
    return data
