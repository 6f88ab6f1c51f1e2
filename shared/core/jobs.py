"""Job files: a pipeline of lmforge commands in one YAML file, which `lmforge run` runs make-style.

    steps:
      - name: align                       # optional (default: the command, numbered when repeated)
        command: data align
        options: {inputs: [raw/tasks.jsonl], output: work/tasks.arrow, max-samples: 200}
      - command: eval perplexity
        options: {model: base, adapter: work/sft, data: work/sft.packed}
        stdout: work/perplexity.json      # what the command prints (its --json report), kept

Option keys are the command's option names or any of their flag spellings, as in `--config`
files; values are what the flag takes. Relative paths are read from the directory `lmforge run`
runs in, as the commands would read them there.

This module reads and checks a job: every step's options are made as the command makes them
(`Options.make`), and the files between steps follow from the options each command reads and
writes (FILES). It orders the steps, says which are out of date and why, and writes the job back
as YAML, as shell text or as a Makefile (shared/core/recipes.py, as the board does). Running the
steps is shared/api/jobs.py's.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.shared.core import catalog, recipes
from lmforge.shared.core.config import option_key, read_mapping
from lmforge.shared.core.errors import BadInput, close_names
from lmforge.shared.core.options import Opt, Options, options_of, spelled
from lmforge.shared.core.rundir import RECORD

# What each option that names a file is to a step: read data (IN), a model that may also be a Hub
# id (MODEL), GRPO's rewards (REWARD: a model directory, FILE.py:function, or a built-in name),
# a dataset_info.json with its entries' files (INFO), or what the step writes: a file (FILE), a
# directory finished by its lmforge.json record (DIR), or `data split`'s train.arrow and val.arrow
# (SPLIT). tests/test_jobs.py checks that every path option of these commands is listed.
IN, MODEL, REWARD, INFO, FILE, DIR, SPLIT = "in", "model", "reward", "info", "file", "dir", "split"
WRITES = (FILE, DIR, SPLIT)
_TRAIN = {"model": MODEL, "data": IN, "eval_data": IN, "output": DIR}
_EVAL = {"model": MODEL, "adapter": MODEL, "data": IN}
FILES: dict[str, dict[str, str]] = {
    "data align": {"inputs": IN, "dataset_info": INFO, "output": FILE},
    "data merge": {"inputs": IN, "output": FILE},
    "data split": {"input": IN, "output": SPLIT},
    "data pack": {"model": MODEL, "input": IN, "output": FILE},
    "data stats": {"input": IN},
    "model init": {"tokenizer": MODEL, "train_tokenizer": IN, "output": DIR},
    "model quantize": {"model": MODEL, "calib": IN, "eval_data": IN, "output": DIR},
    "model export": {"model": MODEL, "adapter": MODEL, "output": FILE},
    "adapter merge": {"base": MODEL, "adapters": MODEL, "output": DIR},
    "train pt": _TRAIN, "train sft": _TRAIN, "train rm": _TRAIN, "train dpo": _TRAIN,
    "train ppo": {"model": MODEL, "data": IN, "output": DIR, "reward": MODEL, "sft": MODEL},
    "train grpo": {"model": MODEL, "data": IN, "output": DIR, "reward": REWARD},
    "eval mmlu": {**_EVAL, "mapping": IN, "predictions": FILE},
    "eval cmmlu": {**_EVAL, "mapping": IN, "predictions": FILE},
    "eval ceval": {**_EVAL, "mapping": IN, "predictions": FILE},
    "eval generate": {**_EVAL, "output": FILE},
    "eval perplexity": _EVAL,
    "eval rm": {"model": MODEL, "reward": MODEL, "data": IN},
}
PRINTS = ("data stats", "eval mmlu", "eval cmmlu", "eval ceval", "eval generate", "eval perplexity", "eval rm")
STEP_KEYS = ("name", "command", "options", "stdout")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Step:
    name: str
    command: str
    given: dict[str, Any]              # the options as the job file sets them (option names)
    options: Options                   # as the command runs them (checked)
    stdout: str | None = None
    inputs: list[tuple[str, str | None]] = field(default_factory=list)   # (path, the step that makes it)
    outputs: list[str] = field(default_factory=list)   # the files it makes (the first: its Makefile target)
    claims: list[str] = field(default_factory=list)    # the paths it writes (files or directories)
    needs: list[str] = field(default_factory=list)     # the steps that make its inputs

    def values(self) -> dict[str, Any]:
        """The options the command line names: the job's, and those the job sets itself."""
        return {**self.given, **{k: getattr(self.options, k) for k in wired(self.command, self.stdout, self.given)}}

    def argv(self) -> list[str]:
        return recipes.argv(self.command, self.values(), always=set(self.values()))

    def command_line(self) -> str:
        return recipes.command_line({"argv": self.argv(), "redirect": self.stdout})

    def folders(self) -> list[str]:
        """The directories the step writes into (the commands write only into existing ones; a
        job makes its own)."""
        return list(dict.fromkeys(p for p in (os.path.dirname(os.path.normpath(c)) for c in self.claims) if p))


