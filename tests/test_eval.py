"""`eval mmlu/cmmlu/ceval`, `eval generate`, `eval perplexity` (eval rm: test_preference.py)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import aligned, bad, ok, shared_path

STORIES = "models/stories260K"


def _bench(tmp_path, name="toy", questions=None, dev=True):
    """A hand-built benchmark in the MMLU layout: one subject, the given test questions."""
    root = tmp_path / name
    (root / "data" / "test").mkdir(parents=True)
    (root / "mapping.json").write_text(json.dumps({"toys": {"name": "toys", "category": "Other"}}))
    rows = questions or [("Which toy is round?", "ball", "box", "kite", "doll", "A")]
    (root / "data" / "test" / "toys_test.csv").write_text("".join(",".join(r) + "\n" for r in rows))
    if dev:
        (root / "data" / "dev").mkdir()
        (root / "data" / "dev" / "toys_dev.csv").write_text("Which is a color?,red,run,sit,ten,A\n")
    return root


def test_mmlu_subjects_run_with_per_subject_figures(tmp_path):
    base = shared_path(STORIES)
    mmlu = shared_path("data/eval/mmlu/mmlu.zip")
    preds = tmp_path / "preds.jsonl"
    result = ok(["eval", "mmlu", "-m", base, "-d", mmlu, "--split", "val", "--subjects",
                 "abstract_algebra,anatomy,world_religions", "--shots", "5", "--json", "--predictions", preds])
    report = json.loads(result.stdout)
    assert set(report["subjects"]) == {"abstract_algebra", "anatomy", "world_religions"}
    for subject in report["subjects"].values():
        assert subject["questions"] > 0 and 0 <= subject["accuracy"] <= 100
    assert set(report["categories"]) == {"STEM", "Other", "Humanities"}  # mapping.json: anatomy is "Other"
    assert report["questions"] == sum(s["questions"] for s in report["subjects"].values())
    assert len(preds.read_text().splitlines()) == report["questions"]
    assert "average" in result.stderr.decode()  # the table


def test_letter_scoring_on_a_hand_built_set(tmp_path):
    """The prediction is the letter with the highest next-token logit after the prompt; with the
    answers set to the model's choice for question 1 and another letter for question 2, the
    accuracy must be exactly 50%."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = shared_path(STORIES)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    questions = [("Which toy is round?", "ball", "box", "kite", "doll"), ("What do cats say?", "moo", "meow", "quack", "woof")]
    choices = []
    for q in questions:
        prompt = ("The following are multiple choice questions (with answers) about toys.\n\n" + q[0] +
                  "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", q[1:])) + "\nAnswer:")
        scores = []
        for letter in "ABCD":  # stories260K writes " A" in two pieces, " B" in one: score whole continuations
            ids = tokenizer(prompt + " " + letter).input_ids
            n = len(ids) - len(tokenizer(prompt).input_ids)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
            scores.append(sum(float(logp[len(ids) - n - 1 + j, ids[len(ids) - n + j]]) for j in range(n)))
        choices.append("ABCD"[max(range(4), key=scores.__getitem__)])
    wrong = next(x for x in "ABCD" if x != choices[1])
    root = _bench(tmp_path, questions=[(*questions[0], choices[0]), (*questions[1], wrong)])
    report = json.loads(ok(["eval", "mmlu", "-m", base, "-d", root, "--shots", "0", "--template", "none", "--json",
                            "--predictions", tmp_path / "p.jsonl"]).stdout)
    assert report["average"] == 50.0
    predicted = [json.loads(line)["prediction"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert predicted == choices


def test_cmmlu_and_ceval_layouts(tmp_path):
    base = shared_path(STORIES)
    cmmlu = json.loads(ok(["eval", "cmmlu", "-m", base, "-d", shared_path("data/eval/cmmlu/cmmlu.zip"),
                           "--subjects", "agronomy", "--shots", "1", "--json"]).stdout)
    assert cmmlu["subjects"]["agronomy"]["questions"] > 100
    ceval = shared_path("data/eval/ceval/ceval.zip")
    report = json.loads(ok(["eval", "ceval", "-m", base, "-d", ceval, "--split", "val", "--subjects", "accountant",
                            "--shots", "1", "--json"]).stdout)
    assert report["subjects"]["accountant"]["questions"] > 0
    assert "has no answers" in bad(["eval", "ceval", "-m", base, "-d", ceval, "--split", "test", "--subjects", "accountant"])


def test_benchmark_bad_input(tmp_path):
    base = shared_path(STORIES)
    weird = tmp_path / "weird"
    (weird / "stuff").mkdir(parents=True)
    (weird / "mapping.json").write_text("{}")
    (weird / "stuff" / "x.csv").write_text("q,a,b,c,d,A\n")
    assert "unknown benchmark layout" in bad(["eval", "mmlu", "-m", base, "-d", weird])
    nodev = _bench(tmp_path, "nodev", dev=False)
    assert "no dev split" in bad(["eval", "mmlu", "-m", base, "-d", nodev, "--shots", "5"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "mapping.json").write_text("{}")
    assert "holds no CSV files" in bad(["eval", "mmlu", "-m", base, "-d", empty])
    toy = _bench(tmp_path)
    assert "did you mean 'toys'" in bad(["eval", "mmlu", "-m", base, "-d", toy, "--subjects", "toy"])
    assert "no such file" in bad(["eval", "mmlu", "-m", base, "-d", tmp_path / "nothing.zip"])


def test_metrics_by_hand():
    from lmforge.shared.infer import metrics

    r = metrics.rouge(["the cat sat on the mat"], ["the cat is on the mat"])
    assert r["rouge-1"] == pytest.approx(100 * 5 / 6, abs=1e-3)   # 5 of 6 unigrams shared
    assert r["rouge-2"] == pytest.approx(100 * 3 / 5, abs=1e-3)   # the cat, on the, the mat
    assert r["rouge-l"] == pytest.approx(100 * 5 / 6, abs=1e-3)   # LCS: the cat on the mat
    # BLEU-4 with 6/7, 5/6, 4/5, 3/4 n-gram precisions and no brevity penalty: (3/7)^(1/4)
    b = metrics.bleu(["the cat sat on the mat today"], ["the cat sat on the mat yesterday"])
    assert b == pytest.approx(100 * (3 / 7) ** 0.25, abs=1e-2)
    # Chinese is scored by character: 今 天 天 气 shared out of six on each side
    zh = metrics.rouge(["今天天气很好"], ["今天天气不错"])
    assert zh["rouge-1"] == pytest.approx(100 * 4 / 6, abs=1e-3)
    assert metrics.exact_match(["a  b", "c"], ["a b", "d"]) == 50.0


def test_eval_generate_writes_predictions_and_metrics(tmp_path):
    base = shared_path(STORIES)
    data = aligned(tmp_path, "g", [{"instruction": "Tell me a story.", "output": "Once upon a time"}] * 3)
    out = tmp_path / "preds.jsonl"
    report = json.loads(ok(["eval", "generate", "-m", base, "-d", data, "--template", "default", "--max-new-tokens", "12",
                            "-o", out, "--json", "--batch-size", "2"]).stdout)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["reference"] == "Once upon a time" and r["prediction"] for r in rows)
    from lmforge.shared.infer.metrics import all_metrics

    again = all_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows])
    for key in ("rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact_match"):
        assert 0 <= report[key] <= 100 and report[key] == again[key]
    assert "no chat template" in bad(["eval", "generate", "-m", base, "-d", data])


