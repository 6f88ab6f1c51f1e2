"""The commands and their options: each command name ("train sft") mapped to the class that
declares its options (lmforge.shared.core.commands). Everything that lists options reads them
from here: tools/_cli.py (Typer), the board's forms, the reference pages, the completion scripts."""

from __future__ import annotations

from typing import Any

from lmforge.shared.core.commands.data import (DataAlign, DataMerge, DataPack, DataShow, DataSplit, DataStats,
                                                DataTemplates)
from lmforge.shared.core.commands.infer import (Board, Chat, Completion, EvalBenchmark, EvalGenerate, EvalPerplexity,
                                                 EvalRM, Serve)
from lmforge.shared.core.commands.model import AdapterMerge, ModelExport, ModelInit, ModelQuantize
from lmforge.shared.core.commands.run import Run
from lmforge.shared.core.commands.train import TrainDPO, TrainGRPO, TrainPPO, TrainPT, TrainRM, TrainSFT
from lmforge.shared.core.options import Opt, Options, options_of

# ----------------------------------------------------------------------------- every command, the root

DEBUG = Opt("debug", type="bool", default=False, flags=("--debug",), help="Show tracebacks (also LMFORGE_DEBUG=1).")
QUIET = Opt("quiet", type="bool", default=False, flags=("--quiet", "-q"), help="No progress or info messages on stderr.")
EVERY_COMMAND = (   # added to each command by tools/_cli.py, with their behaviour
    Opt("config", type="path", default=None, flags=("--config",), panel="Common",
        help="YAML file of option values (keys are option names or flag spellings); flags override it."),
    DEBUG.but(panel="Common"),
    QUIET.but(panel="Common"),
)
ROOT = (   # `lmforge [OPTIONS] COMMAND`
    Opt("version", type="bool", default=False, flags=("--version",), help="Print the version and exit."),
    DEBUG,
    QUIET.but(help="No progress or info on stderr."),
)

CLASSES: dict[str, type[Options]] = {
    "data align": DataAlign,
    "data merge": DataMerge,
    "data split": DataSplit,
    "data show": DataShow,
    "data pack": DataPack,
    "data stats": DataStats,
    "data templates": DataTemplates,
    "model quantize": ModelQuantize,
    "model init": ModelInit,
    "model export": ModelExport,
    "adapter merge": AdapterMerge,
    "train pt": TrainPT,
    "train sft": TrainSFT,
    "train rm": TrainRM,
    "train dpo": TrainDPO,
    "train ppo": TrainPPO,
    "train grpo": TrainGRPO,
    "eval mmlu": EvalBenchmark,
    "eval cmmlu": EvalBenchmark,
    "eval ceval": EvalBenchmark,
    "eval generate": EvalGenerate,
    "eval perplexity": EvalPerplexity,
    "eval rm": EvalRM,
    "run": Run,
    "serve": Serve,
    "chat": Chat,
    "board": Board,
    "completion": Completion,
}
for _name, _cls in CLASSES.items():
    if not _cls.command:   # a class serving several commands (eval mmlu/cmmlu/ceval) keeps the first name
        _cls.command = _name

# Each command's options, in --help order (the board and the docs read this).
COMMANDS: dict[str, tuple[Opt, ...]] = {name: options_of(cls) for name, cls in CLASSES.items()}


def options(command: str) -> tuple[Opt, ...]:
    return COMMANDS[command]


def declaration_of(command: str) -> type[Options]:
    return CLASSES[command]


def defaults(command: str) -> dict[str, Any]:
    """Each option's default as `command` takes it (REQUIRED for those that must be given)."""
    return {o.name: o.default for o in COMMANDS[command]}


def commands_taking(name: str) -> list[str]:
    """Which commands take the option `name`."""
    return [c for c, opts in COMMANDS.items() if any(o.name == name for o in opts)]