@dataclass
class Job:
    path: Path
    steps: list[Step]                  # in the order they run: each after the steps it needs
    notes: list[str] = field(default_factory=list)    # what a translation left out (comments of --print yaml)

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def sinks(self) -> list[Step]:
        """The steps no other step needs: what the job is for."""
        needed = {n for s in self.steps for n in s.needs}
        return [s for s in self.steps if s.name not in needed]


def wired(command: str, stdout: str | None, given: dict[str, Any]) -> tuple[str, ...]:
    """The options a job sets itself, unless the step sets them: a step replaces what it made
    before (the job owns its outputs, as a Makefile's recipes do) unless it resumes, and a kept
    report is the command's JSON."""
    names = {o.name for o in catalog.COMMANDS[command]} - set(given)
    on = {"overwrite": not given.get("resume"), "json_out": stdout is not None}
    return tuple(n for n in ("overwrite", "json_out") if on[n] and n in names)


# ----------------------------------------------------------------------------- reading a job


def load(path: Path) -> Job:
    data = read_mapping(path, "job file", "check the path given to `lmforge run`",
                        "write `steps:`, a list of {command: ..., options: {...}}")
    return make(path, data)


def make(path: Path, data: dict, notes: list[str] | None = None) -> Job:
    """A job from its YAML mapping, checked whole before anything runs: each step's options, the
    files between the steps, and their order. Anything wrong is one line naming the step."""
    where = str(path)
    unknown = sorted(str(k) for k in data if k != "steps")
    if unknown:
        raise BadInput(f"job file {where}: unknown key '{unknown[0]}'", "a job file holds `steps:` (a list)")
    raw = data.get("steps")
    if not isinstance(raw, list) or not raw:
        raise BadInput(f"job file {where}: no steps", "write `steps:`, a list of {command: ..., options: {...}}")
    steps: list[Step] = []
    seen: dict[str, int] = {}
    for number, entry in enumerate(raw, 1):
        steps.append(_step(where, number, entry, seen, {s.name for s in steps}))
    _connect(where, steps)
    return Job(path, _ordered(where, steps), notes or [])


