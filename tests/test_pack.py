"""`data pack` and `data stats`: exact ids, loss masks, truncation, packing, every stage."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from lmforge.shared.core.commands.data import DataPack
from conftest import aligned, bad, ok, read_meta, read_rows, shared_path, word_tokenizer

LF = "data/llamafactory"
IGNORE = -100
CHATML = ["<|im_start|>", "<|im_end|>"]
WORDS = ["user", "assistant", "system", "hi", "hello", "bye", "ciao", "be", "brief", "one", "two",
         "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@pytest.fixture(scope="module")
def words_model(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"), WORDS, CHATML, eos="<|im_end|>")


def _ids(tokdir, *words):
    vocab = json.loads((tokdir / "tokenizer.json").read_text())["model"]["vocab"]
    return [vocab[w] for w in words]


TWO_TURNS = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                               {"from": "human", "value": "bye"}, {"from": "gpt", "value": "ciao"}]}


def test_two_turn_ids_and_labels_by_hand(tmp_path, words_model):
    data = aligned(tmp_path, "two", [TWO_TURNS])
    rows = read_rows(ok(["data", "pack", data, "-m", words_model, "-t", "chatml"]).stdout)
    ids = _ids(words_model, "<|im_start|>", "user", "hi", "<|im_end|>", "<|im_start|>", "assistant", "hello",
               "<|im_end|>", "<|im_start|>", "user", "bye", "<|im_end|>", "<|im_start|>", "assistant", "ciao",
               "<|im_end|>")
    hello, ciao, end = _ids(words_model, "hello", "ciao", "<|im_end|>")
    assert rows[0]["input_ids"] == ids
    # loss on every assistant answer and its end-of-turn token, nowhere else
    assert rows[0]["labels"] == [IGNORE] * 6 + [hello, end] + [IGNORE] * 6 + [ciao, end]
    assert rows[0]["lengths"] == [len(ids)]
    history = read_rows(ok(["data", "pack", data, "-m", words_model, "-t", "chatml", "--mask-history"]).stdout)
    assert history[0]["labels"] == [IGNORE] * 14 + [ciao, end]
    everything = read_rows(ok(["data", "pack", data, "-m", words_model, "-t", "chatml", "--train-on-prompt"]).stdout)
    assert everything[0]["labels"] == ids


def test_eos_appended_for_templates_ending_in_eos(tmp_path, words_model):
    data = aligned(tmp_path, "one", [{"instruction": "hi", "output": "hello"}])
    row = read_rows(ok(["data", "pack", data, "-m", words_model, "-t", "default"]).stdout)[0]
    hello, end = _ids(words_model, "hello", "<|im_end|>")
    assert row["labels"][-2:] == [hello, end]  # default ends the answer with the tokenizer's EOS
    assert [x for x in row["labels"] if x != IGNORE] == [hello, end]


def _conversations(path, limit=None):
    from lmforge.shared.data.aligned import turns_of

    rows = read_rows(path)[:limit]
    return [(turns_of(r["prompt"]) + turns_of(r["response"]), r["system"], r["tools"]) for r in rows]


CONFORMANCE = [("tokenizers/qwen3", "qwen3"), ("tokenizers/llama3", "llama3"),
               ("models/smollm2-135m-instruct", "smollm")]


def _conformance_rows(tmp_path, tools: bool) -> list[dict]:
    """Aligned rows from the demo data: single- and multi-turn, with and without a system
    prompt; with tool definitions, calls and results when the template supports them."""
    rows = []
    for name, limit in (("alpaca_en_demo.json", 120), ("identity.json", 40), ("glaive_toolcall_en_demo.json", 300)):
        data = tmp_path / f"{name}.arrow"
        ok(["data", "align", shared_path(f"{LF}/{name}"), "-o", data])
        for r in read_rows(data)[:limit]:
            roles = {m["role"] for m in r["prompt"] + r["response"]}
            if not tools and (r["tools"] or roles - {"user", "assistant"}):
                continue
            rows.append(r)
            rows.append({**r, "system": "You answer briefly."})
    return rows


@pytest.mark.parametrize("model, template", CONFORMANCE, ids=[c[1] for c in CONFORMANCE])
def test_named_templates_match_apply_chat_template(tmp_path, model, template):
    """Our named template gives exactly the ids of the tokenizer's own chat template, on many
    multi-turn conversations, with and without a system prompt (and with tools for Qwen3), on
    both tokenizer paths (the tiktoken fast path, when installed, and Hugging Face's)."""
    import pyarrow as pa
    from lmforge.shared.data import pack
    from lmforge.shared.data.aligned import schema, turns_of
    from lmforge.shared.data.jinja_template import to_messages
    from transformers import AutoTokenizer

    tokdir = shared_path(model)
    tokenizer = AutoTokenizer.from_pretrained(str(tokdir))
    rows = _conformance_rows(tmp_path, tools=template == "qwen3")
    expected = []
    for r in rows:
        # Qwen3's template needs text content (None fails inside it): "" for tool-call-only turns
        messages = to_messages(turns_of(r["prompt"]) + turns_of(r["response"]), r["system"], null_content="")
        ids = tokenizer.apply_chat_template(messages, tools=json.loads(r["tools"]) if r["tools"] else None,
                                            tokenize=True)
        expected.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    batch = pa.RecordBatch.from_pylist(rows, schema=schema("sft"))
    encoder = pack.Encoder(DataPack(model=str(tokdir), template=template, cutoff=100_000), tokenizer=tokenizer)
    paths = {"hf": None}
    if encoder.fast is not None:
        paths["fast"] = encoder.fast
    for path, fast in paths.items():
        encoder.fast = fast
        cols, counts = encoder.encode((0, batch))
        got = [list(x) for x in cols.examples("input_ids")]
        assert counts.dropped == 0 and len(got) == len(expected)
        for i, (a, b) in enumerate(zip(got, expected)):
            assert a == b, f"{path} path: row {i} differs"
        if fast is not None:
            assert fast.enabled, "the fast path disagreed with the Hugging Face tokenizer"
    assert len(rows) >= 300


def test_auto_template_uses_the_tokenizers_own_and_masks_answers(tmp_path):
    tokdir = shared_path("models/smollm2-135m-instruct")
    from lmforge.shared.data.jinja_template import to_messages
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokdir))
    data = tmp_path / "a.arrow"
    ok(["data", "align", shared_path(f"{LF}/identity.json"), "-o", data])
    rows = read_rows(ok(["data", "pack", data, "-m", tokdir, "--template", "auto", "--cutoff", "4096"]).stdout)
    convs = _conversations(data)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, (turns, system, _) in zip(rows, convs):
        assert row["input_ids"] == list(tokenizer.apply_chat_template(to_messages(turns, system), tokenize=True)["input_ids"])
        trained = [x for x in row["labels"] if x != IGNORE]
        answer = tokenizer(turns[-1]["content"], add_special_tokens=False).input_ids
        assert trained == answer + [end]


