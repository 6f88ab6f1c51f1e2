"""`make gpu-wheels` (here, with PyPI) and `make gpu-check` (on a CUDA machine with no network).

    python tests/gpu_check.py wheels     # fill .whl/: the missing packages' wheels + reference data
    python tests/gpu_check.py check      # install what is missing, run `pytest -m gpu` and bench_gpu

The GPU machine this is sized for has Python 3.12, torch, transformers, peft, accelerate,
pyarrow, typer, rich, ... but not trl, datasets, bitsandbytes, fastapi/uvicorn/pydantic, openai,
deepspeed, vLLM or flash-attn, and no network. So `wheels` downloads, for CPython 3.12 on
manylinux x86-64, exactly the missing pure or binary wheels (no dependencies resolved: each is
named, at the version in .ci/constraints.txt), and copies the few reference files the tests and
the benchmark read (stories260K, the SmolLM2 tokenizer and config, alpaca_en_demo) into
.whl/shared/, checking the 64 MiB that may travel with the tree. `check` installs only the wheels
whose package is not installed already (`--no-deps --target`, onto PYTHONPATH, so the machine's
own torch/transformers pins stay), makes lmforge importable without installing its dependencies,
and runs the gpu tests and the GPU benchmark inside an 8-minute budget, writing one log (and a
copy of tests/bench/RESULTS.md) to $OUT when set, else .bench/. What cannot travel is said and
skipped: deepspeed (PyPI has only its source), vLLM and flash-attn (CUDA builds of several GB).
On a machine without CUDA every step runs and the gpu tests skip, saying why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
LIMIT_MIB = 64
BUDGET_S = 8 * 60
# what the GPU image lacks that lmforge's gpu tests and benchmark import (distribution names)
CARRIED = ["trl", "datasets", "dill", "multiprocess", "bitsandbytes", "fastapi", "starlette", "uvicorn", "pydantic",
           "pydantic_core", "annotated-types", "typing-inspection", "opentelemetry-api", "openai", "httpx2",
           "httpcore2", "truststore", "distro", "jiter", "sniffio"]
CANNOT_TRAVEL = {"deepspeed": "PyPI has only its source distribution (it compiles ops against CUDA)",
                 "vllm": "a CUDA build of several GB", "flash-attn": "a CUDA build, source-only on PyPI"}
REFERENCE = ["models/stories260K", "data/llamafactory/alpaca_en_demo.json",
             "models/smollm2-135m-instruct/config.json", "models/smollm2-135m-instruct/tokenizer.json",
             "models/smollm2-135m-instruct/tokenizer_config.json", "models/smollm2-135m-instruct/chat_template.jinja",
             "models/smollm2-135m-instruct/generation_config.json"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def pinned(names: list[str], constraints: Path = ROOT / ".ci" / "constraints.txt") -> list[str]:
    """NAME==VERSION for each name, at the version the suite passed with (bare NAME if unpinned)."""
    versions = {}
    for line in constraints.read_text().splitlines():
        if "==" in line:
            name, version = line.strip().split("==", 1)
            versions[_norm(name)] = version
    return [f"{n}=={versions[_norm(n)]}" if _norm(n) in versions else n for n in names]


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def wheels() -> None:
    """Fill .whl/ (git-ignored): the carried wheels and the reference files; check the size."""
    WHEELS.mkdir(exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS),
                    *pinned(CARRIED)], check=True)
    shared = Path(os.environ.get("LMFORGE_SHARED", ROOT.parent / "shared")).resolve()
    for relative in REFERENCE:
        source, target = shared / relative, WHEELS / "shared" / relative
        if not source.exists():
            sys.exit(f"gpu-wheels: {source} not found (set LMFORGE_SHARED)")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():   # contents only: the reference files are read-only, their copies need not be
            shutil.copytree(source, target, dirs_exist_ok=True, copy_function=shutil.copyfile)
        else:
            shutil.copyfile(source, target)
    names = sorted(p.name for p in WHEELS.glob("*.whl"))
    stale = [w for w in names if not any(_norm(w).startswith(_norm(p.split("==")[0]) + "_" + _norm(p.split("==")[-1]))
                                         for p in pinned(CARRIED))]
    for name in stale:   # another version from an earlier download: two would stop the install
        (WHEELS / name).unlink()
    total = size_mib(WHEELS) + tree_mib()
    print(f"gpu-wheels: {len(names) - len(stale)} wheels + reference data in {WHEELS}; with the tree "
          f"{total:.1f} MiB of {LIMIT_MIB} MiB")
    for name, why in CANNOT_TRAVEL.items():
        print(f"gpu-wheels: not carried: {name} ({why}); its gpu tests skip")
    if total > LIMIT_MIB:
        sys.exit(f"gpu-wheels: {total:.1f} MiB is over the {LIMIT_MIB} MiB that may travel")


def tree_mib() -> float:
    """What the working tree adds (tracked and untracked-not-ignored files)."""
    try:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                               check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        return 0.0
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file()) / 2**20


def missing(wheel_dir: Path) -> list[Path]:
    """The wheels in wheel_dir whose distribution is not installed here."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for wheel in sorted(wheel_dir.glob("*.whl")):
        name = wheel.name.split("-")[0]
        try:
            version(name)
        except PackageNotFoundError:
            out.append(wheel)
    return out


