"""`lmforge run JOB`: a job file (a pipeline of lmforge commands), run make-style; or printed as a
job file, shell commands or a Makefile; or a LLaMA-Factory training YAML translated into one."""

from __future__ import annotations

from ._cli import declared


@declared("run")
def run(o) -> None:
    """Run a job file: a pipeline of lmforge commands, make-style (up-to-date steps are skipped)."""
    import sys

    from lmforge.shared.api import jobs

    job = jobs.load(o)
    if o.emit is not None:
        sys.stdout.write(jobs.text(job, o.emit))
        return
    if o.dry_run:
        for step, why in jobs.plan(job, force=o.force):
            verdict = f"runs ({why})" if why is not None else "up to date"
            sys.stdout.write(f"{step.name}: {verdict}\n    {step.command_line()}\n")
        return
    jobs.execute(job, force=o.force)
