"""`data merge`, `data split`, `data show`, and pipelines through real shell pipes."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import LMFORGE, bad, ok, read_meta, read_rows, shared_path, write_jsonl


def _aligned(tmp_path, name: str, n: int, stage: str = "sft"):
    if stage == "pairwise":
        rows = [{"instruction": f"{name}{i}", "chosen": "c", "rejected": "r"} for i in range(n)]
    else:
        rows = [{"instruction": f"{name}{i}", "output": "x"} for i in range(n)]
    src = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    out = tmp_path / f"{name}.arrow"
    ok(["data", "align", src, "-o", out])
    return out


def _names(data: bytes) -> list[str]:
    return [r["prompt"][0]["content"] for r in read_rows(data)]


def test_concat_keeps_order_and_records_provenance(tmp_path):
    a, b = _aligned(tmp_path, "a", 3), _aligned(tmp_path, "b", 2)
    out = ok(["data", "merge", a, b]).stdout
    assert _names(out) == ["a0", "a1", "a2", "b0", "b1"]
    step = read_meta(out)["provenance"][-1]
    assert step["command"] == "data merge"
    assert [i["provenance"][0]["command"] for i in step["inputs"]] == ["data align", "data align"]


def test_interleave_under_and_over(tmp_path):
    a, b = _aligned(tmp_path, "a", 3), _aligned(tmp_path, "b", 1)
    under = _names(ok(["data", "merge", a, b, "--mix", "interleave-under"]).stdout)
    assert under == ["a0", "b0"]  # stops as soon as b runs out
    over = _names(ok(["data", "merge", a, b, "--mix", "interleave-over"]).stdout)
    assert over == ["a0", "b0", "a1", "b0", "a2", "b0"]  # b restarts until a is used up too (whole rounds)


def _interleaved(path_rows: list[list[str]], strategy: str, probs, seed: int) -> list[str]:
    import datasets

    sets = [datasets.Dataset.from_dict({"name": names}) for names in path_rows]
    return datasets.interleave_datasets(sets, probabilities=probs, seed=seed,
                                        stopping_strategy=strategy)["name"]



@pytest.mark.parametrize("mix,strategy", [("interleave-under", "first_exhausted"),
                                          ("interleave-over", "all_exhausted")])
@pytest.mark.parametrize("probs", [None, [0.3, 0.7], [0.9, 0.1]])
def test_interleaving_equals_datasets_interleave_datasets(tmp_path, mix, strategy, probs):
    """The README promises datasets' semantics: the same rows in the same order, for the same seed."""
    sizes = (91, 999) if mix == "interleave-under" else (91, 233)
    a, b = _aligned(tmp_path, "a", sizes[0]), _aligned(tmp_path, "b", sizes[1])
    args = ["data", "merge", a, b, "--mix", mix, "--seed", "7"]
    if probs:
        args += ["--probs", ",".join(map(str, probs))]
    ours = _names(ok(args).stdout)
    theirs = _interleaved([[f"a{i}" for i in range(sizes[0])], [f"b{i}" for i in range(sizes[1])]],
                          strategy, probs, 7)
    assert ours == theirs


def test_interleave_with_probs_is_seeded(tmp_path):
    a, b = _aligned(tmp_path, "a", 400), _aligned(tmp_path, "b", 400)
    args = ["data", "merge", a, b, "--mix", "interleave-under", "--probs", "0.8,0.2"]
    one = ok(args + ["--seed", "3"]).stdout
    assert one == ok(args + ["--seed", "3"]).stdout
    assert one != ok(args + ["--seed", "4"]).stdout
    names = _names(one)
    share_a = sum(n.startswith("a") for n in names) / len(names)
    assert 0.7 < share_a < 0.9
    assert len(names) < 800  # stopped when a ran out


