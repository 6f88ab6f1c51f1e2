"""`run`: a job file (a pipeline of lmforge commands), run make-style."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from lmforge.shared.core.errors import BadInput
from lmforge.shared.core.options import REQUIRED, Opt, Options, declaration


@declaration
class Run(Options):
    summary: ClassVar[str] = ("Run a job file: a pipeline of lmforge commands (data, train, adapter merge, eval, "
                              "export) in one YAML file, make-style: a step whose outputs are newer than its inputs "
                              "is skipped.")
    examples: ClassVar[tuple[str, ...]] = (
        "lmforge run job.yaml",
        "lmforge run job.yaml --dry-run",
        "lmforge run --from-llamafactory llama3_lora_sft.yaml --print yaml > job.yaml",
    )

    job: Path = Opt(default=REQUIRED, argument=True,
                    help="The job file (YAML: `steps:`, each a command and its options; see docs/guides/"
                         "job-files.md), or with --from-llamafactory a LLaMA-Factory training YAML.")
    from_llamafactory: bool = Opt(default=False, flags=("--from-llamafactory",),
                                  help="JOB is a LLaMA-Factory training YAML (`llamafactory-cli train`): translate "
                                       "it into a job (align the datasets, pack them, train), each key it cannot "
                                       "map named on stderr, and run that.")
    dry_run: bool = Opt(default=False, flags=("--dry-run", "-n"),
                        help="Print each step's command line and whether it would run (and why); run nothing.")
    emit: str | None = Opt(choices=("yaml", "shell", "make"), default=None, flags=("--print",),
                           help="Print the job instead of running it: as a job file (yaml), as shell commands "
                                "(shell) or as a Makefile (make).")
    force: bool = Opt(default=False, flags=("--force", "-B"), help="Run every step, up to date or not.")

    def check_own(self) -> None:
        if self.dry_run and self.emit is not None:
            raise BadInput("--dry-run and --print both print the job without running it", "choose one")
        if self.force and self.emit is not None:
            raise BadInput("--force reruns steps; --print runs none", "drop --force")
