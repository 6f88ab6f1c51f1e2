"""Helpers for the benchmarks: timing commands with their peak memory, machine facts, and
writing a section of tests/bench/RESULTS.md (each benchmark owns one section, replaced on rerun).
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "bench" / "RESULTS.md"
SHARED = Path(os.environ.get("LMFORGE_SHARED", ROOT.parent / "shared")).resolve()
BIN = Path(sys.executable).parent


def lmforge_command(bin_dir: Path = BIN) -> list[str]:
    """How to run lmforge: its console script beside this Python, else the module (pip puts the
    scripts of a system Python's --user or --target installs elsewhere), as tests/conftest.py does."""
    script = bin_dir / "lmforge"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lmforge.tools.main"]


LMFORGE_CMD = lmforge_command()
# the first word of a benchmark's lmforge command; command() expands it to LMFORGE_CMD
LMFORGE = LMFORGE_CMD[0] if len(LMFORGE_CMD) == 1 else "lmforge"
WORK = Path(os.environ.get("LMFORGE_BENCH_DIR", ROOT / ".bench"))


def command(cmd: list) -> list[str]:
    """`cmd` as strings, its first word LMFORGE replaced by the whole lmforge command."""
    words = [str(c) for c in cmd]
    return LMFORGE_CMD + words[1:] if words and words[0] == LMFORGE else words


def measure(cmd: list[str], *, env: dict | None = None, stdin=None, stdout=subprocess.DEVNULL,
            cwd: Path | None = None) -> dict:
    """Run a command; return wall seconds and the peak RSS (MiB) of the process tree's largest member."""
    start = time.perf_counter()
    proc = subprocess.Popen(command(cmd), env={**os.environ, **(env or {})}, stdin=stdin,
                            stdout=stdout, stderr=subprocess.PIPE, cwd=cwd)
    _, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{stderr.decode()[-3000:]}")
    import resource

    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": wall, "peak_mib_so_far": peak_kib / 1024, "stderr": stderr.decode()}


def measure_isolated(cmd: list[str], allow_failure: bool = False, **kwargs) -> dict:
    """Like measure(), but the peak RSS is this command's own (run under a fresh helper process)."""
    helper = ("import os,resource,subprocess,sys,time,json\n"
              "t=time.perf_counter(); p=subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
              "w=time.perf_counter()-t\n"
              "print(json.dumps({'rc':p.returncode,'seconds':w,'peak_mib':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024,"
              "'stderr':p.stderr.decode()[-3000:]}))")
    out = subprocess.run([sys.executable, "-c", helper, *command(cmd)], capture_output=True,
                         env={**os.environ, **(kwargs.get("env") or {})}, cwd=kwargs.get("cwd"))
    import json

    lines = out.stdout.decode().strip().splitlines()
    if not lines:   # the helper itself failed: the command could not start
        raise RuntimeError(f"{' '.join(command(cmd))} could not run:\n{out.stderr.decode()[-3000:]}")
    result = json.loads(lines[-1])
    if result["rc"] != 0 and not allow_failure:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result['rc']}):\n{result['stderr']}")
    return result


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}, {platform.system()}"


def versions(*names: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for n in names:
        try:
            out.append(f"{n} {version(n)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def record(name: str, title: str, command: str, body: str) -> None:
    """Replace (or add) this benchmark's section in RESULTS.md and print it."""
    stamp = datetime.date.today().isoformat()
    section = (f"<!-- bench:{name} -->\n## {title}\n\n"
               f"{stamp} · {machine()} · `{command}`\n\n{body.strip()}\n<!-- /bench:{name} -->\n")
    print(section)
    text = RESULTS.read_text() if RESULTS.exists() else (
        "# Benchmark results\n\nEach section is written by its benchmark (`make bench` runs them all); "
        "figures are side by side with their baseline, measured in the same run.\n\n")
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text)


def shared(relative: str) -> Path | None:
    path = SHARED / relative
    return path if path.exists() else None
