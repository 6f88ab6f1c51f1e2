"""Where outputs go: one rule for every command (the folders -o names are made; a path through a
file is refused), and files readable as the umask says (no private temporary-file modes)."""

from __future__ import annotations

import os
import stat

from conftest import bad, ok, shared_path, write_jsonl

ROW = {"instruction": "q", "output": "a"}


def test_every_command_makes_the_folders_its_output_names(tmp_path):
    base = shared_path("models/stories260K")
    src = write_jsonl(tmp_path / "a.jsonl", [ROW] * 8)
    ok(["data", "align", src, "-o", tmp_path / "new" / "deep" / "a.arrow"])
    ok(["data", "pack", tmp_path / "new" / "deep" / "a.arrow", "-m", base, "-t", "default", "--cutoff", "32",
        "-o", tmp_path / "packed" / "p.arrow"])
    ok(["train", "sft", "-m", base, "-d", tmp_path / "packed" / "p.arrow", "-o", tmp_path / "runs" / "x",
        "--max-steps", "1"])
    ok(["adapter", "merge", base, tmp_path / "runs" / "x", "-o", tmp_path / "models" / "merged" / "m"])
    assert (tmp_path / "models" / "merged" / "m" / "config.json").exists()
    (tmp_path / "plain").write_text("a file")
    assert "is a file, not a directory" in bad(["data", "align", src, "-o", tmp_path / "plain" / "a.arrow"])
    assert "is a file, not a directory" in bad(["adapter", "merge", base, tmp_path / "runs" / "x", "-o",
                                                tmp_path / "plain" / "m"])


def test_saved_weights_have_the_umasks_mode(tmp_path):
    base = shared_path("models/stories260K")
    src = write_jsonl(tmp_path / "a.jsonl", [ROW] * 8)
    ok(["data", "align", src, "-o", tmp_path / "a.arrow"])
    ok(["data", "pack", tmp_path / "a.arrow", "-m", base, "-t", "default", "--cutoff", "32", "-o", tmp_path / "p"])
    previous = os.umask(0o022)
    try:
        ok(["train", "sft", "-m", base, "-d", tmp_path / "p", "-o", tmp_path / "run", "--max-steps", "1"])
        ok(["adapter", "merge", base, tmp_path / "run", "-o", tmp_path / "merged"])
    finally:
        os.umask(previous)
    for path in [*(tmp_path / "run").iterdir(), *(tmp_path / "merged").iterdir()]:
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
