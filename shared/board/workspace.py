"""The board's workspace: every path the browser names is resolved (symlinks followed) and must
stay inside it; a name that does not is refused with one line, as a command refuses bad input."""

from __future__ import annotations

import os
import re
from pathlib import Path

from lmforge.shared.core.errors import BadInput

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
RUN_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,99}$")


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.given = Path(os.path.abspath(os.path.expanduser(root)))   # as typed: it may itself be a link

    def path(self, name: str | Path, what: str = "path") -> Path:
        """NAME (relative to the workspace, or absolute) resolved; refused outside the workspace."""
        text = str(name).strip()
        if not text or "\x00" in text:
            raise BadInput(f"{what}: empty or invalid path", "name a file inside the workspace")
        named = Path(os.path.normpath(self.root / os.path.expanduser(text)))
        resolved = named.resolve()
        if not resolved.is_relative_to(self.root):
            link = self._link_out(named)   # inside by its name, outside through a symbolic link
            if link is not None:
                name, target = str(link[0]), link[1]
                shown = f"{what} {text!r}" if name == os.path.normpath(text) else f"{what} {text!r}: {name!r}"
                raise BadInput(f"{shown} is a symbolic link to {target}, outside the board's workspace "
                               f"{self.root}", "copy the file into the workspace, or start the board with another "
                               "--workspace")
            raise BadInput(f"{what} {text!r} is outside the board's workspace {self.root}",
                           "use a path inside it (or start the board with another --workspace)")
        return resolved

    def _link_out(self, named: Path) -> tuple[Path, Path] | None:
        """The first symbolic link on NAMED's way down from the workspace whose target is outside
        it (that link as the user named it, relative to the workspace, and where it leads)."""
        for base in (self.root, self.given):
            if not named.is_relative_to(base):
                continue
            current = base
            for part in named.relative_to(base).parts:
                current = current / part
                if current.is_symlink() and not current.resolve().is_relative_to(self.root):
                    return current.relative_to(base), current.resolve()
        return None

    def existing(self, name: str | Path, what: str = "path") -> Path:
        path = self.path(name, what)
        if not path.exists():
            raise BadInput(f"{what} {str(name)!r} not found in the workspace {self.root}", "check the name")
        return path

    def relative(self, path: Path) -> str:
        """How command lines name PATH: relative to the workspace (they run there)."""
        name = str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)
        return "./" + name if name.startswith("-") else name

    def model(self, name: str) -> str:
        """A model: a directory inside the workspace (as the commands will name it), or a Hub id."""
        text = name.strip()
        if not text:
            raise BadInput("model: not given", "name a model directory in the workspace or a Hub id")
        candidate = (self.root / text)
        if candidate.exists() or text.startswith(("/", ".", "~")) or not _HUB_ID.match(text):
            return self.relative(self.existing(text, "model"))
        return text   # org/name, not a local path: a Hub id, as the commands take it

    def run_dir(self, run_id: str) -> Path:
        if not RUN_ID.match(run_id or ""):
            raise BadInput(f"run {run_id!r}: not a run name", "pick a run from the list")
        path = self.path(Path("runs") / run_id, "run")
        if not path.is_dir():
            raise BadInput(f"run {run_id!r} not found in {self.root / 'runs'}", "pick a run from the list")
        return path

    def files(self, limit: int = 500) -> tuple[list[str], list[str]]:
        """Data files and model directories in the workspace (not under runs/), for the pickers."""
        data: list[str] = []
        models: list[str] = []
        suffixes = {".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt"}
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root)
            if rel.parts and (rel.parts[0] in ("runs",) or any(p.startswith(".") for p in rel.parts)):
                continue
            if not path.resolve().is_relative_to(self.root):
                continue
            if path.is_dir() and (path / "config.json").exists():
                models.append(str(rel))
            elif path.is_file() and path.suffix in suffixes and not (path.parent / "config.json").exists():
                data.append(str(rel))
            if len(data) + len(models) >= limit:
                break
        return data, models
