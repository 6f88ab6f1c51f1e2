"""Every option is declared once (lmforge.shared.core.catalog): the commands, the option
dataclasses of shared/ and the tools' source must all agree with the declarations."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import typer

from lmforge.shared.core import catalog
from lmforge.shared.core.options import REQUIRED
from lmforge.tools.main import app

ROOT = Path(__file__).resolve().parent.parent
COMMON = {"config", "debug", "quiet", "help"}
TYPES = {"str": str, "int": int, "float": float, "bool": bool, "path": Path}


def _commands() -> dict[str, object]:
    found: dict[str, object] = {}

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
        else:
            found[" ".join(path)] = cmd

    walk(typer.main.get_command(app), [])
    return found


COMMANDS = _commands()


def test_every_command_is_declared_and_every_declaration_is_a_command():
    assert sorted(COMMANDS) == sorted(catalog.COMMANDS)


@pytest.mark.parametrize("name", sorted(catalog.COMMANDS))
def test_command_options_match_their_declarations(name):
    params = [p for p in COMMANDS[name].params if p.name not in COMMON]
    declared = catalog.options(name)
    assert [p.name for p in params] == [o.name for o in declared]
    for param, opt in zip(params, declared):
        where = f"{name} {opt.long}"
        assert param.required == opt.required, where
        if not opt.required:
            assert param.default == opt.default, where
        annotation = param.type_descriptor.annotation
        if typing.get_origin(annotation) is list:
            assert opt.many, where
            annotation = typing.get_args(annotation)[0]
        else:
            assert not opt.many, where
        if opt.choices and opt.many:   # a list of choices: strings, each checked by a callback
            assert annotation is str, where
        elif opt.choices:
            assert typing.get_origin(annotation) is typing.Literal, where
            assert typing.get_args(annotation) == opt.choices, where
        else:
            assert annotation is TYPES[opt.type], where
        assert (type(param).__name__ == "TyperArgument") == opt.argument, where
        if not opt.argument:
            spellings = [*param.opts, *param.secondary_opts]
            assert opt.long in spellings, where
            for flag in opt.flags:
                assert flag in spellings, where
            assert param.help == opt.help, where
            assert param.rich_help_panel == opt.panel, where


def test_root_and_common_options_match_their_declarations():
    root = typer.main.get_command(app)
    assert [p.name for p in root.params if p.name != "help"] == [o.name for o in catalog.ROOT]
    for name, command in COMMANDS.items():
        common = [p for p in command.params if p.name in COMMON and p.name != "help"]
        assert [p.name for p in common] == [o.name for o in catalog.EVERY_COMMAND], name
        for param, opt in zip(common, catalog.EVERY_COMMAND):
            assert param.help == opt.help and opt.long in param.opts, name


def _dataclass_defaults(cls) -> dict[str, object]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = REQUIRED
    return out


def _option_dataclasses():
    from lmforge.shared.data.align import AlignOptions
    from lmforge.shared.data.pack import PackOptions
    from lmforge.shared.train.methods import MethodOptions
    from lmforge.shared.train.ppo import PPOOptions
    from lmforge.shared.train.training import TrainOptions

    return [(AlignOptions, "data align"), (PackOptions, "data pack"), (MethodOptions, "train sft"),
            (TrainOptions, "train sft"), (PPOOptions, "train ppo")]


def test_option_dataclasses_take_their_defaults_from_the_declarations():
    for cls, command in _option_dataclasses():
        declared = catalog.defaults(command)
        own = _dataclass_defaults(cls)
        # a field the caller must give (the command always does) has no default to drift
        shared = [n for n in own if n in declared and own[n] is not REQUIRED
                  and not (cls.__name__ == "TrainOptions" and n == "method")]  # there: the MethodOptions
        assert len(shared) >= 5, cls
        for name in shared:
            value = own[name]
            assert value == declared[name] or value is declared[name], f"{cls.__name__}.{name}"


def test_no_option_is_declared_outside_the_catalog():
    """The tools build their parameters from the catalog only: no typer.Option/Argument of
    their own (tools/_cli.py turns declarations into Typer parameters and adds --config,
    --debug, --quiet to every command; main.py's root callback has --version)."""
    allowed = {"_cli.py", "main.py"}
    for path in sorted((ROOT / "tools").glob("*.py")):
        if path.name in allowed:
            continue
        text = path.read_text()
        assert not re.search(r"typer\.(Option|Argument)\(", text), path.name
    shared = "\n".join(p.read_text() for p in (ROOT / "shared").rglob("*.py"))
    assert "import typer" not in shared and "from typer" not in shared


@pytest.mark.parametrize("name", sorted(catalog.COMMANDS))
def test_a_config_file_may_set_each_declared_option(name, tmp_path):
    """--config keys are the declared option names: each is accepted, an unknown one refused."""
    import yaml
    from typer.testing import CliRunner

    from lmforge.shared.core.errors import BadInput

    runner = CliRunner()
    config = tmp_path / "c.yaml"
    values = {o.name: (str(o.default) if isinstance(o.default, Path) else o.default)
              for o in catalog.options(name) if not o.required}
    config.write_text(yaml.safe_dump(values))
    result = runner.invoke(app, [*name.split(), "--config", str(config), "--help"])
    assert result.exit_code == 0, (result.output, result.exception)
    config.write_text(yaml.safe_dump({**values, "not_an_option": 1}))
    result = runner.invoke(app, [*name.split(), "--config", str(config), "--help"])
    assert isinstance(result.exception, BadInput) and "not-an-option" in str(result.exception)


def test_each_declaration_knows_which_commands_take_it():
    assert catalog.commands_taking("lora_rank") == ["train pt", "train sft", "train rm", "train dpo", "train ppo",
                                                  "train grpo"]
    assert "data pack" in catalog.commands_taking("cutoff")