def lmforge_importable(env: dict) -> bool:
    return subprocess.run([sys.executable, "-c", "import lmforge.tools.main"], env=env,
                          capture_output=True).returncode == 0


def install(env: dict, log) -> None:
    """Missing wheels onto PYTHONPATH, then lmforge itself without its dependencies."""
    site = Path(os.environ.get("LMFORGE_GPU_SITE", "/tmp/lmforge-site"))
    todo = missing(WHEELS) if WHEELS.is_dir() else []
    if todo:
        log(f"install: {len(todo)} carried wheels: {' '.join(w.name.split('-')[0] for w in todo)}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, todo)], check=True)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    else:
        log("install: no carried wheel is missing here")
    for name, why in CANNOT_TRAVEL.items():
        if subprocess.run([sys.executable, "-c", f"import {name.replace('-', '_')}"], env=env,
                          capture_output=True).returncode:
            log(f"install: {name} is not installed and cannot travel ({why}): its gpu tests skip")
    if lmforge_importable(env):
        return
    editable = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                               "--no-build-isolation", "-e", str(ROOT)], env=env, capture_output=True, text=True)
    if editable.returncode == 0 and lmforge_importable(env):
        log("install: lmforge installed in editable mode, without dependencies")
        return
    # no setuptools to build with: the package layout through symlinks, and a console script
    log("install: editable install failed (" + (editable.stderr.strip().splitlines() or ["?"])[-1][:160] +
        "); using a symlinked package layout")
    package = site / "lmforge"
    package.mkdir(parents=True, exist_ok=True)
    for part in ("shared", "tools"):
        link = package / part
        if not link.exists():
            link.symlink_to(ROOT / part)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(filter(None, [str(site), env.get("PYTHONPATH")])))
    script = Path(sys.executable).parent / "lmforge"
    script.write_text(f"#!{sys.executable}\nfrom lmforge.tools.main import main\nmain()\n")
    script.chmod(0o755)


def check() -> int:
    out = Path(os.environ.get("OUT") or ROOT / ".bench")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "gpu-check.log"
    started = time.monotonic()
    with open(log_path, "w") as handle:
        def log(line: str) -> None:
            print(f"gpu-check: {line}", flush=True)
            handle.write(f"gpu-check: {line}\n")
            handle.flush()

        def step(cmd: list[str], budget: float) -> int:
            log(f"$ {' '.join(cmd)}  (at most {budget:.0f} s)")
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            timer = threading.Timer(budget, proc.kill)   # a hung step cannot outlast its budget
            timer.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                handle.write(line)
            code = proc.wait()
            timer.cancel()
            if code == -9:
                log(f"time budget of {budget:.0f} s spent: stopped")
                return 124
            return code

        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if "LMFORGE_SHARED" not in env and not (ROOT.parent / "shared").is_dir() and (WHEELS / "shared").is_dir():
            env["LMFORGE_SHARED"] = str(WHEELS / "shared")
        env.setdefault("LMFORGE_BENCH_DIR", "/tmp/lmforge-bench")
        install(env, log)
        probe = subprocess.run([sys.executable, "-c", "import torch,sys; print(torch.__version__, torch.cuda.is_available() "
                                "and torch.cuda.get_device_name(0) or 'no CUDA GPU')"], env=env, capture_output=True,
                               text=True)
        log(f"python {sys.version.split()[0]}, torch {probe.stdout.strip() or probe.stderr.strip()[-200:]}")
        left = BUDGET_S - (time.monotonic() - started)
        tests = step([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                      "tests/test_gpu.py", "tests/test_serve.py"], left * 0.55)
        left = BUDGET_S - (time.monotonic() - started)
        bench = step([sys.executable, "tests/bench/run.py", "bench_gpu"], max(left - 5, 30))
        results = ROOT / "tests" / "bench" / "RESULTS.md"
        if results.exists() and out != ROOT / ".bench":
            shutil.copy(results, out / "RESULTS.md")
        log(f"pytest -m gpu: exit {tests}; bench_gpu: exit {bench}; {time.monotonic() - started:.0f} s; log {log_path}")
    return tests if tests not in (0, 5) else bench   # 5: pytest collected nothing


if __name__ == "__main__":
    if sys.argv[1:] == ["wheels"]:
        wheels()
    elif sys.argv[1:] == ["check"]:
        sys.exit(check())
    else:
        sys.exit("usage: python tests/gpu_check.py wheels|check")