def _step(where: str, number: int, entry: Any, seen: dict[str, int], names: set[str]) -> Step:
    label = f"job file {where}: step {number}"
    if isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry["name"].strip():
        label = f"job file {where}: step '{entry['name'].strip()}'"
    if not isinstance(entry, dict):
        raise BadInput(f"{label}: expected a mapping (command: ..., options: {{...}}), found {type(entry).__name__}")
    extra = sorted(str(k) for k in entry if k not in STEP_KEYS)
    if extra:
        raise BadInput(f"{label}: unknown key '{extra[0]}'", f"a step has {', '.join(STEP_KEYS)}; "
                       "options go under `options:`")
    command = entry.get("command")
    if not isinstance(command, str) or not command.strip():
        raise BadInput(f"{label}: no command", "give `command:`, e.g. `command: train sft`")
    command = " ".join(command.split())
    if command.startswith("lmforge "):
        command = command[len("lmforge "):]
    name = entry.get("name")
    if name is None:
        seen[command] = seen.get(command, 0) + 1
        name = command if seen[command] == 1 else f"{command} {seen[command]}"
    if not isinstance(name, str) or not name.strip():
        raise BadInput(f"{label}: `name` must be a non-empty string")
    name = name.strip()
    label = f"job file {where}: step '{name}'"
    if name in names:
        raise BadInput(f"{label}: two steps have this name", "name each step once")
    if command not in FILES:
        hint = close_names(command, sorted(FILES))
        if command in catalog.COMMANDS:
            hint = "a job runs commands that make files: " + ", ".join(sorted(FILES))
        raise BadInput(f"{label}: '{command}' is not a command a job can run", hint)
    stdout = entry.get("stdout")
    if stdout is not None and (not isinstance(stdout, str) or not stdout.strip()):
        raise BadInput(f"{label}: `stdout` must be a file name")
    if stdout is not None and command not in PRINTS:
        raise BadInput(f"{label}: {command} prints no result to keep", "drop `stdout:`; the step's -o is its output")
    options = entry.get("options") or {}
    if not isinstance(options, dict):
        raise BadInput(f"{label}: `options` must be a mapping of option names to values")
    cls = catalog.declaration_of(command)
    try:
        keyed: dict[str, Any] = {}
        for key, value in options.items():   # `--lr` and `lr` are one key, as in --config files
            if option_key(str(key)) in keyed:
                raise BadInput(f"option '{option_key(str(key))}' is given twice (as '{key}' too)", "keep one of them")
            keyed[option_key(str(key))] = value
        given = typed(cls, spelled(cls, keyed))
        made = cls.make(**given, **{k: True for k in wired(command, stdout, given)})
    except BadInput as exc:
        raise BadInput(f"{label} ({command}): {exc.message}", exc.hint) from None
    return Step(name, command, given, made, stdout.strip() if stdout else None)


def typed(cls: type[Options], values: dict[str, Any]) -> dict[str, Any]:
    """YAML values as the options' types (a number written `5e-5` is a string to YAML; one value
    for a repeatable option is a list of one), each checked as the command line checks it."""
    opts = {o.name: o for o in options_of(cls)}
    out = {}
    for name, value in values.items():
        opt = opts.get(name)
        if opt is None or value is None:
            out[name] = value
            continue
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not opt.many:
            raise BadInput(f"{opt.long}: one value, not a list")
        converted = [_one(opt, item) for item in items]
        out[name] = converted if opt.many else converted[0]
    return out


def _one(opt: Opt, value: Any) -> Any:
    if isinstance(value, (dict, list)):
        raise BadInput(f"{opt.long}: expected a {opt.type}, found a {type(value).__name__}")
    if opt.type == "bool":
        if not isinstance(value, bool):
            raise BadInput(f"{opt.long} {value!r}: expected true or false")
        return value
    if opt.type == "float":
        try:
            return opt.number(value)
        except ValueError as exc:
            raise BadInput(f"{opt.long} {exc}") from None
    if opt.type == "int":
        if isinstance(value, bool) or not re.fullmatch(r"[-+]?\d+", str(value).strip()):
            raise BadInput(f"{opt.long} {value!r}: expected a whole number")
        return int(str(value).strip())
    if isinstance(value, bool):   # `--lora-target: true` would become "True"
        raise BadInput(f"{opt.long} {value!r}: expected a {'path' if opt.type == 'path' else 'text'}")
    return str(value)


# ----------------------------------------------------------------------------- files between steps


def place(path: str) -> str:
    """A path as the steps are matched by it: absolute, normalised, symbolic links kept."""
    return os.path.normpath(os.path.join(os.getcwd(), os.path.expanduser(str(path))))


def _values(step: Step, name: str) -> list[str]:
    value = getattr(step.options, name, None)
    if value is None or value == "":
        return []
    return [str(v) for v in (value if isinstance(value, list) else [value]) if str(v) != ""]


def _files(where: str, step: Step) -> list[tuple[str, str, str]]:
    """(role, path, option) of every file option the step sets; writes checked."""
    label = f"job file {where}: step '{step.name}' ({step.command})"
    found = []
    for name, role in FILES[step.command].items():
        values = _values(step, name)
        if "-" in values:
            raise BadInput(f"{label}: reads stdin ('-')", "a job step reads files: give the path")
        if role in WRITES and not values and name == "output" and step.command in ("data align", "data merge",
                                                                                 "data pack"):
            raise BadInput(f"{label}: no output", "give `output:` (where the step writes its data)")
        found += [(role, v, name) for v in values]
    if step.stdout:
        found.append((FILE, step.stdout, "stdout"))
    return found


