"""Nothing half-written is taken for whole: streams cut anywhere, producers killed in a pipe,
SIGTERM/SIGHUP, leftovers of killed processes, two writers of one output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import LMFORGE, bad, ok, write_jsonl

ROWS = [{"instruction": f"question {i} " * 3, "output": f"answer {i}"} for i in range(9000)]


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """An aligned dataset of three record batches (4,096 rows each at most)."""
    work = tmp_path_factory.mktemp("big")
    out = work / "big.arrow"
    ok(["data", "align", write_jsonl(work / "big.jsonl", ROWS), "-o", out])
    return out


def _cut_after_batches(source: Path, target: Path, batches: int) -> Path:
    """What a producer killed between two record batches leaves: valid Arrow, fewer rows, no end."""
    reader = pa.ipc.open_stream(pa.memory_map(str(source)))
    with pa.OSFile(str(target), "wb") as sink:
        writer = pa.ipc.new_stream(sink, reader.schema)
        for _ in range(batches):
            writer.write_batch(reader.read_next_batch())
        writer.close()   # even the IPC end-of-stream mark is there: only lmforge's end marker is missing
    return target


def test_every_lmforge_stream_ends_with_its_marker(big):
    from lmforge.shared.core.arrowio import STREAM_KEY, open_arrow

    source = open_arrow(big)
    assert STREAM_KEY in source.schema.metadata
    assert source.check_complete() == 9000


@pytest.mark.parametrize("batches", [1, 2])
def test_a_stream_cut_at_a_batch_boundary_is_refused_by_every_reader(big, tmp_path, batches):
    from conftest import shared_path

    model = shared_path("models/stories260K")
    cut = _cut_after_batches(big, tmp_path / "cut.arrow", batches)
    for args in (["data", "show", cut, "--stats"], ["data", "show", cut, "-n", "0"],
                 ["data", "merge", cut, "-o", tmp_path / "m.arrow"],
                 ["data", "split", cut, "-o", tmp_path / "split"],
                 ["data", "pack", cut, "-m", model, "-t", "default", "-o", tmp_path / "p.arrow"]):
        line = bad(args)
        assert "truncated" in line and "regenerate it" in line, (args, line)
    assert not (tmp_path / "m.arrow").exists() and not (tmp_path / "split").exists()
    # through a pipe too
    line = bad(["data", "merge", "-", "-o", tmp_path / "m.arrow"], input=cut.read_bytes())
    assert "truncated" in line


def test_packed_data_cut_is_refused_by_train_and_eval(tmp_path):
    from conftest import shared_path

    base = shared_path("models/stories260K")
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(5000)])
    ok(["data", "align", src, "-o", tmp_path / "a.arrow"])
    ok(["data", "pack", tmp_path / "a.arrow", "-m", base, "-t", "default", "--cutoff", "32", "-o", tmp_path / "p.arrow"])
    cut = _cut_after_batches(tmp_path / "p.arrow", tmp_path / "cut.arrow", 1)
    for args in (["train", "sft", "-m", base, "-d", cut, "-o", tmp_path / "run", "--max-steps", "1"],
                 ["eval", "perplexity", "-m", base, "-d", cut],
                 ["data", "stats", cut]):
        line = bad(args)
        assert "truncated" in line, (args, line)
    assert not (tmp_path / "run").exists()
    # cut in the middle of a message: one line too, never a raw OSError
    data = (tmp_path / "p.arrow").read_bytes()
    (tmp_path / "mid.arrow").write_bytes(data[: len(data) * 2 // 3])
    line = bad(["train", "sft", "-m", base, "-d", tmp_path / "mid.arrow", "-o", tmp_path / "run", "--max-steps", "1"])
    assert "truncated" in line


def test_foreign_arrow_without_the_marker_is_read_as_before(tmp_path):
    table = pa.table({"prompt": [[{"role": "user", "content": "q"}]], "response": [[{"role": "assistant", "content": "a"}]],
                      "system": [""], "tools": [""]})
    path = tmp_path / "foreign.arrow"
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_stream(sink, table.schema)
        writer.write_table(table)
        writer.close()
    assert ok(["data", "show", path, "-n", "0"]).stdout.count(b"\n") == 1


_KILLED_PRODUCER = """
import os, signal, sys
import pyarrow as pa
reader = pa.ipc.open_stream(pa.memory_map(sys.argv[1]))
out = pa.ipc.new_stream(sys.stdout.buffer, reader.schema)
out.write_batch(reader.read_next_batch())
sys.stdout.buffer.flush()
os.kill(os.getpid(), signal.SIGKILL)   # killed between two batches, as `kill -9` would
"""


def test_a_pipe_whose_producer_is_killed_fails_the_consumer(big, tmp_path):
    producer = subprocess.Popen([sys.executable, "-c", _KILLED_PRODUCER, str(big)], stdout=subprocess.PIPE)
    consumer = subprocess.run(LMFORGE + ["data", "merge", "-", "-o", str(tmp_path / "m.arrow")],
                              stdin=producer.stdout, capture_output=True, timeout=120)
    producer.wait()
    assert producer.returncode == -signal.SIGKILL
    assert consumer.returncode == 2, consumer.stderr
    assert b"truncated" in consumer.stderr and b"Traceback" not in consumer.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_signals_clean_up_like_ctrl_c(big, tmp_path, sig, code):
    """A command blocked on its input, with a half-written output, stopped by a signal: the
    output's temporary is removed and the exit code says which signal."""
    reader = pa.ipc.open_stream(pa.memory_map(str(big)))
    # the signals' default dispositions in the child: a SIGINT ignored by this process (as some earlier test
    # or a background job's shell may leave it) would be inherited, and Python then installs no Ctrl-C handler
    proc = subprocess.Popen(LMFORGE + ["data", "merge", "-", "-o", str(tmp_path / "m.arrow")],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (sig, signal.SIGINT)])
    assert proc.stdin is not None
    writer = pa.ipc.new_stream(proc.stdin, reader.schema)
    writer.write_batch(reader.read_next_batch())
    proc.stdin.flush()
    deadline = time.time() + 60
    while not any(p.name.startswith(".m.arrow.tmp-") for p in tmp_path.iterdir()):
        assert time.time() < deadline and proc.poll() is None, "merge never started writing"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(sig)
    try:   # let it stop on the signal with its input still open: closing stdin first races the signal
        proc.wait(timeout=15)   # (a loaded machine may not schedule it for a while)
    except subprocess.TimeoutExpired:
        pass
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert b"Traceback" not in err and err.decode().count("error: ") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_leftovers_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".out.arrow.tmp-{dead.pid}").write_bytes(b"half")
    (tmp_path / f".other.arrow.tmp-{dead.pid}").mkdir()
    alive = tmp_path / f".mine.tmp-{os.getpid()}"
    alive.write_bytes(b"in use")
    ok(["data", "align", write_jsonl(tmp_path / "a.jsonl", ROWS[:3]), "-o", tmp_path / "out.arrow"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "a.jsonl", "out.arrow"]


def test_one_writer_per_output(tmp_path):
    """A second process writing the same output is refused, naming the first one's pid."""
    from lmforge.shared.core import rundir

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from lmforge.shared.core import rundir\n"
        f"out = Path({str(tmp_path / 'run')!r}); rundir.prepare(out, overwrite=False, resume=False)\n"
        f"rundir.lock(Path({str(tmp_path / '.x.arrow.lock')!r}), 'x')\n"
        "print('ready', flush=True); time.sleep(60)")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"ready"
        (tmp_path / "run" / "partial.bin").write_bytes(b"the running run's files")
        for extra in ([], ["--overwrite"], ["--resume"]):   # a fresh process once; in this one after
            line = bad(["train", "sft", "-m", "m", "-d", "d.arrow", "-o", tmp_path / "run", *extra], fresh=not extra)
            assert f"another lmforge process (pid {holder.pid})" in line, line
        assert (tmp_path / "run" / "partial.bin").exists()   # --overwrite emptied nothing
        line = bad(["data", "align", write_jsonl(tmp_path / "a.jsonl", ROWS[:2]), "-o", tmp_path / "x.arrow"])
        assert f"pid {holder.pid}" in line and not (tmp_path / "x.arrow").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock went with it
    assert rundir.prepare(tmp_path / "run2", overwrite=False, resume=False) is None
    ok(["data", "align", write_jsonl(tmp_path / "a.jsonl", ROWS[:2]), "-o", tmp_path / "x.arrow"])
    assert not (tmp_path / ".x.arrow.lock").exists()


