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
    import yaml

    path = Path(path)
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):   # /dev/zero, a terminal: no option file
                raise BadInput(f"config file {path}: a device, not a file", "give a YAML file of option values")
            data = f.read(_MAX_BYTES + 1)   # never more: a huge file or an endless pipe must not fill the memory
        if len(data) > _MAX_BYTES:
            raise BadInput(f"config file {path}: more than {_MAX_BYTES:,} bytes, more than an option file needs",
                           "give a file of `option-name: value` lines")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise BadInput(f"config file {path} not found", "check the path given to --config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"config file {path} cannot be read ({exc})") from None
    try:
        # aliases (*name) refused: a few hundred bytes of nested aliases expand to gigabytes
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                mark = event.start_mark
                raise BadInput(f"config file {path} line {mark.line + 1}: YAML aliases (*{event.anchor}) "
                               "are not allowed", "write the values out")
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise BadInput(f"config file {path}{where}: {problem}", "fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadInput(f"config file {path}: expected a mapping of option names to values, "
                       f"found {type(data).__name__}", "write `option-name: value` lines")
    return {option_key(str(k)): v for k, v in data.items()}
