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


def test_no_option_dataclass_repeats_the_declarations():
    """The use cases take the declared classes themselves: no module of shared/ keeps an options
    dataclass of its own whose defaults would copy the declarations."""
    sources = {p.name: p.read_text() for p in (ROOT / "shared").rglob("*.py")}
    for name, text in sources.items():
        assert "catalog.defaults(" not in text and "_DEFAULTS[" not in text, name
        assert "o.extra" not in text and "extra=extra" not in text, name


def test_every_option_is_a_typed_field_of_its_commands_class():
    import typing

    from lmforge.shared.core.options import Options, options_of

    kinds = {"str": str, "int": int, "float": float, "bool": bool, "path": Path}
    for name, cls in catalog.CLASSES.items():
        assert issubclass(cls, Options) and dataclasses.is_dataclass(cls), name
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for opt in options_of(cls):
            assert opt.name in fields, f"{name}: {opt.name}"
            hint = hints[opt.name]
            base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            inner = typing.get_args(base[0])[0] if typing.get_origin(base[0]) is list else base[0]
            assert inner is kinds[opt.type], f"{name} {opt.name}: {hint} vs {opt.type}"
            if not opt.required:
                field = fields[opt.name]
                default = field.default_factory() if field.default_factory is not dataclasses.MISSING \
                    else field.default
                assert default == opt.default, f"{name} {opt.name}"


def test_a_stage_lists_exactly_the_options_it_takes():
    for option in ("deepspeed", "fsdp", "eval_data", "neftune_alpha", "loraplus_ratio", "shift_attn", "kernels"):
        assert option not in {o.name for o in catalog.options("train grpo")}, option
    for stage in ("train rm", "train dpo"):
        names = {o.name for o in catalog.options(stage)}
        assert "loraplus_ratio" not in names and "neftune_alpha" not in names, stage
        method = next(o for o in catalog.options(stage) if o.name == "method")
        assert "badam" not in method.choices
    assert "pissa" not in next(o for o in catalog.options("train rm") if o.name == "method").choices


def test_the_python_api_checks_like_the_command_line():
    from lmforge.shared.core.commands.train import TrainDPO, TrainSFT
    from lmforge.shared.core.errors import BadInput

    with pytest.raises(BadInput, match="no option 'lrate'"):
        TrainSFT.make(model="m", data="d", output="runs/x", lrate=1e-4)
    assert TrainSFT.make(model="m", data="d", output="runs/x", lr=1e-3).learning_rate == 1e-3   # a flag's spelling
    with pytest.raises(BadInput, match="given twice"):
        TrainSFT.make(model="m", data="d", output="runs/x", lr=1e-3, learning_rate=1e-3)
    with pytest.raises(BadInput, match="finite"):
        TrainSFT.make(model="m", data="d", output="runs/x", learning_rate=float("inf"))
    with pytest.raises(BadInput, match="--method"):
        TrainSFT.make(model="m", data="d", output="runs/x", method="nope")
    with pytest.raises(BadInput, match="applies to --method lora"):
        TrainSFT.make(model="m", data="d", output="runs/x", method="full", lora_rank=4)
    with pytest.raises(BadInput, match="'data' must be given"):
        TrainSFT.make(model="m", output="runs/x")
    o = TrainDPO.make(model="m", data="d", output="runs/x", loss="simpo")
    assert o.strength == 2.0 and o.output == Path("runs/x") and o.accepts() == ("dpo", "rm")


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