def _connect(where: str, steps: list[Step]) -> None:
    """Each step's inputs, outputs and the steps that make its inputs; refuses two steps writing
    one file, a data file that no step makes and that does not exist."""
    owner: dict[str, tuple[Step, str]] = {}   # a place a step writes -> (step, "file" | "dir")
    for step in steps:
        for role, path, _ in _files(where, step):
            if role not in WRITES:
                continue
            if role == FILE:
                step.outputs.append(path)
            elif role == DIR:
                step.outputs.append(os.path.join(path, RECORD))
            else:
                step.outputs += [os.path.join(path, "train.arrow"), os.path.join(path, "val.arrow")]
            step.claims.append(path)
            key = place(path)
            if key in owner:
                raise BadInput(f"job file {where}: step '{step.name}' writes {path}, which step "
                               f"'{owner[key][0].name}' writes too", "give each step its own output")
            owner[key] = (step, "file" if role == FILE else "dir")
    for step in steps:
        label = f"job file {where}: step '{step.name}' ({step.command})"
        for role, path, name in _files(where, step):
            if role in WRITES:
                continue
            for path in _read_paths(role, path, step):
                maker = _maker(owner, place(path))
                flag = "--" + name.replace("_", "-")
                if maker is not None:
                    if maker.name not in step.needs:
                        step.needs.append(maker.name)
                elif not os.path.exists(path) and not (role in (MODEL, REWARD) and _hub_id(path, owner)):
                    raise BadInput(f"{label}: reads {path} ({flag}), which no step makes and which does not exist",
                                   "add the step that makes it, or fix the path")
                step.inputs.append((path, maker.name if maker is not None else None))


