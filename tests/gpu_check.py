"""`make gpu-wheels` (here, with PyPI) and `make gpu-check` (on a CUDA machine with no network).

    python tests/gpu_check.py wheels     # fill .whl/: the wheels the GPU machine lacks + reference data
    python tests/gpu_check.py check      # install them, preflight every import, run `pytest -m gpu` and bench_gpu
    python tests/gpu_check.py probe      # (used by check) import each module, check each requirement: JSON

The GPU machine this is sized for (IMAGE below) has Python 3.12, torch, transformers, peft,
accelerate, pyarrow, pandas, typer, ... but not trl, datasets, bitsandbytes, fastapi/uvicorn/pydantic,
openai, deepspeed, vLLM or flash-attn, and no network. `wheels` walks the requirements of
lmforge (pyproject.toml: its dependencies, the quant extra, the test client) through the installed
packages' own metadata: a distribution the image has is left to the image (its needs are the
image's), any other is carried and its own needs are walked in turn; so the wheels cover the
transitive needs of what is carried. It downloads those for CPython 3.12 on manylinux x86-64 at the
versions installed here (a pure-Python one with no wheel on PyPI is built here), copies the
reference files the tests and the benchmark read into .whl/shared/, and checks the 64 MiB that may
travel with the tree. `check` installs the wheels whose distribution is missing or older there
(`--no-deps --target`, onto PYTHONPATH, so the machine's own torch/transformers stay), makes
lmforge importable without installing its dependencies, then -- before running anything -- logs
every module that fails to import (with its error) and every requirement the installed packages
leave unmet, and runs the gpu tests and the GPU benchmark inside an 8-minute budget, each step in
its own process group (a step past its budget is killed with everything it started). One log (and
the benchmark's rows as they finish, and a copy of tests/bench/RESULTS.md) goes to $OUT when set,
else .bench/. On a machine without CUDA every step runs and the gpu tests skip, saying why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
LIMIT_MIB = 64
BUDGET_S = 8 * 60
# the client the gpu tests talk to `serve` with (test extras), beside lmforge's own dependencies
TEST_CLIENT = ("openai", "httpx")
# The GPU image's distributions (its package listing), with the version where it was read; the
# others' versions are unknown here and are checked on the machine by `check`.
IMAGE_VERSIONS = {"accelerate": "1.15.0", "huggingface_hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                  "sentencepiece": "0.2.2", "tiktoken": "0.14.0", "tokenizers": "0.23.2", "torch": "2.11.0",
                  "transformers": "5.17.0", "triton": "3.6.0"}
IMAGE_NAMES = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"""
CANNOT_TRAVEL = {"deepspeed": "PyPI has only its source distribution (it compiles ops against CUDA)",
                 "vllm": "a CUDA build of several GB", "flash-attn": "a CUDA build, source-only on PyPI"}