def test_tool_calls_round_trip_through_every_tool_template(tmp_path):
    """Every glaive function call, rendered by each template with tools, parses back to itself."""
    from lmforge.shared.data.rendering import render
    from lmforge.shared.data.templates import get
    from lmforge.shared.data.tool_calls import parse_calls
    from lmforge.shared.data.aligned import turns_of

    data = tmp_path / "g.arrow"
    ok(["data", "align", shared_path(f"{LF}/glaive_toolcall_en_demo.json"), "-o", data])
    rows = read_rows(data)
    calls = 0
    for name in ("qwen3", "qwen", "chatml", "llama3", "mistral", "default"):
        tpl = get(name)
        for r in rows:
            turns = turns_of(r["prompt"]) + turns_of(r["response"])
            rendered = render(tpl, turns, r["system"], r["tools"], bos="<s>", eos="</s>")
            for (start, end), turn in zip(rendered.spans, rendered.turn_of_span):
                wanted = [{"name": c["name"], "arguments": json.loads(c["arguments"])}
                          for c in turns[turn]["tool_calls"] or []]
                if not wanted:
                    continue
                text = rendered.text[start:end]
                suffix = tpl.assistant_suffix.replace("{eos}", "</s>")
                text = text[: len(text) - len(suffix)] if suffix and text.endswith(suffix) else text
                if tpl.thinking:
                    text = text.split("</think>")[-1]
                _, parsed = parse_calls(tpl.tool_style, text)
                assert parsed == wanted, (name, text)
                calls += 1
    assert calls >= 6 * 200