def _read_paths(role: str, path: str, step: Step) -> list[str]:
    """The files behind one value of an input option."""
    if role == REWARD:   # FILE.py:function, a reward model's directory, or a built-in reward's name
        match = re.match(r"^(?P<file>.+\.py):\w+$", path)
        if match:
            return [match.group("file")]
        return [path] if ("/" in path or os.path.exists(path)) and not path.startswith(("cmd:", "regex:")) else []
    if role == INFO:   # the dataset_info.json and the files of the entries the step aligns
        info = Path(path) / "dataset_info.json" if os.path.isdir(path) else Path(path)
        out = [str(info)]
        try:
            import json

            entries = json.loads(info.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return out   # `data align` says what is wrong with it
        for name in _values(step, "name"):
            entry = entries.get(name) if isinstance(entries, dict) else None
            if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
                out.append(str(info.parent / entry["file_name"]))
        return out
    return [path]


def _maker(owner: dict[str, tuple[Any, str]], key: str) -> Any:
    """The step that writes `key`: its file, or a directory holding it."""
    if key in owner:
        return owner[key][0]
    for place_, (step, kind) in owner.items():
        if kind == "dir" and key.startswith(place_ + os.sep):
            return step
    return None


def _hub_id(path: str, owner: dict) -> bool:
    """Whether a model that is no local path reads as a Hub id (org/name): not when its first part
    is a local directory or a directory the job writes into (then it is a mistyped path)."""
    if not _HUB_ID.match(path) or ".." in path:
        return False
    top = place(path.split("/")[0])
    return not os.path.exists(top) and not any(p.startswith(top + os.sep) for p in owner)


def _ordered(where: str, steps: list[Step]) -> list[Step]:
    """The steps, each after those it needs (file order otherwise); a cycle is refused."""
    done: list[Step] = []
    left = list(steps)
    while left:
        ready = next((s for s in left if all(n in {d.name for d in done} for n in s.needs)), None)
        if ready is None:
            cycle = _cycle({s.name: s for s in left}, left[0].name)
            raise BadInput(f"job file {where}: step '{cycle[0]}' depends on itself: {' -> '.join(cycle)}",
                           "a step cannot read what it or a later step in its chain writes")
        done.append(ready)
        left.remove(ready)
    return done


def _cycle(steps: dict[str, Step], start: str) -> list[str]:
    path, name = [start], start
    while True:
        name = next(n for n in steps[name].needs if n in steps)
        if name in path:
            return path[path.index(name):] + [name]
        path.append(name)


# ----------------------------------------------------------------------------- out of date?


def mtime(path: str) -> float | None:
    """When a file last changed; for a directory, its newest file (a model directory); None when
    it does not exist (or is a Hub id)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    if not os.path.isdir(path):
        return stat.st_mtime
    newest = stat.st_mtime
    for count, (root, _, names) in enumerate(os.walk(path)):
        for name in names:
            try:
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
            except OSError:
                continue
        if count > 1000:   # a huge tree: what was seen is enough to notice a changed model
            break
    return newest


def reason(step: Step, job: Job, remade: set[str], recorded: dict[str, str], force: bool) -> str | None:
    """Why `step` must run, or None when it is up to date: all its outputs exist, none is older
    than an input, no step it needs was remade in this run, and its command line is the one it
    last ran with (when that is recorded)."""
    if force:
        return "--force"
    if not step.outputs:
        return "it makes no file"
    for name in step.needs:
        if name in remade:
            return f"step '{name}' is remade"
    times = [mtime(p) for p in step.outputs]
    for path, time in zip(step.outputs, times):
        if time is None:
            return f"{path} does not exist"
    oldest = min(t for t in times if t is not None)
    for path, maker in step.inputs:
        newest = max((mtime(o) or 0.0) for o in job.step(maker).outputs) if maker is not None else mtime(path)
        if newest is not None and newest > oldest:
            return f"{path} is newer than {step.outputs[0]}"
    before = recorded.get(step.name)
    if before is not None and before != step.command_line():
        return "its options changed since it last ran"
    return None


def state_path(job: Job) -> Path:
    """Where the command lines the job's steps last ran with are kept, beside the job file."""
    return job.path.parent / f".{job.path.name}.lmforge-run.json"


def read_state(job: Job) -> dict[str, str]:
    import json

    try:
        state = json.loads(state_path(job).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict) or state.get("cwd") != os.getcwd() or not isinstance(state.get("steps"), dict):
        return {}
    return {str(k): str(v) for k, v in state["steps"].items()}


def write_state(job: Job, recorded: dict[str, str]) -> bool:
    from lmforge.shared.core.rundir import write_json

    try:
        write_json(state_path(job), {"cwd": os.getcwd(), "steps": recorded})
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------- the job as text


def as_yaml(job: Job) -> str:
    """The job file (a translated one, to keep and edit)."""
    import yaml

    steps = []
    for step in job.steps:
        entry: dict[str, Any] = {"name": step.name, "command": step.command,
                                 "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in step.given.items()}}
        if step.stdout:
            entry["stdout"] = step.stdout
        steps.append(entry)
    head = [f"# lmforge job (`lmforge run {job.path.name}`); paths are read from the directory it runs in"]
    head += [f"# {note}" for note in job.notes]
    body = yaml.safe_dump({"steps": steps}, sort_keys=False, allow_unicode=True, width=110)
    return "\n".join(head) + "\n" + body


def _recipe(job: Job, step: Step) -> dict[str, Any]:
    deps = [job.step(n).outputs[0] for n in step.needs]   # a step that is needed makes a file
    deps += [p for p, maker in step.inputs if maker is None and os.path.exists(p)]
    return {"name": step.name, "argv": step.argv(), "redirect": step.stdout, "mkdir": step.folders(),
            "target": step.outputs[0] if step.outputs else None, "deps": list(dict.fromkeys(deps))}


def as_shell(job: Job) -> str:
    """The job as shell text: every step, in order, each after the one before succeeded."""
    head = f"# lmforge job {job.path} as shell commands (run them in {os.getcwd()})\n"
    return head + recipes.shell([_recipe(job, s) for s in job.steps]) + "\n"


def as_makefile(job: Job) -> str:
    """The job as a Makefile: `make` remakes what is out of date, as `lmforge run` does."""
    header = f"lmforge job {job.path} as a Makefile: run `make` in {os.getcwd()}"
    return recipes.makefile([_recipe(job, s) for s in job.steps], header,
                            goals=[s.outputs[0] if s.outputs else recipes.phony(s.name) for s in job.sinks()]) + "\n"
