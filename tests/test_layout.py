"""The layout of lmforge.shared: subpackages along the pipeline, each importing only those before it.

    core  <- modeldir  <- data  <- model  <- train  <- api
                                          \\ <- infer  <-/

core is the foundation and imports no other subpackage; data builds on core; model on core and
data; train and infer on core, data and model, but infer never on train (inference does not pull
in training code). Nothing in shared imports the command-line layer (lmforge.tools). Every module
lives in a subpackage. Imports are read from the source with ast, including those inside functions
(the lazy imports that keep start-up fast) and `if TYPE_CHECKING:` blocks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lmforge.shared

PACKAGE = "lmforge.shared"
SHARED = Path(lmforge.shared.__file__).resolve().parent

# subpackage -> the other subpackages it may import
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "modeldir": {"core"},   # reading and writing model directories: every layer above reads models through it
    "data": {"core", "modeldir"},
    "model": {"core", "modeldir", "data"},
    "train": {"core", "modeldir", "data", "model"},
    "infer": {"core", "modeldir", "data", "model"},
    "board": {"core", "modeldir", "data", "model", "infer"},   # the web board runs the commands, never train
    "api": {"core", "modeldir", "data", "model", "train", "infer"},   # the Python API: every use case
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module under shared/."""
    out = {}
    for path in sorted(SHARED.rglob("*.py")):
        parts = list(path.relative_to(SHARED).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join([PACKAGE, *parts])] = path
    return out


def _imports(module: str, path: Path, modules: set[str]) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of everything the module imports, at any depth of its code.

    `from X import Y` yields X, and X.Y too where that is a module (`from lmforge.shared import
    core`); `from lmforge.shared import __version__` is an import of the package root only."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names
                      if f"{target}.{alias.name}" in modules]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.append((node.lineno, node.args[0].value))
    return found


def _subpackage(dotted: str) -> str | None:
    """The lmforge.shared subpackage a dotted name falls in (None: outside, or the package itself)."""
    parts = dotted.split(".")
    if parts[:2] != PACKAGE.split(".") or len(parts) < 3:
        return None
    return parts[2]


def test_shared_holds_only_subpackages():
    top = sorted(p.name for p in SHARED.iterdir() if p.suffix == ".py" and p.name != "__init__.py")
    assert top == [], f"modules at the top of shared/ (put them in a subpackage): {top}"
    packages = sorted(p.name for p in SHARED.iterdir() if (p / "__init__.py").is_file())
    assert sorted(ALLOWED) == packages, "a subpackage was added or removed: give it its place in ALLOWED"


def test_package_root_imports_nothing_of_its_own():
    """Every module imports lmforge.shared (its __init__) first: it must stay free of subpackages."""
    init = SHARED / "__init__.py"
    mine = [f"line {line}: {name}" for line, name in _imports(PACKAGE, init, set(_modules()))
            if name.startswith("lmforge.")]
    assert not mine, f"shared/__init__.py imports {mine}"


def test_import_graph_follows_the_layers():
    modules = _modules()
    assert len(modules) > 20, f"found only {len(modules)} modules under {SHARED}"
    violations = []
    for module, path in modules.items():
        layer = _subpackage(module)
        where = path.relative_to(SHARED.parent)
        for line, target in _imports(module, path, set(modules)):
            if target == "lmforge.tools" or target.startswith("lmforge.tools."):
                violations.append(f"{where}:{line}: imports {target} (shared never imports the CLI layer)")
                continue
            other = _subpackage(target)
            if layer is None or other is None or other == layer:
                continue
            if other not in ALLOWED[layer]:
                allowed = ", ".join(sorted(ALLOWED[layer])) or "no other subpackage"
                violations.append(f"{where}:{line}: {layer} imports {target} ({layer} may import {allowed})")
    assert not violations, "layering broken:\n" + "\n".join(sorted(set(violations)))


def test_the_import_reader_sees_every_form(tmp_path):
    """The checks above are only as good as _imports: it must see lazy, relative and `from` imports."""
    source = tmp_path / "m.py"
    source.write_text(
        "import lmforge.shared.core.log\n"
        "from lmforge.shared import train\n"
        "from ..model import models\n"
        "def lazy():\n"
        "    from lmforge.tools import main\n"
        "    import importlib\n"
        "    importlib.import_module('lmforge.shared.infer.mcq')\n"
    )
    got = {name for _, name in _imports("lmforge.shared.data.m", source, set(_modules()))}
    assert {"lmforge.shared.core.log", "lmforge.shared.train", "lmforge.shared.model.models",
            "lmforge.tools", "lmforge.shared.infer.mcq"} <= got
    assert {_subpackage(n) for n in got} >= {"core", "train", "model", "infer"}


def test_pyproject_lists_every_package_and_only_those_git_tracks():
    """A package listed but absent from a clean clone stops `pip install` (setuptools: "package
    directory does not exist"); one present but not listed is missing from the installed wheel."""
    import subprocess
    import tomllib

    root = SHARED.parent
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(config["packages"])
    tracked = subprocess.run(["git", "ls-files", "shared", "tools"], cwd=root, capture_output=True, text=True)
    if tracked.returncode != 0 or not tracked.stdout:
        import pytest

        pytest.skip("not a git checkout")
    dirs = {str(Path(f).parent) for f in tracked.stdout.split() if Path(f).name == "__init__.py"}
    dirs |= {str(Path(f).parent) for f in tracked.stdout.split() if Path(f).parent.name in ("static", "locales")}
    names = {"lmforge." + d.replace("/", ".") for d in dirs}
    assert listed == names, f"pyproject lists {sorted(listed - names)} that git lacks; git has {sorted(names - listed)} unlisted"