def test_truncation_keeps_the_response_and_is_reported(tmp_path, words_model):
    long_prompt = " ".join(["one"] * 300)
    data = aligned(tmp_path, "long", [{"instruction": long_prompt, "output": "hello " * 5},
                                      {"instruction": "hi", "output": "bye"}])
    result = ok(["data", "pack", data, "-m", words_model, "-t", "chatml", "--cutoff", "64"])
    rows = read_rows(result.stdout)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    hello, end = _ids(words_model, "hello", "<|im_end|>")
    assert [x for x in rows[0]["labels"] if x != IGNORE] == [hello] * 5 + [end]  # the answer survives whole
    start, user, assistant = _ids(words_model, "<|im_start|>", "user", "assistant")
    assert rows[0]["input_ids"][:2] == [start, user]                  # the prompt keeps its beginning
    assert rows[0]["input_ids"][-8:-6] == [start, assistant]          # ... and the answer's header
    assert b"1 cut to fit --cutoff 64 (--truncation auto): prompt cut in 1 (rows 1)" in result.stderr
    stats = json.loads(ok(["data", "stats", "-", "--json"], input=result.stdout).stdout)
    assert stats["pack"]["truncated"] == 1 and stats["pack"]["dropped"] == 0
    assert stats["truncation"]["lost"] == {"prompt": 1} and stats["truncation"]["first_rows"] == {"prompt": [1]}


def test_long_response_is_cut_in_proportion(tmp_path, words_model):
    data = aligned(tmp_path, "both", [{"instruction": " ".join(["one"] * 100), "output": " ".join(["two"] * 100)}])
    row = read_rows(ok(["data", "pack", data, "-m", words_model, "-t", "chatml", "--cutoff", "100"]).stdout)[0]
    two = _ids(words_model, "two")[0]
    trained = [x for x in row["labels"] if x != IGNORE]
    assert len(row["input_ids"]) == 100 and 40 <= len(trained) <= 55 and set(trained) == {two}


def _examples_of(rows):
    for r in rows:
        start = 0
        for n in r["lengths"]:
            yield tuple(r["input_ids"][start:start + n]), tuple(r["labels"][start:start + n])
            start += n


def test_packing_invariants(tmp_path):
    tokdir = shared_path("tokenizers/qwen3")
    data = tmp_path / "alpaca.arrow"
    ok(["data", "align", shared_path(f"{LF}/alpaca_en_demo.json"), "-o", data])
    plain = read_rows(ok(["data", "pack", data, "-m", tokdir, "-t", "qwen3", "--cutoff", "512"]).stdout)
    result = ok(["data", "pack", data, "-m", tokdir, "-t", "qwen3", "--cutoff", "512", "--neat-packing"])
    packed = read_rows(result.stdout)
    tokens = sum(len(r["input_ids"]) for r in plain)
    assert len(packed) <= tokens / 512 * 1.02  # within 2% of the fewest rows possible
    assert all(len(r["input_ids"]) == len(r["labels"]) == sum(r["lengths"]) <= 512 for r in packed)
    # every example appears exactly once, whole, inside one row
    assert Counter(_examples_of(packed)) == Counter(_examples_of(plain))
    meta = read_meta(result.stdout)
    assert meta["packing"] == "neat" and meta["cutoff"] == 512
    stats = json.loads(ok(["data", "stats", "-", "--json"], input=result.stdout).stdout)
    assert stats["packing_efficiency"] > 0.95 and stats["examples"]["count"] == len(plain)
    assert b"packing efficiency" in result.stderr