def test_merge_reads_stdin(tmp_path):
    a, b = _aligned(tmp_path, "a", 2), _aligned(tmp_path, "b", 2)
    out = ok(["data", "merge", "-", b], input=a.read_bytes()).stdout
    assert _names(out) == ["a0", "a1", "b0", "b1"]
    over = ok(["data", "merge", "-", b, "--mix", "interleave-over"], input=_aligned(tmp_path, "c", 1).read_bytes())
    assert _names(over.stdout) == ["c0", "b0", "c0", "b1"]


def test_split_sizes_determinism_and_order(tmp_path):
    src = _aligned(tmp_path, "r", 100)
    out1 = ok(["data", "split", src, "--val-size", "0.2", "-o", tmp_path / "s1"]).stdout.decode().strip()
    ok(["data", "split", src, "--val-size", "0.2", "-o", tmp_path / "s2"])
    assert out1 == str(tmp_path / "s1")
    train, val = read_rows(tmp_path / "s1/train.arrow"), read_rows(tmp_path / "s1/val.arrow")
    assert len(train) == 80 and len(val) == 20
    assert (tmp_path / "s1/val.arrow").read_bytes() == (tmp_path / "s2/val.arrow").read_bytes()
    names = [r["prompt"][0]["content"] for r in train + val]
    assert sorted(names) == sorted(f"r{i}" for i in range(100))
    idx = [int(r["prompt"][0]["content"][1:]) for r in val]
    assert idx == sorted(idx)
    counted = ok(["data", "split", src, "--val-size", "7", "-o", tmp_path / "s3"])
    assert counted.returncode == 0 and len(read_rows(tmp_path / "s3/val.arrow")) == 7
    assert read_meta(tmp_path / "s3/val.arrow")["provenance"][-1]["part"] == "val"


def test_show_rows_schema_stats(tmp_path):
    src = _aligned(tmp_path, "s", 12)
    lines = ok(["data", "show", src, "-n", "3"]).stdout.decode().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["prompt"][0]["content"] == "s0"
    assert len(ok(["data", "show", src, "-n", "0"]).stdout.decode().splitlines()) == 12
    schema = json.loads(ok(["data", "show", src, "--schema", "--json"]).stdout)
    assert schema["lmforge"]["kind"] == "aligned" and "prompt" in schema["columns"]
    stats = json.loads(ok(["data", "show", src, "--stats", "--json"]).stdout)
    assert stats["rows"] == 12 and stats["stage"] == "sft" and stats["summary"]["rows"] == 12
    text = ok(["data", "show", src, "--stats"]).stdout.decode()
    assert "rows: 12" in text and "pipeline: data align" in text


def test_real_pipeline_align_merge_show(tmp_path):
    """Through a real shell pipe: align | merge - other | show."""
    alpaca = shared_path("data/llamafactory/alpaca_en_demo.json")
    identity = shared_path("data/llamafactory/identity.json")
    other = tmp_path / "identity.arrow"
    ok(["data", "align", identity, "-o", other])
    lm = " ".join(LMFORGE)
    script = (f"set -o pipefail; {lm} data align {alpaca} | {lm} data merge - {other} "
              f"| {lm} data show --stats --json")
    result = subprocess.run(["bash", "-c", script], capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    stats = json.loads(result.stdout)
    assert stats["rows"] == 999 + 91
    assert stats["pipeline"] == ["(data align + data align) | data merge"]


def test_show_head_closes_pipe_quietly(tmp_path):
    src = _aligned(tmp_path, "h", 5000)
    lm = " ".join(LMFORGE)
    result = subprocess.run(["bash", "-c", f"{lm} data show {src} -n 0 | head -1"], capture_output=True, timeout=120)
    assert result.returncode == 0 and b"Traceback" not in result.stderr and result.stdout.count(b"\n") == 1


def test_merge_refuses_data_without_metadata(tmp_path):
    import pyarrow as pa

    plain = tmp_path / "plain.arrow"
    with pa.OSFile(str(plain), "wb") as f:
        table = pa.table({"x": [1]})
        writer = pa.ipc.new_stream(f, table.schema)
        writer.write_table(table)
        writer.close()
    assert "no lmforge metadata" in bad(["data", "merge", plain, plain, "-o", tmp_path / "o.arrow"])
