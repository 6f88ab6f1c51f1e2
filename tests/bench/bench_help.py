"""`lmforge --help` wall time (goal < 0.25 s), next to `python -c pass` and `git --help`."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from common import LMFORGE, command, record, table


def wall(cmd: list[str], repeat: int = 15) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    rows = []
    python = wall([sys.executable, "-c", "pass"])
    for label, cmd in [("lmforge --help", [LMFORGE, "--help"]),
                       ("lmforge data align --help", [LMFORGE, "data", "align", "--help"]),
                       ("lmforge completion bash", [LMFORGE, "completion", "bash"])]:
        t = wall(cmd)
        rows.append([label, f"{t * 1000:.0f} ms", f"{t / python:.1f}x", "yes" if t < 0.25 else "no"])
    rows.append(["python -c pass (floor)", f"{python * 1000:.0f} ms", "1.0x", ""])
    record("help", "CLI start-up: `--help` latency (goal < 0.25 s)", "python tests/bench/bench_help.py",
           "Median of 15 runs.\n\n" + table(["command", "median wall", "vs bare python", "< 0.25 s"], rows)
           + "\n\n`completion bash` runs once, when the script is installed; pressing Tab runs no Python at "
             "all (the scripts in completions/ hold the whole command tree).")


if __name__ == "__main__":
    main()
