"""`data pack --truncation auto|left|right|drop`: exact ids for each mode, what was cut reported
by kind with the rows (log line, summary, `data stats`), and `data show --decode` showing the
trained spans, the examples of a packed row, and where the cuts were."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import aligned, bad, ok, read_rows, shared_path, word_tokenizer

IGNORE = -100
CHATML = ["<|im_start|>", "<|im_end|>"]
WORDS = ["user", "assistant", "system", "hi", "hello", "bye", "ciao", "one", "two", "three", "four", "five",
         "six", "seven", "eight"]
# 23 tokens under chatml: [0, 6) the first question, [6, 10) the first answer (trained: 8, 9),
# [10, 18) the second question, [18, 23) the last answer (header 18, 19; trained 20, 21, 22)
LONG = {"conversations": [{"from": "human", "value": "one two three"}, {"from": "gpt", "value": "hello"},
                          {"from": "human", "value": "four five six seven eight"}, {"from": "gpt", "value": "ciao bye"}]}
SHORT = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "bye"}]}


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"), WORDS, CHATML, eos="<|im_end|>")


def _vocab(tokdir) -> dict:
    return json.loads((tokdir / "tokenizer.json").read_text())["model"]["vocab"]


def _tokens(tokdir, ids: list[int]) -> list[str]:
    names = {i: w for w, i in _vocab(tokdir).items()}
    return [names[i] for i in ids]


FULL = ["<|im_start|>", "user", "one", "two", "three", "<|im_end|>", "<|im_start|>", "assistant", "hello",
        "<|im_end|>", "<|im_start|>", "user", "four", "five", "six", "seven", "eight", "<|im_end|>", "<|im_start|>",
        "assistant", "ciao", "bye", "<|im_end|>"]


# ----------------------------------------------------------------------------- the rules, by hand

def test_each_mode_keeps_what_it_says():
    from lmforge.shared.data.truncation import fit_conversation

    spans, head = [(8, 10), (20, 23)], 2
    messages = [{"role": r} for r in ("user", "assistant", "user", "assistant")]

    def fit(mode, cutoff):
        return fit_conversation(mode, 23, spans, head, cutoff, messages, [1, 3])

    kept, cut = fit("auto", 12)   # a short answer stays whole; the prompt keeps its start and the header
    assert kept == [(0, 7), (18, 23)] and cut.at == {"input_ids": [[7, 11]]}
    assert cut.lost == ["prompt", "turns"] and cut.turns == 2   # the first answer and the second question
    kept, cut = fit("left", 12)   # the prompt loses its beginning
    assert kept == [(11, 23)] and cut.at == {"input_ids": [[0, 11]]} and cut.turns == 2
    assert fit("right", 12) is None and fit("drop", 12) is None and fit("left", 4) is None
    kept, cut = fit("right", 22)  # the answer loses its end
    assert kept == [(0, 22)] and cut.lost == ["answer"] and cut.at == {"input_ids": [[22, 1]]}
    assert fit("drop", 23) == ([(0, 23)], None)
    # a tool result in the part that went: a tool exchange was cut
    tools = [{"role": "user"}, {"role": "assistant", "tool_calls": [{"name": "f"}]}, {"role": "tool"},
             {"role": "assistant"}]
    _, cut = fit_conversation("auto", 23, spans, head, 12, tools, [1, 3])
    assert cut.lost == ["prompt", "turns", "tool_calls"]


def test_counts_keep_the_first_rows_in_input_order():
    from lmforge.shared.data.truncation import Counts, Cut

    first, second = Counts(examples=10), Counts(examples=10)
    for row in (2, 4, 6):
        first.cut(row, Cut(lost=["prompt"]))
    for row in (12, 14, 16):
        second.cut(row, Cut(lost=["prompt", "answer"]))
    second.drop(18, "too_long")
    first.add(second)
    summary = first.summary()
    assert summary["truncated"] == 6 and summary["dropped"] == 1 and summary["examples"] == 20
    assert summary["lost"] == {"prompt": 6, "answer": 3} and summary["dropped_by"] == {"too_long": 1}
    assert summary["first_rows"] == {"prompt": [2, 4, 6, 12, 14], "answer": [12, 14, 16], "dropped": [18]}


# ----------------------------------------------------------------------------- data pack

@pytest.mark.parametrize("mode, cutoff, kept, trained", [
    ("auto", 12, FULL[:7] + FULL[18:], ["ciao", "bye", "<|im_end|>"]),
    ("left", 12, FULL[11:], ["ciao", "bye", "<|im_end|>"]),
    ("right", 22, FULL[:22], ["hello", "<|im_end|>", "ciao", "bye"]),
])
def test_pack_modes_exact_ids(tmp_path, words, mode, cutoff, kept, trained):
    data = aligned(tmp_path, "long", [LONG, SHORT])
    result = ok(["data", "pack", data, "-m", words, "-t", "chatml", "--cutoff", str(cutoff), "--truncation", mode])
    rows = read_rows(result.stdout)
    assert _tokens(words, rows[0]["input_ids"]) == kept
    assert _tokens(words, [x for x in rows[0]["labels"] if x != IGNORE]) == trained
    assert len(rows) == 2 and _tokens(words, rows[1]["input_ids"])[2:4] == ["hi", "<|im_end|>"]
    err = result.stderr.decode()
    assert f"1 cut to fit --cutoff {cutoff} (--truncation {mode})" in err
    assert ("answer cut in 1 (rows 1)" in err) == (mode == "right")
    assert ("whole turns removed in 1 (2 turns; rows 1)" in err) == (mode != "right")
    assert "warning: pack: 50% of the examples were cut or dropped" in err   # 1 of 2: more than 10%
    stats = json.loads(ok(["data", "stats", "-", "--json"], input=result.stdout).stdout)
    assert stats["pack"] == {"examples": 2, "truncated": 1, "dropped": 0}
    assert stats["truncation"]["truncation"] == mode and stats["truncation"]["recorded_examples"] == 1


def test_pack_drop_and_the_reasons(tmp_path, words):
    data = aligned(tmp_path, "mixed", [SHORT, LONG, *[SHORT] * 17])
    result = ok(["data", "pack", data, "-m", words, "-t", "chatml", "--cutoff", "12", "--truncation", "drop"])
    rows = read_rows(result.stdout)
    err = result.stderr.decode()
    assert len(rows) == 18 and all(len(r["input_ids"]) == 8 for r in rows)
    assert "19 examples -> 18 rows" in err and "1 dropped: 1 longer than --cutoff (rows 2)" in err
    assert "warning" not in err   # 1 of 19: under 10%
    table = ok(["data", "stats", "-"], input=result.stdout).stdout.decode()
    assert "dropped: too long" in table and "(rows 2)" in table
    # everything too long: one clear line
    line = bad(["data", "pack", aligned(tmp_path, "long", [LONG]), "-m", words, "-t", "chatml", "--cutoff", "12",
                "--truncation", "drop"])
    assert "leaves no example" in line


def test_dpo_cuts_are_named_by_row(tmp_path, words):
    pairs = [{"instruction": "one two three four five six", "chosen": "hello ciao bye hello ciao bye",
              "rejected": "bye"}, {"instruction": "hi", "chosen": "hello", "rejected": "bye"}]
    data = aligned(tmp_path, "pairs", pairs)
    # the first pair: a prompt of 11 tokens (its header: the last 2), a chosen answer of 7, a rejected one of 2
    prompt = ["<|im_start|>", "user", "one", "two", "three", "four", "five", "six", "<|im_end|>", "<|im_start|>",
              "assistant"]
    chosen = ["hello", "ciao", "bye", "hello", "ciao", "bye", "<|im_end|>"]
    base = ["data", "pack", data, "-m", words, "-t", "chatml", "--stage", "dpo", "--cutoff", "14"]
    expected = {"right": (prompt, chosen[:3]), "left": (prompt[4:], chosen), "auto": (prompt[:7] + prompt[9:], chosen[:5])}
    for mode, (kept_prompt, kept_chosen) in expected.items():
        result = ok([*base, "--truncation", mode])
        row = read_rows(result.stdout)[0]
        assert _tokens(words, row["prompt_ids"]) == kept_prompt, mode
        assert _tokens(words, row["chosen_ids"]) == kept_chosen, mode
        assert _tokens(words, row["rejected_ids"]) == ["bye", "<|im_end|>"], mode
        err = result.stderr.decode()
        assert ("answer cut in 1 (rows 1)" in err) == (mode != "left"), err
        assert ("prompt cut in 1 (rows 1)" in err) == (mode != "right"), err
    summary = json.loads(ok(["data", "stats", "-", "--json"], input=result.stdout).stdout)["truncation"]
    assert summary["first_rows"] == {"answer": [1], "prompt": [1]} and summary["lost"] == {"answer": 1, "prompt": 1}
    shown = ok(["data", "show", "--decode", "-"], input=result.stdout).stdout.decode()
    assert shown.startswith("=== row 1; aligned row 1, cut: prompt, answer ===\nprompt:\n")
    assert "[... 2 tokens cut ...]" in shown and "chosen:\n[[" in shown and "rejected:\n[[" in shown
    assert "ciao bye hello ciao]][... 2 tokens cut ...]" in shown   # the chosen answer's end went


# ----------------------------------------------------------------------------- data show --decode

def test_decode_marks_trained_spans_examples_and_cuts(tmp_path, words):
    data = aligned(tmp_path, "long", [LONG, SHORT, SHORT])
    packed = tmp_path / "p.packed"
    ok(["data", "pack", data, "-m", words, "-t", "chatml", "--cutoff", "12", "-o", packed])
    out = ok(["data", "show", "--decode", packed]).stdout.decode()   # the tokenizer: the metadata's directory
    first = out.split("\n\n")[0]
    assert first.startswith("=== row 1: 12 tokens, 3 trained; aligned row 1, cut: prompt, turns (2) ===")
    # (a trained piece keeps the space that joins it to the text before, as its first token does)
    assert "<|im_start|>[... 11 tokens cut ...] <|im_start|> assistant[[ ciao bye <|im_end|>]]" in first
    assert out.count("=== row ") == 3
    # packed rows: each example apart
    neat = tmp_path / "n.packed"
    ok(["data", "pack", aligned(tmp_path, "short", [SHORT] * 3), "-m", words, "-t", "chatml", "--cutoff", "64",
        "--neat-packing", "-o", neat])
    out = ok(["data", "show", "--decode", neat, "-m", words]).stdout.decode()
    assert out.startswith("=== row 1: 3 examples, 24 tokens, 6 trained ===\n--- example 1 of 3 ---\n")
    assert out.count("[[ bye <|im_end|>]]") == 3 and "--- example 3 of 3 ---" in out


def test_decode_in_colour_on_a_terminal(tmp_path, words):
    from lmforge.shared.core.arrowio import open_arrow
    from lmforge.shared.data import show
    from lmforge.shared.modeldir.tokenizers import load_tokenizer

    packed = tmp_path / "p.packed"
    ok(["data", "pack", aligned(tmp_path, "one", [SHORT]), "-m", words, "-t", "chatml", "-o", packed])
    page = next(show.pages(open_arrow(packed), 1, load_tokenizer(words), None, color=True))
    text = page.rich()
    styled = {text.plain[span.start:span.end]: str(span.style) for span in text.spans}
    assert styled.get(" bye <|im_end|>") == show.STYLES["trained"] and "[[" not in text.plain


def test_decode_glaive_tool_call_is_trained_and_its_result_is_not(tmp_path):
    tokdir = shared_path("tokenizers/qwen3")
    data = tmp_path / "g.arrow"
    ok(["data", "align", shared_path("data/llamafactory/glaive_toolcall_en_demo.json"), "-o", data])
    packed = tmp_path / "g.packed"
    ok(["data", "pack", data, "-m", tokdir, "-t", "qwen3", "--cutoff", "2048", "-o", packed])
    out = ok(["data", "show", "--decode", "-n", "10", packed]).stdout.decode()
    trained = re.findall(r"\[\[(.*?)\]\]", out, re.S)
    untrained = re.sub(r"\[\[.*?\]\]", "", out, flags=re.S)
    calls = [t for t in trained if "<tool_call>" in t]
    assert calls and all('"name": ' in t and "</tool_call>" in t for t in calls)
    assert "<tool_response>" in untrained and not any("<tool_response>" in t for t in trained)


def test_decode_refuses_what_it_cannot_show(tmp_path, words):
    data = aligned(tmp_path, "one", [SHORT])
    assert "--decode shows packed data" in bad(["data", "show", "--decode", data])
    assert "--model is the tokenizer of --decode" in bad(["data", "show", data, "-m", words])
    assert "choose one" in bad(["data", "show", "--decode", "--stats", data])
    moved = tmp_path / "tok"
    shutil.copytree(words, moved)
    packed = tmp_path / "p.packed"
    ok(["data", "pack", data, "-m", moved, "-t", "chatml", "-o", packed])
    shutil.rmtree(moved)
    assert "give the model (or its tokenizer directory) with -m MODEL" in bad(["data", "show", "--decode", packed])
    assert ok(["data", "show", "--decode", packed, "-m", words]).stdout.startswith(b"=== row 1")
    other = word_tokenizer(tmp_path / "other", WORDS[::-1], CHATML, eos="<|im_end|>")
    assert "fingerprint" in bad(["data", "show", "--decode", packed, "-m", other])
