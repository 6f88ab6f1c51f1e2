"""`lmforge run` as functions: a job file (or a translated LLaMA-Factory YAML) run make-style.

    from lmforge.shared import api

    ran = api.jobs.run(job="job.yaml")          # the names of the steps that ran

Each step runs in this process through the Python API (api.data.pack(options), api.train.sft(...)):
the libraries load once for the whole job instead of once per step, and each step's options are
the object the job file was checked with. A step that fails stops the job; its error names the
step. What each command writes is written atomically, so a stopped job leaves no half-made output
and the next run starts again at that step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmforge.shared.api._options import options
from lmforge.shared.core import jobs, log
from lmforge.shared.core.commands.run import Run
from lmforge.shared.core.errors import BadInput, LmforgeError


def load(o: Run) -> jobs.Job:
    """The job `o.job` describes: a job file, or the translation of a LLaMA-Factory YAML."""
    if o.from_llamafactory:
        from lmforge.shared.api.llamafactory import translate

        return translate(Path(o.job))
    return jobs.load(Path(o.job))


def text(job: jobs.Job, kind: str) -> str:
    """The job as a job file (yaml), shell commands (shell) or a Makefile (make)."""
    return {"yaml": jobs.as_yaml, "shell": jobs.as_shell, "make": jobs.as_makefile}[kind](job)


def plan(job: jobs.Job, force: bool = False) -> list[tuple[jobs.Step, str | None]]:
    """Each step with why it would run (None: up to date), as `--dry-run` prints them."""
    recorded, out = jobs.read_state(job), []
    remade: set[str] = set()
    for step in job.steps:
        why = jobs.reason(step, job, remade, recorded, force)
        if why is not None:
            remade.add(step.name)
        out.append((step, why))
    return out


def run(o: Run | None = None, **values: Any) -> list[str]:
    """Run the job make-style; returns the names of the steps that ran."""
    o = options(Run, o, values)
    return execute(load(o), force=o.force)


def execute(job: jobs.Job, force: bool = False) -> list[str]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise BadInput("lmforge run runs a job in one process, not under torchrun",
                       "run `lmforge run JOB --print shell` and launch its train line with torchrun")
    recorded, ran = jobs.read_state(job), []
    remade: set[str] = set()
    total = len(job.steps)
    for number, step in enumerate(job.steps, 1):
        why = jobs.reason(step, job, remade, recorded, force)
        if why is None:
            log.info(f"run: [{number}/{total}] {step.name}: up to date")
            continue
        log.info(f"run: [{number}/{total}] {step.name}: runs ({why})\n$ {step.command_line()}")
        for folder in step.folders():
            os.makedirs(folder, exist_ok=True)
        _run_step(step)
        remade.add(step.name)
        ran.append(step.name)
        recorded[step.name] = step.command_line()
        if not jobs.write_state(job, recorded):
            log.warn(f"cannot write {jobs.state_path(job)}: a step whose options change will not be rerun "
                     "by itself (use --force)")
    log.info(f"run: {len(ran)} of {total} steps ran" + ("" if ran else " (all up to date)"))
    return ran


def _call(step: jobs.Step) -> Any:
    from lmforge.shared import api

    group, _, name = step.command.partition(" ")
    module = {"data": api.data, "model": api.model, "adapter": api.adapter, "train": api.train,
              "eval": api.eval}[group]
    return getattr(module, name)(step.options)


def _run_step(step: jobs.Step) -> None:
    import sys

    if step.command.startswith(("train ", "model ", "adapter ", "eval ")):
        log.quiet_libraries()   # before torch loads, as the commands do
    try:
        with log.stdout_guard():
            result = _call(step)
    except LmforgeError as exc:
        try:
            renamed = type(exc)(f"step '{step.name}' ({step.command}): {exc.message}", exc.hint)
        except TypeError:   # an error type of another shape: its own words
            raise exc from None
        raise renamed from exc
    except Exception:
        print(f"run: step '{step.name}' ({step.command}) failed", file=sys.stderr, flush=True)
        raise
    finally:
        _free_memory()
    if step.stdout:
        _keep(Path(step.stdout), result)
    elif isinstance(result, dict):
        figures = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        log.info(f"{step.command}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in figures.items()))


def _keep(path: Path, result: Any) -> None:
    """The command's --json report, written whole (a temporary sibling renamed into place)."""
    from lmforge.shared.core.rundir import temp_sibling

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        tmp.write_text(json.dumps(result, ensure_ascii=False, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _free_memory() -> None:
    """What one step loaded is not kept for the next: the next may need the whole GPU."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