def test_perplexity_equals_exp_of_the_mean_loss(tmp_path):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    base = shared_path(STORIES)
    texts = aligned(tmp_path, "t", [{"text": "Once upon a time there was a little dog."},
                                    {"text": "The sun was warm and the birds were singing in the tall tree."}])
    packed = tmp_path / "pt.arrow"
    ok(["data", "pack", texts, "-m", base, "-s", "pt", "--cutoff", "16", "-o", packed])
    result = ok(["eval", "perplexity", "-m", base, "-d", packed, "--json"])
    report = json.loads(result.stdout)
    assert b"perplexity" in result.stderr  # the table, beside the JSON
    quiet = ok(["eval", "perplexity", "-m", base, "-d", packed, "--json", "-q"])
    assert json.loads(quiet.stdout) == report and quiet.stderr.strip() == b""
    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    total, count = 0.0, 0
    for row in datasets.Dataset.from_file(str(packed)):
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss  # mean over the row's predicted tokens
        total += float(loss) * (len(row["input_ids"]) - 1)
        count += len(row["input_ids"]) - 1
    assert report["tokens"] == count
    assert report["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_adapter_that_does_not_match_the_model(tmp_path):
    base = shared_path(STORIES)
    qwen = shared_path("tokenizers/qwen3")
    data = aligned(tmp_path, "x", [{"instruction": "hi", "output": "there"}] * 4)
    ok(["data", "pack", data, "-m", base, "-t", "default", "-o", tmp_path / "p.arrow"])
    adapter = tmp_path / "adapter"
    ok(["train", "sft", "-m", base, "-d", tmp_path / "p.arrow", "-o", adapter, "--max-steps", "1"])
    other = tmp_path / "other"
    ok(["model", "init", "-o", other, "--layers", "1", "--hidden", "32", "--heads", "2", "--tokenizer", base])
    line = bad(["eval", "perplexity", "-m", other, "--adapter", adapter, "-d", tmp_path / "p.arrow"])
    assert "does not fit base model" in line or "was trained with tokenizer" in line
    line = bad(["eval", "perplexity", "-m", qwen, "--adapter", adapter, "-d", tmp_path / "p.arrow"])
    assert str(qwen) in line


@pytest.mark.slow
def test_smollm2_mmlu(smollm2):
    model = smollm2
    report = json.loads(ok(["eval", "mmlu", "-m", model, "-d", shared_path("data/eval/mmlu/mmlu.zip"), "--split", "val",
                            "--subjects", "high_school_geography,marketing", "--shots", "5", "--json"]).stdout)
    assert all(s["questions"] > 0 for s in report["subjects"].values())
    assert report["template"] == "auto"


def test_shared_prefix_reading_equals_whole_prompts():
    """MMLU prompts of one subject share their k-shot prefix; reading it once (SharedPrefix) must
    give the same next-token logits as reading every prompt whole, for any batch size."""
    import random

    import torch
    from lmforge.shared.infer.evaluate import SharedPrefix, _next_token_logits
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()
    rng = random.Random(0)
    prefix = [rng.randrange(1, 97) for _ in range(60)]
    prompts = [prefix + [rng.randrange(1, 97) for _ in range(rng.randint(1, 12))] for _ in range(7)]

    class Tok:
        pad_token_id = 0

    shared = SharedPrefix.of(model, prompts, torch.device("cpu"))
    assert shared is not None and shared.length >= 60
    for batch in (prompts[:3], prompts[3:6], prompts[6:], prompts[:3]):  # the cache is reused and re-sized
        expected = _next_token_logits(model, batch, Tok, torch.device("cpu"))
        assert torch.allclose(shared.next_token_logits(batch, Tok), expected, atol=1e-5)
    assert SharedPrefix.of(model, [p[:20] for p in prompts], torch.device("cpu")) is None  # too short to bother
