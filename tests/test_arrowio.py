"""The Arrow contract between tools: what we read, how we write."""

from __future__ import annotations

import pyarrow as pa
import pytest
from conftest import bad, ok, read_rows, write_jsonl

ROWS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(7)]


@pytest.fixture
def aligned_file(tmp_path):
    out = tmp_path / "a.arrow"
    ok(["data", "align", write_jsonl(tmp_path / "a.jsonl", ROWS), "-o", out])
    return out


def test_reads_arrow_file_format(tmp_path, aligned_file):
    table = pa.ipc.open_stream(pa.memory_map(str(aligned_file))).read_all()
    as_file = tmp_path / "file_format.arrow"
    with pa.OSFile(str(as_file), "wb") as sink:
        writer = pa.ipc.new_file(sink, table.schema)
        writer.write_table(table)
        writer.close()
    assert read_rows(ok(["data", "merge", as_file]).stdout) == read_rows(aligned_file)
    # and from stdin too
    assert read_rows(ok(["data", "merge", "-"], input=as_file.read_bytes()).stdout) == read_rows(aligned_file)


def test_reads_save_to_disk_directories(tmp_path, aligned_file):
    import datasets

    ds = datasets.Dataset.from_file(str(aligned_file))
    ds.save_to_disk(str(tmp_path / "saved"))
    rows = ok(["data", "show", tmp_path / "saved", "-n", "0"]).stdout.decode().splitlines()
    assert len(rows) == 7
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    assert "pass one split's directory" in bad(["data", "show", tmp_path / "dict"])
    # a saved dataset is also valid input to align (schema kept, metadata re-derived)
    out = ok(["data", "align", tmp_path / "saved"]).stdout
    assert len(read_rows(out)) == 7


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    rows = ROWS + [{"instruction": 3, "output": "x"}]
    target = tmp_path / "out.arrow"
    target.write_bytes(b"previous content")
    bad(["data", "align", write_jsonl(tmp_path / "b.jsonl", rows), "-o", target])
    assert target.read_bytes() == b"previous content"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.jsonl", "out.arrow"]


def test_summary_rides_in_a_final_empty_batch(aligned_file):
    from lmforge.shared.core.arrowio import open_arrow

    source = open_arrow(aligned_file)
    batches = list(source.batches())
    assert sum(b.num_rows for b in batches) == 7
    assert source.summary()["rows"] == 7


def test_unit_writer_and_reader_roundtrip(tmp_path):
    from lmforge.shared.core.arrowio import ArrowOutput, open_arrow
    from lmforge.shared.data.aligned import Builder

    builder = Builder("kto")
    builder.add([("user", "q")], [("assistant", "a")], "sys", "", True)
    builder.add([("user", "q2")], [("assistant", "b")], "", "", False)
    batch = builder.flush()
    path = tmp_path / "k.arrow"
    with ArrowOutput(path, batch.schema, {"kind": "aligned", "stage": "kto"}) as out:
        out.write(batch)
    source = open_arrow(path)
    assert source.meta == {"kind": "aligned", "stage": "kto"}
    assert [r["label"] for r in source.rows()] == [True, False]
