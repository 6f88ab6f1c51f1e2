"""`lmforge ARGS` as one worker of a torchrun job, with a fault that tests/test_fsdp.py asks for:

    torchrun ... tests/fsdp_worker.py FAULT lmforge-args...

FAULT is one of
- `none`: the command as it is;
- `kill-rank1-after-2`: in torchrun's first attempt, the process of rank 1 kills itself (SIGKILL,
  no clean-up) as soon as the sharded checkpoint of step 2 is complete, the way a node is lost;
  a restarted attempt runs the command as it is;
- `rank1-lr=X`: the process of rank 1 runs with `--lr X` (processes that disagree on an option);
- `rank1-cwd=DIR`: the process of rank 1 runs in DIR, so that a relative `-o` names another
  directory there (a node that does not share the output directory).

The faults live here, in the test's launcher, not in lmforge.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    fault, args = sys.argv[1], sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if fault == "kill-rank1-after-2" and rank == 1 and attempt == 0:
        from lmforge.shared.train import sharded

        save = sharded.save_checkpoint

        def save_then_die(trainer, write):
            save(trainer, write)
            if trainer.state.global_step == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        sharded.save_checkpoint = save_then_die
    elif fault.startswith("rank1-lr="):
        if rank == 1:
            args[args.index("--lr") + 1] = fault.split("=", 1)[1]
    elif fault.startswith("rank1-cwd="):
        if rank == 1:
            os.chdir(fault.split("=", 1)[1])
    elif fault not in ("none", "kill-rank1-after-2"):
        raise SystemExit(f"unknown fault {fault}")
    from lmforge.tools.main import main as lmforge

    lmforge(args)


if __name__ == "__main__":
    main()