def test_pt_blocks(tmp_path):
    tokdir = shared_path("models/stories260K")
    from transformers import AutoTokenizer

    texts = ["Once upon a time there was a cat.", "The dog ran home.", "A bird sang all day long in the tree."] * 20
    data = aligned(tmp_path, "pt", [{"text": t} for t in texts])
    tokenizer = AutoTokenizer.from_pretrained(str(tokdir))
    expected = []
    for t in texts:
        expected += tokenizer(t).input_ids + [tokenizer.eos_token_id]   # BOS (Llama adds it) + text + EOS
    for neat in ([], ["--neat-packing"]):
        rows = read_rows(ok(["data", "pack", data, "-m", tokdir, "-s", "pt", "--cutoff", "64", *neat]).stdout)
        flat = [x for r in rows for x in r["input_ids"]]
        assert flat == expected  # every token once, in order
        assert all(len(r["input_ids"]) == 64 for r in rows[:-1]) and len(rows[-1]["input_ids"]) <= 64
        assert all(r["labels"] == r["input_ids"] for r in rows)
        if neat:
            docs = [n for r in rows for n in r["lengths"]]
            assert sum(docs) == len(flat) and len(docs) >= len(texts)
        else:
            assert all(r["lengths"] == [len(r["input_ids"])] for r in rows)


def test_pairwise_kto_and_ppo_stages(tmp_path):
    tokdir = shared_path("tokenizers/qwen3")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokdir))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    dpo = tmp_path / "dpo.arrow"
    ok(["data", "align", shared_path(f"{LF}/dpo_en_demo.json"), "-o", dpo])
    for stage in ("rm", "dpo"):
        out = ok(["data", "pack", dpo, "-m", tokdir, "-t", "qwen3", "-s", stage, "--cutoff", "4096"]).stdout
        rows = read_rows(out)
        assert len(rows) == 300 and read_meta(out)["stage"] == stage
        for r in rows:
            assert r["prompt_ids"][-len(header):] == header
            assert r["chosen_ids"][-1] == end and r["rejected_ids"][-1] == end
    kto = tmp_path / "kto.arrow"
    ok(["data", "align", shared_path(f"{LF}/kto_en_demo.json"), "-o", kto])
    rows = read_rows(ok(["data", "pack", kto, "-m", tokdir, "-t", "qwen3", "-s", "kto"]).stdout)
    assert Counter(r["label"] for r in rows) == {True: 150, False: 150}
    sft = tmp_path / "sft.arrow"
    ok(["data", "align", shared_path(f"{LF}/alpaca_en_demo.json"), "-o", sft, "--max-samples", "20"])
    rows = read_rows(ok(["data", "pack", sft, "-m", tokdir, "-t", "qwen3", "-s", "ppo"]).stdout)
    assert all(r["prompt_ids"][-len(header):] == header and r["response_ids"][-1] == end for r in rows)


def test_ppo_rows_keep_their_tools(tmp_path, words_model):
    """`data pack --stage ppo` keeps each row's tool schemas (the aligned `tools` column, "" when
    none) beside its prompt: an agent's episode of that prompt may call those tools."""
    import pyarrow as pa

    tool = '[{"type": "function", "function": {"name": "f", "parameters": {}}}]'
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "tools": tool},
            TWO_TURNS]
    data = aligned(tmp_path, "tools", rows)
    want = [r["tools"] for r in read_rows(data)]
    assert want[0] and json.loads(want[0])[0]["function"]["name"] == "f" and want[1] == ""
    out = tmp_path / "ppo.arrow"
    ok(["data", "pack", data, "-m", words_model, "-t", "chatml", "-s", "ppo", "-o", out])
    packed = read_rows(out)
    assert [r["tools"] for r in packed] == want
    assert all(r["prompt_ids"] and r["response_ids"] for r in packed)
    assert pa.ipc.open_stream(pa.memory_map(str(out))).schema.field("tools").type == pa.string()
    sft = read_rows(ok(["data", "pack", data, "-m", words_model, "-t", "chatml"]).stdout)
    assert all("tools" not in r for r in sft)                      # other stages: as they were
    assert "prompt_ids" in ok(["data", "stats", out]).stdout.decode()
    assert "row 1" in ok(["data", "show", out, "--decode", "-m", words_model]).stdout.decode()


def test_determinism_and_num_proc(tmp_path):
    tokdir = shared_path("tokenizers/qwen3")
    data = tmp_path / "a.arrow"
    ok(["data", "align", shared_path(f"{LF}/alpaca_en_demo.json"), "-o", data])
    args = ["data", "pack", data, "-m", tokdir, "-t", "qwen3", "--cutoff", "512", "--packing"]
    one = ok(args).stdout
    assert one == ok(args).stdout
    assert one == ok(args + ["--num-proc", "2"]).stdout