NEVER_CARRIED = {"torch", "triton"}   # the image's own CUDA build is the point of the machine
REFERENCE = ["models/stories260K", "data/llamafactory/alpaca_en_demo.json",
             "models/smollm2-135m-instruct/config.json", "models/smollm2-135m-instruct/tokenizer.json",
             "models/smollm2-135m-instruct/tokenizer_config.json", "models/smollm2-135m-instruct/chat_template.jinja",
             "models/smollm2-135m-instruct/generation_config.json"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any"]
# the GPU machine, for the environment markers of requirements
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
MODULE_OF = {"pyyaml": "yaml", "rouge_score": "rouge_score", "pillow": "PIL", "scikit_learn": "sklearn"}
# what lazy top-level packages (transformers, trl) only import when used, and lmforge's own entry points
DEEP_IMPORTS = ["transformers.trainer", "trl.trainer.sft_trainer", "trl.trainer.grpo_trainer", "lmforge.tools.main",
                "lmforge.shared.train.training", "lmforge.shared.infer.app"]
PROBE_MARK = "gpu-check-probe: "


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


IMAGE: dict[str, str | None] = {_norm(n): IMAGE_VERSIONS.get(_norm(n)) for n in IMAGE_NAMES.split()}


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


# ----------------------------------------------------------------------------- what the run needs

def roots(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The requirements the gpu tests and the benchmark start from: lmforge's dependencies, its
    quant extra (bitsandbytes) and the test client."""
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    test = [r for r in optional.get("test", []) if _norm(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) in TEST_CLIENT]
    return [*project["dependencies"], *optional.get("quant", []), *test]


def walk(requirements: list[str], requires: Callable[[str], list[str] | None] | None = None,
         stop: set[str] | frozenset[str] = frozenset(), env: dict | None = TARGET) -> dict[str, list[tuple[str, str]]]:
    """Every distribution `requirements` need, transitively, from the packages' own metadata
    (`requires`, importlib.metadata's by default): normalised name -> [(version specifier, needed
    by)]. Environment markers are evaluated for `env` (this machine's when None), with the extras
    asked for; the walk does not enter the distributions named in `stop`, nor one whose metadata
    is not here."""
    from importlib.metadata import PackageNotFoundError

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {**default_environment(), "extra": ""} if env is None else env

    if requires is None:
        from importlib.metadata import requires
    found: dict[str, list[tuple[str, str]]] = {}
    entered: set[tuple[str, frozenset[str]]] = set()
    todo = [(Requirement(r), "lmforge", frozenset[str]()) for r in requirements]
    while todo:
        req, by, parent_extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in {"", *parent_extras}):
            continue
        name = _norm(req.name)
        found.setdefault(name, []).append((str(req.specifier), by))
        key = (name, frozenset(req.extras))
        if name in stop or key in entered:
            continue
        entered.add(key)
        try:
            needs = requires(req.name) or []
        except PackageNotFoundError:
            continue
        todo += [(Requirement(line), name, frozenset(req.extras)) for line in needs]
    return found


def _satisfies(version: str, specifier: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion

    try:
        return SpecifierSet(specifier).contains(version, prereleases=True)
    except InvalidVersion:
        return True   # a version packaging cannot read: nothing to say about it


def plan(requirements: list[str], image: dict[str, str | None] = IMAGE,
         requires: Callable[[str], list[str] | None] | None = None) -> dict[str, str]:
    """The distributions to carry: name -> why. One the image has stays the image's (its needs are
    the image's), unless the image's known version falls short of what is asked of it; any other
    is carried, and what it needs is walked in turn."""
    short: dict[str, str] = {}
    while True:
        found = walk(requirements, requires, stop=set(image) - set(short))
        more = {}
        for name in set(found) & set(image) - set(short) - NEVER_CARRIED:
            have = image[name]
            wanted = [f"{spec} ({by})" for spec, by in found[name] if spec and have and not _satisfies(have, spec)]
            if wanted:
                more[name] = f"the GPU image has {have}; needed: {', '.join(wanted)}"
        if not more:
            break
        short.update(more)
    carried = {}
    for name, needs in sorted(found.items()):
        if name in NEVER_CARRIED or name in CANNOT_TRAVEL or (name in image and name not in short):
            continue
        carried[name] = short.get(name) or "not on the GPU image; needed by " + ", ".join(sorted({b for _, b in needs}))
    return carried


def unmet(found: dict[str, list[tuple[str, str]]], version: Callable[[str], str] | None = None) -> list[str]:
    """Each requirement in `found` that the installed distributions leave unmet, one line each."""
    from importlib.metadata import PackageNotFoundError

    if version is None:
        from importlib.metadata import version
    lines = []
    for name, needs in sorted(found.items()):
        try:
            have = version(name)
        except PackageNotFoundError:
            lines.append(f"{name} is not installed (needed by {', '.join(sorted({b for _, b in needs}))})")
            continue
        lines += [f"{by} needs {name}{spec}; {have} is installed" for spec, by in needs
                  if spec and not _satisfies(have, spec)]
    return lines


def modules(requirements: list[str]) -> list[str]:
    """The modules to import: each required distribution's, then the deep ones."""
    names = [_norm(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in requirements]
    return list(dict.fromkeys([MODULE_OF.get(n, n) for n in names] + DEEP_IMPORTS))


def probe(names: list[str]) -> dict:
    """Import each module here; check the requirements' closure against what is installed here."""
    import importlib

    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException as exc:   # noqa: BLE001 - an import may raise anything, SystemExit included
            text = str(exc).strip().splitlines()
            failed[name] = f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
    try:
        problems = unmet(walk(roots(), stop=frozenset(NEVER_CARRIED), env=None))
    except Exception as exc:   # noqa: BLE001 - no packaging there: say so, keep the import results
        problems = [f"requirements not checked ({type(exc).__name__}: {exc})"]
    return {"imports": len(names), "failed": failed, "unmet": problems}


def preflight(env: dict, names: list[str] | None = None, timeout: float = 300) -> dict:
    """`probe` in a fresh process with `env` (the PYTHONPATH the steps get): what fails and why."""
    names = modules(roots()) if names is None else names
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "probe", *names], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"imports": len(names), "failed": {"(probe)": f"no answer within {timeout:.0f} s"}, "unmet": []}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(PROBE_MARK):
            return json.loads(line[len(PROBE_MARK):])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return {"imports": len(names), "failed": {"(probe)": f"exit {done.returncode}: {tail}"}, "unmet": []}


# ----------------------------------------------------------------------------- gpu-wheels

def _download(specs: list[str]) -> list[str]:
    """Binary wheels for the GPU machine; the specs pip found none for (built from source after)."""
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    base = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
            "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS)]
    if subprocess.run([*base, *specs], capture_output=True).returncode == 0:
        return []
    return [s for s in specs if subprocess.run([*base, s], capture_output=True).returncode != 0]


def wheels() -> None:
    """Fill .whl/ (git-ignored): the carried wheels and the reference files; check the size."""
    from importlib.metadata import PackageNotFoundError, version

    WHEELS.mkdir(exist_ok=True)
    carried = plan(roots())
    specs = []
    for name, why in carried.items():
        try:
            specs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            specs += pinned([name])
        print(f"gpu-wheels: carry {specs[-1]}: {why}")
    for spec in _download(specs):   # a pure-Python package PyPI has only as source: built here
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(WHEELS), spec],
                               capture_output=True, text=True)
        if built.returncode or not any(w.name.endswith("-none-any.whl") and _norm(w.name).startswith(
                _norm(spec.split("==")[0]) + "_") for w in WHEELS.glob("*.whl")):
            sys.exit(f"gpu-wheels: no wheel for {spec} ({(built.stderr.strip().splitlines() or ['?'])[-1][:200]})")
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
    stale = [w for w in names if not any(_norm(w).startswith(_norm(s.split("==")[0]) + "_" + _norm(s.split("==")[-1]))
                                         for s in specs)]
    for name in stale:   # another version from an earlier download: two would stop the install
        (WHEELS / name).unlink()
    total = size_mib(WHEELS) + tree_mib()
    print(f"gpu-wheels: {len(names) - len(stale)} wheels + reference data in {WHEELS}; with the tree "
          f"{total:.1f} MiB of {LIMIT_MIB} MiB")
    for name, why in CANNOT_TRAVEL.items():
        print(f"gpu-wheels: not carried: {name} ({why}); its gpu tests skip")
    if total > LIMIT_MIB:
        largest = sorted(WHEELS.glob("*.whl"), key=lambda w: -w.stat().st_size)[:3]
        sys.exit(f"gpu-wheels: {total:.1f} MiB is over the {LIMIT_MIB} MiB that may travel (largest: " +
                 ", ".join(f"{w.name} {w.stat().st_size / 2**20:.1f} MiB" for w in largest) + ")")


