"""Run every benchmark (or those named) and update tests/bench/RESULTS.md: `make bench`."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

ALL = ["bench_help", "bench_align", "bench_pack", "bench_train", "bench_memory", "bench_ppo", "bench_grpo", "bench_mmlu", "bench_serve", "bench_vlm", "bench_board", "bench_gpu",
       "bench_loss", "bench_pack_scale", "bench_shiftattn", "bench_dpo"]


def main() -> None:
    names = sys.argv[1:] or ALL
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        try:
            importlib.import_module(name).main()
        except SystemExit as exc:  # a benchmark that cannot run here says why
            print(f"{name}: skipped: {exc}", flush=True)
        except Exception as exc:  # keep going; report at the end
            print(f"{name}: FAILED: {exc}", flush=True)
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