def test_output_reads_with_datasets_and_records_tokenizer(tmp_path, words_model):
    import datasets

    data = aligned(tmp_path, "x", [TWO_TURNS])
    out = tmp_path / "p.arrow"
    ok(["data", "pack", data, "-m", words_model, "-t", "chatml", "-o", out])
    ds = datasets.Dataset.from_file(str(out))
    assert ds.column_names == ["input_ids", "labels", "lengths"] and len(ds) == 1
    meta = read_meta(out)
    assert meta["kind"] == "packed" and meta["template"]["name"] == "chatml"
    assert len(meta["tokenizer"]["fingerprint"]) == 16 and meta["stop_words"] == ["<|im_end|>"]
    assert [s["command"] for s in meta["provenance"]] == ["data align", "data pack"]


def test_missing_template_tokens_are_added_and_recorded(tmp_path):
    tokdir = shared_path("models/stories260K")
    data = aligned(tmp_path, "x", [{"instruction": "Tell a story.", "output": "Once upon a time."}])
    result = ok(["data", "pack", data, "-m", tokdir, "-t", "chatml"])
    meta = read_meta(result.stdout)
    assert meta["tokenizer"]["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert meta["tokenizer"]["vocab_size"] == 514
    row = read_rows(result.stdout)[0]
    assert row["input_ids"][0] == 512 and 513 in row["labels"]


def test_pack_bad_input(tmp_path, words_model):
    sft = aligned(tmp_path, "sft", [TWO_TURNS])
    pairs = aligned(tmp_path, "pairs", [{"instruction": "hi", "chosen": "hello", "rejected": "bye"}])
    tools = aligned(tmp_path, "tools", [{"conversations": [{"from": "human", "value": "hi"},
                                                           {"from": "gpt", "value": "hello"}],
                                         "tools": '[{"name": "f", "parameters": {}}]'}])
    base = ["data", "pack", "-m", words_model]
    assert "did you mean 'chatml'" in bad([*base, sft, "-t", "chatmll", "-o", tmp_path / "o"])
    assert "stage 'pairwise'" in bad([*base, pairs, "-t", "chatml", "-o", tmp_path / "o"])
    assert "not found" in bad(["data", "pack", "-m", tmp_path / "nope", sft, "-t", "chatml", "-o", tmp_path / "o"])
    long = aligned(tmp_path, "long", [{"instruction": "Tell me a long story " * 20, "output": "Once upon a time " * 20}])
    assert "leaves no example" in bad(["data", "pack", "-m", shared_path("models/stories260K"), long, "-t", "alpaca",
                                       "--cutoff", "8", "-o", tmp_path / "o"])
    assert "cannot express tool" in bad([*base, tools, "-t", "gemma", "-o", tmp_path / "o"])
    assert "no chat template" in bad([*base, sft, "-o", tmp_path / "o"])
    assert "applies to sft and pt" in bad([*base, pairs, "-t", "chatml", "-s", "dpo", "--packing", "-o", tmp_path / "o"])
    assert not (tmp_path / "o").exists()


def test_templates_list():
    out = ok(["data", "templates"]).stdout.decode()
    for name in ("default", "alpaca", "chatml", "llama2", "llama3", "qwen", "qwen3", "mistral", "gemma", "phi"):
        assert name in out
    assert set(json.loads(ok(["data", "templates", "--json"]).stdout)) >= {"qwen3-nothink", "smollm"}


def test_every_template_renders_generation_prompt_as_prefix():
    """For every template, the generation prompt is a prefix of the conversation with its answer."""
    from lmforge.shared.data.rendering import prompt_and_response, render
    from lmforge.shared.data.templates import TEMPLATES

    turns = [("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")]
    for name, tpl in TEMPLATES.items():
        head, body = prompt_and_response(tpl, turns, ("assistant", "Ciao"), "sys", bos="<s>", eos="</s>")
        full = render(tpl, turns + [("assistant", "Ciao")], "sys", bos="<s>", eos="</s>").text
        assert full.startswith(head + body), name
        assert "Ciao" in body and "Bye" in head, name