def tree_mib() -> float:
    """What the working tree adds (tracked and untracked-not-ignored files)."""
    try:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                               check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        return 0.0
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file()) / 2**20


# ----------------------------------------------------------------------------- gpu-check

def missing(wheel_dir: Path) -> list[Path]:
    """The wheels in wheel_dir whose distribution is not installed here, or is older here."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import InvalidVersion, Version

    out = []
    for wheel in sorted(wheel_dir.glob("*.whl")):
        name, carried = wheel.name.split("-")[:2]
        try:
            have = version(name)
        except PackageNotFoundError:
            out.append(wheel)
            continue
        try:
            if Version(have) < Version(carried):
                out.append(wheel)
        except InvalidVersion:
            pass
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
    try:
        script.write_text(f"#!{sys.executable}\nfrom lmforge.tools.main import main\nmain()\n")
        script.chmod(0o755)
    except OSError as exc:   # a system Python's folder: the tests and benchmarks run the module instead
        log(f"install: no lmforge script beside {sys.executable} ({exc.strerror}): `python -m lmforge.tools.main`")


def run_step(cmd: list[str], budget: float, env: dict, sink: Callable[[str], None], cwd: Path = ROOT) -> int:
    """Run one step in a process group of its own, its output to `sink` line by line. Past
    `budget` seconds the whole group is killed -- the `lmforge train` or torchrun it started too --
    and 124 returned; what it leaves running when it ends is killed as well, so nothing it started
    overlaps the next step."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    expired = threading.Event()

    def kill_group() -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop() -> None:
        expired.set()
        kill_group()

    timer = threading.Timer(budget, stop)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            sink(line)
        code = proc.wait()
    finally:
        timer.cancel()
        kill_group()
    return 124 if expired.is_set() else code


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

        def echo(line: str) -> None:
            sys.stdout.write(line)
            sys.stdout.flush()
            handle.write(line)
            handle.flush()

        def step(cmd: list[str], budget: float) -> int:
            log(f"$ {' '.join(cmd)}  (at most {budget:.0f} s)")
            code = run_step(cmd, budget, env, echo)
            if code == 124:
                log(f"time budget of {budget:.0f} s spent: stopped, with every process it started")
            return code

        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if "LMFORGE_SHARED" not in env and not (ROOT.parent / "shared").is_dir() and (WHEELS / "shared").is_dir():
            env["LMFORGE_SHARED"] = str(WHEELS / "shared")
        env.setdefault("LMFORGE_BENCH_DIR", "/tmp/lmforge-bench")
        env["LMFORGE_BENCH_ROWS"] = str(out / "bench_gpu_rows.jsonl")
        install(env, log)
        found = preflight(env)
        for name, why in found["failed"].items():
            log(f"preflight: import {name} fails: {why}")
        for line in found["unmet"]:
            log(f"preflight: unmet requirement: {line}")
        if not found["failed"] and not found["unmet"]:
            log(f"preflight: all {found['imports']} imports load and every requirement is met")
        probe_torch = subprocess.run([sys.executable, "-c", "import torch,sys; print(torch.__version__, "
                                      "torch.cuda.is_available() and torch.cuda.get_device_name(0) or 'no CUDA GPU')"],
                                     env=env, capture_output=True, text=True)
        log(f"python {sys.version.split()[0]}, torch {probe_torch.stdout.strip() or probe_torch.stderr.strip()[-200:]}")
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
    elif sys.argv[1:2] == ["probe"]:
        print(PROBE_MARK + json.dumps(probe(sys.argv[2:] or modules(roots()))), flush=True)
    else:
        sys.exit("usage: python tests/gpu_check.py wheels|check|probe [MODULE...]")
