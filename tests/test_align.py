"""`lmforge data align` on real LLaMA-Factory data and on every supported shape."""

from __future__ import annotations

import json

import pytest
from conftest import bad, ok, read_meta, read_rows, shared_path, write_jsonl

LF = "data/llamafactory"


def _slim(messages: list[dict]) -> list[dict]:
    """Aligned messages without their unset (None) fields, for comparing with literals."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


@pytest.mark.parametrize("name, rows, stage", [
    ("alpaca_en_demo.json", 999, "sft"),
    ("identity.json", 91, "sft"),
    ("dpo_en_demo.json", 300, "pairwise"),
    ("kto_en_demo.json", 300, "kto"),
    ("glaive_toolcall_en_demo.json", 300, "sft"),
    ("c4_demo.jsonl", 300, "pt"),
    ("wiki_demo.txt", 30, "pt"),
])
def test_demo_files_align_with_right_counts(tmp_path, name, rows, stage):
    src = shared_path(f"{LF}/{name}")
    out = tmp_path / "out.arrow"
    ok(["data", "align", src, "-o", out])
    data = read_rows(out)
    meta = read_meta(out)
    assert len(data) == rows
    assert meta["kind"] == "aligned" and meta["stage"] == stage
    assert meta["provenance"][0]["command"] == "data align"
    if stage == "pairwise":
        assert all(len(r["response"]) == 2 for r in data)
        assert all(r["prompt"][-1]["role"] == "user" for r in data)
    if stage == "pt":
        assert all(r["prompt"] == [] and r["response"][0]["content"].strip() for r in data)


def test_kto_labels_are_balanced(tmp_path):
    out = tmp_path / "kto.arrow"
    ok(["data", "align", shared_path(f"{LF}/kto_en_demo.json"), "-o", out])
    labels = [r["label"] for r in read_rows(out)]
    assert labels.count(True) == 150 and labels.count(False) == 150


def test_glaive_tool_calls_and_observations(tmp_path):
    out = tmp_path / "glaive.arrow"
    ok(["data", "align", shared_path(f"{LF}/glaive_toolcall_en_demo.json"), "-o", out])
    data = read_rows(out)
    with_tools = [r for r in data if r["tools"]]
    assert len(with_tools) == 191  # the others have "tools": "[]"
    roles = {m["role"] for r in data for m in r["prompt"] + r["response"]}
    assert roles == {"user", "assistant", "tool"}
    for r in data:
        for i, m in enumerate(r["prompt"]):
            for call in m["tool_calls"] or []:
                assert m["role"] == "assistant" and m["content"] is None and call["name"]
                assert isinstance(json.loads(call["arguments"]), dict)
            if m["role"] == "tool":
                assert r["prompt"][i - 1]["tool_calls"]
        for tool in json.loads(r["tools"] or "[]"):
            assert tool["type"] == "function" and "name" in tool["function"]


def test_every_present_dataset_info_entry_aligns(tmp_path):
    info_path = shared_path(f"{LF}/dataset_info.json")
    info = json.loads(info_path.read_text())
    present = [n for n, e in info.items() if e.get("file_name") and (info_path.parent / e["file_name"]).exists()]
    assert len(present) >= 7
    expected = {"alpaca_en_demo": 999, "identity": 91, "dpo_en_demo": 300, "kto_en_demo": 300,
                "glaive_toolcall_en_demo": 300, "c4_demo": 300, "wiki_demo": 30}
    for name in present:
        out = tmp_path / f"{name}.arrow"
        ok(["data", "align", "--dataset-info", info_path, "--name", name, "-o", out])
        if name in expected:
            assert len(read_rows(out)) == expected[name], name
    assert read_meta(tmp_path / "dpo_en_demo.arrow")["stage"] == "pairwise"
    assert read_meta(tmp_path / "kto_en_demo.arrow")["stage"] == "kto"
    assert read_meta(tmp_path / "wiki_demo.arrow")["stage"] == "pt"


def test_dataset_info_and_direct_alignment_agree(tmp_path):
    info = shared_path(f"{LF}/dataset_info.json")
    a, b = tmp_path / "a.arrow", tmp_path / "b.arrow"
    ok(["data", "align", "--dataset-info", info, "--name", "glaive_toolcall_en_demo", "-o", a])
    ok(["data", "align", shared_path(f"{LF}/glaive_toolcall_en_demo.json"), "-o", b])
    assert read_rows(a) == read_rows(b)


def test_alpaca_semantics(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add", "input": "1 2", "output": "3", "system": "be brief",
         "history": [["hi", "hello"]]},
        {"instruction": "Just this", "input": "", "output": "ok"},
    ])
    rows = read_rows(ok(["data", "align", src]).stdout)
    assert _slim(rows[0]["prompt"]) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                        {"role": "user", "content": "Add\n1 2"}]
    assert rows[0]["system"] == "be brief"
    assert _slim(rows[1]["prompt"]) == [{"role": "user", "content": "Just this"}]
    assert _slim(rows[1]["response"]) == [{"role": "assistant", "content": "ok"}]


def test_openai_messages_with_tool_calls(tmp_path):
    src = write_jsonl(tmp_path / "o.jsonl", [{"messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "{\"temp\": 20}"},
        {"role": "assistant", "content": "It is 20 degrees."}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}]}])
    result = ok(["data", "align", src])
    assert b"detected openai" in result.stderr
    row = read_rows(result.stdout)[0]
    assert row["system"] == "sys"
    assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "tool"]
    assert row["prompt"][1]["content"] is None
    assert row["prompt"][1]["tool_calls"] == [{"id": None, "name": "weather", "arguments": '{"city": "Paris"}'}]
    assert json.loads(row["tools"])[0]["function"]["name"] == "weather"


def test_pairwise_shapes(tmp_path):
    shapes = {
        "alpaca_cols.jsonl": [{"instruction": "q", "chosen": "good", "rejected": "bad"}],
        "alpaca_list.jsonl": [{"instruction": "q", "output": ["good", "bad"]}],
        "trl.jsonl": [{"prompt": "q", "chosen": "good", "rejected": "bad"}],
        "sharegpt.jsonl": [{"conversations": [{"from": "human", "value": "q"}],
                            "chosen": {"from": "gpt", "value": "good"},
                            "rejected": {"from": "gpt", "value": "bad"}}],
    }
    for name, rows in shapes.items():
        src = write_jsonl(tmp_path / name, rows)
        out = ok(["data", "align", src, "--format", "pairwise"]).stdout
        row = read_rows(out)[0]
        assert [m["content"] for m in row["response"]] == ["good", "bad"], name
        assert _slim(row["prompt"]) == [{"role": "user", "content": "q"}], name
        assert read_meta(out)["stage"] == "pairwise"


def test_columns_and_tags_remapping(tmp_path):
    src = write_jsonl(tmp_path / "x.jsonl", [{"question": "2+2?", "answer": "4"}])
    row = read_rows(ok(["data", "align", src, "--columns", "instruction=question,output=answer"]).stdout)[0]
    assert row["prompt"][0]["content"] == "2+2?" and row["response"][0]["content"] == "4"
    chat = write_jsonl(tmp_path / "c.jsonl", [{"dialog": [{"speaker": "me", "text": "hi"},
                                                         {"speaker": "bot", "text": "hello"}]}])
    row = read_rows(ok(["data", "align", chat, "--format", "sharegpt", "--columns", "messages=dialog",
                        "--tags", "role=speaker,content=text,user=me,assistant=bot"]).stdout)[0]
    assert _slim(row["prompt"]) == [{"role": "user", "content": "hi"}]
    assert _slim(row["response"]) == [{"role": "assistant", "content": "hello"}]


def test_csv_parquet_arrow_and_directory_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
    csv = tmp_path / "d" / "a.csv"
    csv.parent.mkdir()
    csv.write_text("instruction,input,output\n" + "".join(f"q{i},,a{i}\n" for i in range(5)))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d" / "b.parquet")
    out = ok(["data", "align", tmp_path / "d"]).stdout
    assert len(read_rows(out)) == 10
    # our own output is valid input: re-aligning is the identity
    first = tmp_path / "first.arrow"
    (first).write_bytes(out)
    again = ok(["data", "align", first]).stdout
    assert read_rows(again) == read_rows(out)


def test_several_inputs_and_stdin(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "1"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "b", "output": "2"}])
    out = ok(["data", "align", a, b]).stdout
    assert [r["prompt"][0]["content"] for r in read_rows(out)] == ["a", "b"]
    piped = ok(["data", "align", "-"], input=a.read_bytes()).stdout
    assert read_rows(piped) == read_rows(out)[:1]


def test_skip_invalid_reports_reasons(tmp_path):
    rows = [{"instruction": "ok", "output": "fine"}, {"instruction": "", "output": "x"},
            {"instruction": "y", "output": ""}, {"instruction": 3, "output": "x"},
            {"instruction": "ok2", "output": "fine2"}]
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    result = ok(["data", "align", src, "--skip-invalid"])
    assert len(read_rows(result.stdout)) == 2
    err = result.stderr.decode()
    assert "skipped 3 invalid row(s)" in err and "line 2" in err


def test_max_samples_first_and_random(tmp_path):
    src = write_jsonl(tmp_path / "m.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(100)])
    first = read_rows(ok(["data", "align", src, "--max-samples", "5"]).stdout)
    assert [r["prompt"][0]["content"] for r in first] == [f"q{i}" for i in range(5)]
    r1 = read_rows(ok(["data", "align", src, "--max-samples", "5", "--sample", "random", "--seed", "1"]).stdout)
    r2 = read_rows(ok(["data", "align", src, "--max-samples", "5", "--sample", "random", "--seed", "1"]).stdout)
    r3 = read_rows(ok(["data", "align", src, "--max-samples", "5", "--sample", "random", "--seed", "2"]).stdout)
    assert r1 == r2 and r1 != r3 and len(r1) == 5
    indexes = [int(r["prompt"][0]["content"][1:]) for r in r1]
    assert indexes == sorted(indexes)  # input order kept


def test_same_inputs_give_byte_identical_output(tmp_path):
    src = shared_path(f"{LF}/alpaca_en_demo.json")
    assert ok(["data", "align", src]).stdout == ok(["data", "align", src]).stdout


def test_datasets_reads_our_output(tmp_path):
    import datasets

    out = tmp_path / "glaive.arrow"
    ok(["data", "align", shared_path(f"{LF}/glaive_toolcall_en_demo.json"), "-o", out])
    ds = datasets.Dataset.from_file(str(out))
    assert len(ds) == 300 and set(ds.column_names) == {"prompt", "response", "system", "tools"}
    assert ds[0]["prompt"][0]["role"] == "user"


def test_config_file_supplies_options_and_flags_win(tmp_path):
    src = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}, {"question": "q2", "answer": "b"}])
    cfg = tmp_path / "align.yaml"
    cfg.write_text("columns: instruction=question,output=answer\nmax-samples: 1\n")
    assert len(read_rows(ok(["data", "align", src, "--config", cfg]).stdout)) == 1
    assert len(read_rows(ok(["data", "align", src, "--config", cfg, "--max-samples", "2"]).stdout)) == 2
    cfg.write_text("colums: x\n")
    assert "no option 'colums'" in bad(["data", "align", src, "--config", cfg])


def test_llamafactory_v1_preference_rows_align(tmp_path):
    """LLaMA-Factory v1's DPO rows: two whole conversations (chosen_messages, rejected_messages) of
    parts with a `value` and a loss_weight; the shared turns are the prompt, the system turn the
    system prompt, the last turns the two answers."""
    def turn(role, text, weight):
        return {"role": role, "content": [{"type": "text", "value": text}], "loss_weight": weight}

    shared = [turn("system", "Be brief.", 0.0), turn("user", "Capital of France?", 0.0)]
    row = {"chosen_messages": [*shared, turn("assistant", "Paris.", 1.0)],
           "rejected_messages": [*shared, turn("assistant", "Lyon.", 1.0)]}
    got = read_rows(ok(["data", "align", write_jsonl(tmp_path / "v1.jsonl", [row])]).stdout)[0]
    assert got["system"] == "Be brief." and [m["content"] for m in got["prompt"]] == ["Capital of France?"]
    assert [m["content"] for m in got["response"]] == ["Paris.", "Lyon."]
    bad_row = {**row, "rejected_messages": [turn("user", "Capital of Spain?", 0.0), turn("assistant", "Madrid.", 1.0)]}
    assert "differ before their last turn" in bad(["data", "align", write_jsonl(tmp_path / "b.jsonl", [bad_row])])


def test_a_tool_result_after_a_call_written_in_text_aligns(tmp_path):
    """LLaMA-Factory's glaive data has rows whose call is in the assistant's text, then the tool's
    result: LLaMA-Factory trains them as they are, and so does lmforge; a result after a user turn
    is still refused."""
    row = {"conversations": [{"from": "human", "value": "20% off 200?"},
                             {"from": "gpt", "value": "Let me compute: calculate_discount {\"price\": 200}"},
                             {"from": "observation", "value": "{\"price\": 160}"},
                             {"from": "gpt", "value": "You pay 160."}], "tools": "[]"}
    got = read_rows(ok(["data", "align", write_jsonl(tmp_path / "g.jsonl", [row])]).stdout)[0]
    assert [m["role"] for m in got["prompt"]] == ["user", "assistant", "tool"]
    row["conversations"][1:2] = []
    assert "tool result at turn 2 does not follow an assistant turn" in bad(
        ["data", "align", write_jsonl(tmp_path / "h.jsonl", [row])])
