"""Shared test helpers.

Reference material (real datasets, models, tokenizers) is found through one setting:
LMFORGE_SHARED, defaulting to ../shared beside the repository. Tests that need it skip with a
clear reason when it is absent, so the suite passes on a fresh machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LMFORGE_SHARED", ROOT.parent / "shared")).resolve()
LMFORGE = [str(Path(sys.executable).parent / "lmforge")]
if not Path(LMFORGE[0]).exists():  # not installed as a script: run the module
    LMFORGE = [sys.executable, "-m", "lmforge.tools.main"]


def free_port() -> int:
    """A TCP port nothing listens on now (for a server or a torchrun rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list, *launch: str, program: list[str] | None = None, timeout: int = 900,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """`lmforge ARGS` (or PROGRAM ARGS) on NPROC local processes under torchrun, one thread each;
    `launch` adds torchrun's own options (a rendezvous, --max-restarts)."""
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), *launch, *(program or [LMFORGE[-1]]), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def shared_path(relative: str) -> Path:
    """A path inside the reference folder, or skip the test saying what is missing."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"reference data {relative} not found under {SHARED} (set LMFORGE_SHARED)")
    return path


def run(args: list[str], *, input: bytes | None = None, cwd: Path | None = None,
        env: dict | None = None, timeout: float = 600, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run `lmforge ARGS`; stdout/stderr as bytes.

    By default in this process (the same `main()`, with file descriptors 0-2 redirected and the
    environment and global state restored afterwards), which saves seconds of imports per call;
    `fresh=True` (or LMFORGE_TEST_SUBPROCESS=1) runs a real subprocess."""
    args = [str(a) for a in args]
    if fresh or cwd is not None or os.environ.get("LMFORGE_TEST_SUBPROCESS") == "1":
        full_env = {**os.environ, "LMFORGE_LOG_INTERVAL": "1000", **(env or {})}
        full_env.pop("LMFORGE_DEBUG", None)
        return subprocess.run(LMFORGE + args, input=input, capture_output=True, cwd=cwd, env=full_env,
                              timeout=timeout)
    return _in_process(args, input, env or {})


def _in_process(args: list[str], data: bytes | None, env: dict) -> subprocess.CompletedProcess:
    import io
    import tempfile

    from lmforge.shared.core import log
    from lmforge.tools.main import main

    saved_env = dict(os.environ)
    os.environ.update({"LMFORGE_LOG_INTERVAL": "1000", **env})
    os.environ.pop("LMFORGE_DEBUG", None)
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    files = [tempfile.TemporaryFile() for _ in range(3)]
    if data:
        files[0].write(data)
        files[0].seek(0)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved_fds = [os.dup(fd) for fd in (0, 1, 2)]
    saved_streams = (sys.stdin, sys.stdout, sys.stderr)
    for fd, f in zip((0, 1, 2), files):
        os.dup2(f.fileno(), fd)
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(os.dup(0), "rb")))
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(os.dup(1), "wb")), write_through=True)
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(os.dup(2), "wb")), write_through=True)
    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for stream in (sys.stdin, sys.stdout, sys.stderr):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        sys.stdin, sys.stdout, sys.stderr = saved_streams
        for fd, saved in zip((0, 1, 2), saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        os.environ.clear()
        os.environ.update(saved_env)
        log.set_quiet(False)
        log.set_debug(False)
        if threads:
            torch.set_num_threads(threads)
    out, err = [(f.seek(0), f.read())[1] for f in files[1:]]
    for f in files:
        f.close()
    return subprocess.CompletedProcess(["lmforge", *args], code, out, err)


def ok(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run and insist on success, showing stderr when it fails."""
    result = run(args, **kwargs)
    assert result.returncode == 0, f"lmforge {' '.join(map(str, args))} failed:\n{result.stderr.decode()}"
    return result


def bad(args: list[str], *, code: int = 2, **kwargs) -> str:
    """Run and insist on a clean failure: exit code, one `error:` line, no traceback."""
    result = run(args, **kwargs)
    err = result.stderr.decode()
    assert result.returncode == code, f"expected exit {code}, got {result.returncode}:\n{err}"
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, f"expected one error line:\n{err}"
    return errors[0]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_rows(path_or_bytes) -> list[dict]:
    import pyarrow as pa

    if isinstance(path_or_bytes, (bytes, bytearray)):
        reader = pa.ipc.open_stream(pa.BufferReader(path_or_bytes))
    else:
        reader = pa.ipc.open_stream(pa.memory_map(str(path_or_bytes)))
    return reader.read_all().to_pylist()


def read_meta(path_or_bytes) -> dict:
    import pyarrow as pa

    if isinstance(path_or_bytes, (bytes, bytearray)):
        reader = pa.ipc.open_stream(pa.BufferReader(path_or_bytes))
    else:
        reader = pa.ipc.open_stream(pa.memory_map(str(path_or_bytes)))
    return json.loads(reader.schema.metadata[b"lmforge"])


@pytest.fixture
def demo_raw(tmp_path_factory) -> Path:
    """The project's own demo data, written fresh."""
    import demo

    out = tmp_path_factory.mktemp("demo")
    demo.write(out, rows=200)
    return out


def word_tokenizer(directory: Path, words: list[str], specials: list[str], *, eos: str, bos: str | None = None,
                   chat_template: str | None = None) -> Path:
    """A tiny word-level tokenizer (ids predictable by hand), saved as a model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", *specials, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token=eos,
                                        bos_token=bos, additional_special_tokens=[s for s in specials if s not in (eos, bos)])
    if chat_template:
        tokenizer.chat_template = chat_template
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def aligned(tmp: Path, name: str, rows: list[dict], *extra: str) -> Path:
    """Align rows written as JSON lines; returns the Arrow path."""
    src = write_jsonl(tmp / f"{name}.jsonl", rows)
    out = tmp / f"{name}.arrow"
    ok(["data", "align", src, "-o", out, *extra])
    return out


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory, materialized from its GGUF file once per
    session (about 30 s each time); tests read it and never write into it."""
    folder = shared_path("models/smollm2-135m-instruct")
    target = tmp_path_factory.mktemp("smollm2") / "model"
    subprocess.run([sys.executable, str(folder / "materialize.py"), str(target)], check=True, capture_output=True,
                   timeout=600)
    return target