def test_a_run_killed_before_its_first_checkpoint_starts_afresh(tmp_path):
    """What `kill -9` leaves before the first checkpoint (the start mark, a log, no checkpoint)
    is accepted by the same command: a rerun starts afresh, and so does --resume, with a note."""
    from lmforge.shared.core import rundir

    for resume in (False, True):
        out = tmp_path / f"run{resume}"
        out.mkdir()
        (out / rundir.BEGUN).write_text("12345\n")
        (out / "trainer_log.jsonl").write_text('{"step": 1}\n')
        (out / rundir.LOCK).write_text("12345\n")
        assert rundir.prepare(out, overwrite=False, resume=resume) is None
        assert sorted(p.name for p in out.iterdir()) == [rundir.LOCK]
        rundir.unlock(out / rundir.LOCK)
    # a directory lmforge did not start is still refused
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="exists and is not empty"):
        rundir.prepare(foreign, overwrite=False, resume=False)
    rundir.unlock(foreign / rundir.LOCK)


@pytest.mark.slow
def test_train_killed_with_sigkill_before_a_checkpoint_reruns(tmp_path):
    from conftest import shared_path

    base = shared_path("models/stories260K")
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(64)])
    ok(["data", "align", src, "-o", tmp_path / "a.arrow"])
    ok(["data", "pack", tmp_path / "a.arrow", "-m", base, "-t", "default", "--cutoff", "32", "-o", tmp_path / "p.arrow"])
    out = tmp_path / "run"
    args = ["train", "sft", "-m", str(base), "-d", str(tmp_path / "p.arrow"), "-o", str(out), "--max-steps", "400",
            "--save-steps", "1000", "--batch-size", "2", "--grad-accum", "1", "--logging-steps", "1"]
    proc = subprocess.Popen(LMFORGE + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "trainer_log.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "lmforge.json").exists()
    short = [a if a != "400" else "2" for a in args]
    result = ok(short, fresh=True)
    assert (out / "lmforge.json").exists() and b"starting afresh" in result.stderr
