"""A corpus of malformed inputs: each gives exit 2, one line naming the problem, no traceback,
and leaves no output file behind."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

import pytest
from conftest import LMFORGE, bad, ok, write_jsonl

ALPACA = {"instruction": "q", "output": "a"}


def _arrow(tmp: Path, rows=None, stage="sft") -> Path:
    src = write_jsonl(tmp / f"src_{stage}.jsonl", rows or [ALPACA])
    out = tmp / f"{stage}.arrow"
    ok(["data", "align", src, "-o", out] + (["--format", "pairwise"] if stage == "pairwise" else []))
    src.unlink()
    return out


def _file(tmp: Path, name: str, content: bytes | str) -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# Each case: (id, setup(tmp) -> args, words the error must contain)
CASES = [
    ("truncated-json", lambda t: ["data", "align", _file(t, "a.json", '[{"instruction": "q", "output": "a"}, {"inst')],
     "truncated JSON"),
    ("wrong-type", lambda t: ["data", "align", write_jsonl(t / "a.jsonl", [{"instruction": 5, "output": "a"}])],
     "line 1: 'instruction' must be a string"),
    ("non-utf8-jsonl", lambda t: ["data", "align", _file(t, "a.jsonl", b'{"instruction": "\xff\xfe", "output": "a"}\n')],
     "not valid UTF-8"),
    ("non-utf8-json", lambda t: ["data", "align", _file(t, "a.json", b'[{"instruction": "caf\xe9", "output": "a"}]')],
     "not valid UTF-8"),
    ("non-utf8-txt", lambda t: ["data", "align", _file(t, "a.txt", b"fine\nbad \xff line\n")],
     "line 2: not valid UTF-8"),
    ("empty-json", lambda t: ["data", "align", _file(t, "a.json", "")], "empty file"),
    ("empty-jsonl", lambda t: ["data", "align", _file(t, "a.jsonl", "\n\n")], "empty file"),
    ("csv-header-only", lambda t: ["data", "align", _file(t, "a.csv", "instruction,output\n")], "a header and no rows"),
    ("missing-columns", lambda t: ["data", "align", write_jsonl(t / "a.jsonl", [{"question": "q", "answer": "a"}])],
     "cannot tell the format"),
    ("missing-output", lambda t: ["data", "align", "--format", "alpaca",
                                  write_jsonl(t / "a.jsonl", [{"instruction": "q"}])], "missing 'output'"),
    ("odd-turn-order", lambda t: ["data", "align", write_jsonl(t / "a.jsonl", [{"conversations": [
        {"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}])], "wrong turn order"),
    ("unknown-role", lambda t: ["data", "align", write_jsonl(t / "a.jsonl", [{"conversations": [
        {"from": "human", "value": "x"}, {"from": "robot", "value": "y"}]}])], "unknown role 'robot'"),
    ("empty-content", lambda t: ["data", "align", write_jsonl(t / "a.jsonl", [{"conversations": [
        {"from": "human", "value": "  "}, {"from": "gpt", "value": "y"}]}])], "empty content"),
    ("unknown-format", lambda t: ["data", "align", "--format", "xml", write_jsonl(t / "a.jsonl", [ALPACA])],
     "'xml' is not one of"),
    ("unreadable-path", lambda t: ["data", "align", t / "missing.json"], "no such file"),
    ("not-a-directory", lambda t: ["data", "align", str(_file(t, "f.json", "[]")) + "/inner.json"], "no such file"),
    ("broken-symlink", lambda t: ["data", "align", _symlink(t)], "broken symbolic link"),
    ("empty-directory", lambda t: ["data", "align", _mkdir(t / "nothing")], "holds no data files"),
    ("unknown-extension", lambda t: ["data", "align", _file(t, "a.xml", "<a/>")], "unknown file type '.xml'"),
    ("garbage-jsonl-line", lambda t: ["data", "align", _file(t, "a.jsonl", json.dumps(ALPACA) + "\n{oops\n")],
     "line 2: invalid JSON"),
    ("json-object-not-array", lambda t: ["data", "align", _file(t, "a.json", '"just a string"')],
     "expected a JSON array"),
    ("csv-extra-field", lambda t: ["data", "align", _file(t, "a.csv", "instruction,output\nq,a\nq,a,extra\n")],
     "line 3: the row has more fields"),
    ("kto-label-type", lambda t: ["data", "align", write_jsonl(t / "a.jsonl", [{"messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "label": "maybe"}])],
     "must be a boolean"),
    ("tools-not-json", lambda t: ["data", "align", write_jsonl(t / "a.jsonl", [{"conversations": [
        {"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], "tools": "{not json"}])],
     "'tools' is not valid JSON"),
    ("function-call-not-json", lambda t: ["data", "align", write_jsonl(t / "a.jsonl", [{"conversations": [
        {"from": "human", "value": "x"}, {"from": "function_call", "value": "call it"},
        {"from": "observation", "value": "r"}, {"from": "gpt", "value": "y"}]}])],
     "function call content is not valid JSON"),
    ("columns-syntax", lambda t: ["data", "align", "--columns", "instruction", write_jsonl(t / "a.jsonl", [ALPACA])],
     "is not NAME=VALUE"),
    ("columns-unknown-name", lambda t: ["data", "align", "--columns", "instructoin=q",
                                        write_jsonl(t / "a.jsonl", [ALPACA])], "did you mean 'instruction'"),
    ("mixed-stages", lambda t: ["data", "align", write_jsonl(t / "a.jsonl", [ALPACA]),
                                write_jsonl(t / "b.jsonl", [{"instruction": "q", "chosen": "a", "rejected": "b"}])],
     "different stages"),
    ("dataset-info-unknown-name", lambda t: ["data", "align", "--dataset-info",
                                             _file(t, "dataset_info.json", '{"alpaca": {"file_name": "a.json"}}'),
                                             "--name", "alpaka"], "no dataset named 'alpaka'"),
    ("show-not-arrow", lambda t: ["data", "show", write_jsonl(t / "a.jsonl", [ALPACA])], "not an Arrow dataset"),
    ("show-truncated-arrow", lambda t: ["data", "show", _truncated(t), "--rows", "0"], "truncated or corrupt"),
    ("merge-different-stages", lambda t: ["data", "merge", _arrow(t), _arrow(t, [
        {"instruction": "q", "chosen": "a", "rejected": "b"}], "pairwise")], "stage"),
    ("merge-probs-count", lambda t: ["data", "merge", _arrow(t), _arrow(t), "--mix", "interleave-under",
                                     "--probs", "0.2,0.3,0.5"], "--probs has 3 values for 2 inputs"),
    ("split-too-large", lambda t: ["data", "split", _arrow(t), "--val-size", "5", "-o", t / "split_out"],
     "leave some rows for training"),
    ("config-bad-yaml", lambda t: ["data", "align", write_jsonl(t / "a.jsonl", [ALPACA]), "--config",
                                   _file(t, "c.yaml", "columns: [unclosed\n")], "config file"),
    ("unknown-option", lambda t: ["data", "align", "--colour", "x"], "No such option"),
    ("output-through-a-file", lambda t: ["data", "align", write_jsonl(t / "a.jsonl", [ALPACA]), "-o",
                                         t / "a.jsonl" / "out.arrow"], "not a directory"),
    ("output-not-writable", lambda t: ["data", "align", write_jsonl(t / "a.jsonl", [ALPACA]), "-o",
                                       "/proc/out.arrow"], "/proc/out.arrow: no such file or directory"),
    # the slips a hostile review found (nothing half-written is taken for whole)
    ("config-alias-bomb", lambda t: ["data", "align", write_jsonl(t / "a.jsonl", [ALPACA]), "--config", _file(
        t, "c.yaml", "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n")],
     "aliases"),
    ("config-huge", lambda t: ["data", "align", write_jsonl(t / "a.jsonl", [ALPACA]), "--config",
                               _file(t, "c.yaml", "# " + "x" * (2 << 20) + "\n")], "more than an option file needs"),
    ("json-nested-deep", lambda t: ["data", "align", _file(t, "a.json", "[" * 100_000 + "]" * 100_000)],
     "nested too deeply"),
    ("dataset-info-file-name-type", lambda t: ["data", "align", "--dataset-info",
                                               _file(t, "dataset_info.json", '{"d": {"file_name": 5}}'), "--name", "d"],
     "'file_name' must be a string"),
    ("dataset-info-columns-type", lambda t: ["data", "align", "--dataset-info",
                                             _file(t, "dataset_info.json", '{"d": {"file_name": "a.json", "columns": [1]}}'),
                                             "--name", "d"], "'columns' must map names"),
    ("split-val-nan", lambda t: ["data", "split", _arrow(t), "--val-size", "nan", "-o", t / "split_out"],
     "must be a finite number"),
    ("split-val-inf", lambda t: ["data", "split", _arrow(t), "--val-size", "inf", "-o", t / "split_out"],
     "must be a finite number"),
    ("pack-prompt-and-history", lambda t: ["data", "pack", _arrow(t), "-m", "unused", "--train-on-prompt",
                                           "--mask-history"], "contradict each other"),
    ("train-max-steps-negative", lambda t: ["train", "sft", "-m", "m", "-d", "d", "-o", t / "run", "--max-steps", "-5"],
     "--max-steps -5: must be at least 1"),
    ("train-save-steps-zero", lambda t: ["train", "sft", "-m", "m", "-d", "d", "-o", t / "run", "--save-steps", "0"],
     "--save-steps 0: must be at least 1"),
    ("train-save-steps-negative", lambda t: ["train", "sft", "-m", "m", "-d", "d", "-o", t / "run", "--save-steps",
                                             "-3"], "--save-steps -3"),
    ("train-logging-steps-zero", lambda t: ["train", "dpo", "-m", "m", "-d", "d", "-o", t / "run", "--logging-steps",
                                            "0"], "--logging-steps 0"),
    ("train-grad-norm-negative", lambda t: ["train", "sft", "-m", "m", "-d", "d", "-o", t / "run", "--max-grad-norm",
                                            "-1"], "'--max-grad-norm': -1: must be at least 0"),
    ("train-weight-decay-negative", lambda t: ["train", "pt", "-m", "m", "-d", "d", "-o", t / "run", "--weight-decay",
                                               "-0.1"], "--weight-decay"),
    ("train-epochs-inf", lambda t: ["train", "sft", "-m", "m", "-d", "d", "-o", t / "run", "--epochs", "inf"],
     "'--epochs': inf: must be a finite number"),
    ("train-full-with-lora-rank", lambda t: ["train", "sft", "-m", "m", "-d", "d", "-o", t / "run", "--method", "full",
                                             "--lora-rank", "16"], "--lora-rank applies to --method lora"),
    ("train-lora-with-freeze-layers", lambda t: ["train", "sft", "-m", "m", "-d", "d", "-o", t / "run",
                                                 "--freeze-layers", "2"], "--freeze-layers applies to --method freeze"),
    ("train-freeze-with-galore-rank", lambda t: ["train", "pt", "-m", "m", "-d", "d", "-o", t / "run", "--method",
                                                 "freeze", "--galore-rank", "4"], "--galore-rank applies"),
    ("train-lora-with-badam-mode", lambda t: ["train", "rm", "-m", "m", "-d", "d", "-o", t / "run", "--badam-mode",
                                              "random"], "--badam-mode applies"),
    ("train-conflict-from-config", lambda t: ["train", "sft", "-m", "m", "-d", "d", "-o", t / "run", "--method", "full",
                                              "--config", _file(t, "c.yaml", "lora_dropout: 0.1\n")],
     "--lora-dropout applies"),
    ("merge-shard-size", lambda t: ["adapter", "merge", "base", "adapter", "-o", t / "merged", "--max-shard-size", "2XB"],
     "--max-shard-size 2XB: not a size"),
    ("quantize-missing-model", lambda t: ["model", "quantize", t / "missing", "-o", t / "q"], "not found"),
    ("merge-probs-sum", lambda t: ["data", "merge", _arrow(t), _arrow(t), "--mix", "interleave-under",
                                   "--probs", "0.7,0.7"], "probabilities must sum to 1 (these sum to 1.4)"),
    ("merge-probs-nan", lambda t: ["data", "merge", _arrow(t), _arrow(t), "--mix", "interleave-over",
                                   "--probs", "nan,1"], "must be finite"),
    ("init-vocab-too-small", lambda t: ["model", "init", "-o", t / "m", "--train-tokenizer", _arrow(t),
                                        "--vocab-size", "5"], "needs at least 259 tokens"),
    ("train-resume-nothing", lambda t: ["train", "sft", "-m", "m", "-d", "d", "-o", t / "run", "--resume"],
     "has no checkpoint to resume; drop --resume to start afresh"),
    ("jsonl-lone-surrogate", lambda t: ["data", "align", _file(t, "a.jsonl", '{"instruction": "\\ud800", '
                                                                           '"output": "a"}\n')],
     "a.jsonl line 1: the escape \\ud800 is a lone UTF-16 surrogate"),
    ("json-lone-surrogate", lambda t: ["data", "align", _file(t, "a.json", '[{"instruction": "q", "output": "a"},\n'
                                                                         '{"instruction": "\\udfff", "output": "a"}]')],
     "a.json line 2: the escape \\udfff is a lone UTF-16 surrogate"),
    ("config-device", lambda t: ["data", "align", write_jsonl(t / "a.jsonl", [ALPACA]), "--config", "/dev/zero"],
     "a device, not a file"),
    ("train-lr-inf", lambda t: ["train", "sft", "-m", "m", "-d", "d", "-o", t / "run", "--lr", "inf"],
     "'--lr': inf: must be a finite number"),
    ("train-config-lr-inf", lambda t: ["train", "sft", "-m", "m", "-d", "d", "-o", t / "run", "--config",
                                       _file(t, "c.yaml", "lr: .inf\n")], "inf: must be a finite number"),
    ("train-dpo-beta-inf", lambda t: ["train", "dpo", "-m", "m", "-d", "d", "-o", t / "run", "--beta", "inf"],
     "--beta"),
    ("train-lora-dropout-one", lambda t: ["train", "sft", "-m", "m", "-d", "d", "-o", t / "run", "--lora-dropout",
                                          "1"], "must be in [0, 1)"),
    ("grpo-reward-timeout-zero", lambda t: ["train", "grpo", "-m", "m", "-d", "d", "-o", t / "run", "--reward",
                                            "exact", "--reward-timeout", "0"], "must be above 0"),
    ("grpo-reward-weights-nan", lambda t: ["train", "grpo", "-m", "m", "-d", "d", "-o", t / "run", "--reward",
                                           "exact", "--reward-weights", "nan"], "weight 1 (nan) is not a finite number"),
]


def _symlink(t: Path) -> Path:
    link = t / "link.json"
    os.symlink(t / "gone.json", link)
    return link


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _truncated(t: Path) -> Path:
    full = _arrow(t, [{"instruction": f"q{i}" * 50, "output": "a" * 100} for i in range(5000)])
    data = full.read_bytes()
    cut = t / "cut.arrow"
    cut.write_bytes(data[: len(data) // 2])
    full.unlink()
    return cut


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_line(tmp_path, case):
    _, setup, words = case
    args = setup(tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "result.arrow"
    if "-o" not in args and args[:2] != ["data", "show"]:
        args = args + ["-o", out]
    line = bad(args)
    assert words.lower() in line.lower(), line
    after = {p for p in tmp_path.rglob("*")}
    assert after == before, f"left behind: {sorted(map(str, after - before))}"


def test_corpus_is_large_enough():
    from test_bad_options import OPTION_CASES

    assert len(CASES) >= 60 and len(CASES) + len(OPTION_CASES) >= 250


def _closed_fd(fd: int):
    return lambda: os.close(fd)


@pytest.mark.parametrize("args,fd,words", [
    (["data", "align"], 0, "stdin: empty input"),
    (["data", "show"], 0, "stdin: empty input"),
    (["data", "merge", "-"], 0, "stdin: empty input"),
])
def test_closed_stdin_is_one_line(tmp_path, args, fd, words):
    proc = subprocess.run(LMFORGE + args, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                          preexec_fn=_closed_fd(fd), cwd=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and words in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["data", "align"], ["data", "templates", "--json"], ["data", "show", "--stats"]])
def test_closed_stdout_is_one_line(tmp_path, args):
    src = write_jsonl(tmp_path / "a.jsonl", [ALPACA])
    ok(["data", "align", src, "-o", tmp_path / "a.arrow"])
    full = [*args, str(tmp_path / ("a.jsonl" if args[1] == "align" else "a.arrow"))] if args[1] != "templates" else args
    proc = subprocess.run(LMFORGE + full, capture_output=False, stderr=subprocess.PIPE, timeout=60,
                          preexec_fn=_closed_fd(1))
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "stdout is closed" in err and "Traceback" not in err, err


def test_chat_with_closed_stdin_ends_cleanly(tmp_path):
    from conftest import shared_path

    model = shared_path("models/stories260K")
    proc = subprocess.run(LMFORGE + ["chat", "-m", str(model), "--template", "default"], capture_output=True,
                          timeout=120, preexec_fn=_closed_fd(0))
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr


def test_truncated_safetensors_is_one_line(tmp_path):
    import shutil

    from conftest import shared_path

    model = tmp_path / "model"
    shutil.copytree(shared_path("models/stories260K"), model)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    line = bad(["model", "quantize", model, "-o", tmp_path / "q", "--method", "bnb-int8"])
    assert "truncated or corrupt" in line and not (tmp_path / "q").exists()
    weights.write_bytes(b"garbage" * 10)
    assert "truncated or corrupt" in bad(["model", "quantize", model, "-o", tmp_path / "q", "--method", "bnb-int8"])


def test_binary_output_to_a_terminal_is_refused(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [ALPACA])
    main, secondary = pty.openpty()
    proc = subprocess.run(LMFORGE + ["data", "align", str(src)], stdout=secondary, stderr=subprocess.PIPE,
                          timeout=60)
    os.close(secondary)
    os.close(main)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "refusing to write binary Arrow data to a terminal" in err
    assert "Traceback" not in err


def test_failure_midstream_poisons_the_pipe(tmp_path):
    """A failure after some batches went to stdout must not look like a complete stream."""
    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(10000)] + [{"instruction": 1, "output": "a"}]
    src = write_jsonl(tmp_path / "late.jsonl", rows)
    produced = subprocess.run(LMFORGE + ["data", "align", str(src)], capture_output=True, timeout=120)
    assert produced.returncode == 2 and len(produced.stdout) > 0
    line = bad(["data", "show", "-", "--rows", "0"], input=produced.stdout)
    assert "truncated or corrupt" in line


def test_debug_shows_the_traceback(tmp_path):
    from conftest import run

    result = run(["data", "align", tmp_path / "missing.json", "--debug"])
    assert result.returncode == 2 and b"Traceback" in result.stderr
