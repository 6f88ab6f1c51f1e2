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


def shared_path(relative: str) -> Path:
    """A path inside the reference folder, or skip the test saying what is missing."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"reference data {relative} not found under {SHARED} (set LMFORGE_SHARED)")
    return path


def run(args: list[str], *, input: bytes | None = None, cwd: Path | None = None,
        env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `lmforge ARGS` in a fresh process; stdout/stderr as bytes."""
    full_env = {**os.environ, "LMFORGE_LOG_INTERVAL": "1000", **(env or {})}
    full_env.pop("LMFORGE_DEBUG", None)
    return subprocess.run(LMFORGE + [str(a) for a in args], input=input, capture_output=True,
                          cwd=cwd, env=full_env, timeout=timeout)


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
    from lmforge.shared import demo

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
