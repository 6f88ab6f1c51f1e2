"""Repetition, frequency and presence penalties: the logits processors on hand-made logits, and
the knobs of `eval generate` (options) and `serve` (OpenAI's request fields, checked)."""

from __future__ import annotations

import json

import pytest
from conftest import aligned, bad, ok, shared_path

torch = pytest.importorskip("torch")

STORIES = "models/stories260K"


def test_frequency_and_presence_penalties_follow_openais_definition():
    from lmforge.shared.model.generation import OccurrencePenalty

    # two rows, a prompt 3 wide (padding included), then 3 generated tokens each
    ids = torch.tensor([[7, 7, 7, 5, 5, 2],
                        [0, 0, 4, 1, 3, 3]])
    logits = torch.tensor([[0.5, 1.0, 2.0, 3.0, -1.0, 4.0, 0.0, 6.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    frequency, presence = 0.5, 1.5
    got = OccurrencePenalty(frequency, presence, start=3)(ids, logits.clone())
    expected = logits.clone()
    for row, generated in enumerate(([5, 5, 2], [1, 3, 3])):
        for token in set(generated):   # logits[t] -= frequency * count(t) + presence * (count(t) > 0)
            expected[row, token] -= frequency * generated.count(token) + presence
    assert torch.equal(got, expected)
    assert got[0, 7] == 6.0 and got[1, 4] == 1.0 and got[1, 0] == 1.0   # prompt tokens (and padding) not counted
    # the distribution moves as defined: probabilities change by exp(-penalty), renormalised
    before, after = torch.softmax(logits, -1), torch.softmax(got, -1)
    ratio = (after / before) / (after[0, 7] / before[0, 7])
    assert ratio[0, 5].item() == pytest.approx(torch.exp(torch.tensor(-(2 * frequency + presence))).item(), rel=1e-5)
    assert ratio[0, 2].item() == pytest.approx(torch.exp(torch.tensor(-(frequency + presence))).item(), rel=1e-5)
    # negative values encourage repeats; nothing generated yet: the logits are left alone
    assert (OccurrencePenalty(-1.0, 0.0, start=3)(ids, logits.clone())[0, 5] == logits[0, 5] + 2).item()
    assert torch.equal(OccurrencePenalty(frequency, presence, start=6)(ids, logits.clone()), logits)


def test_repetition_penalty_counts_prompt_and_answer_but_not_padding():
    from lmforge.shared.model.generation import left_pad, penalty_processors

    assert penalty_processors(*left_pad([[1, 2]], 0)) is None   # all off: generate() gets nothing
    ids, mask = left_pad([[4, 5], [3, 4, 5]], pad_id=6)            # row 0 is padded with token 6
    processors = penalty_processors(ids, mask, repetition=2.0)
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 4.0, -4.0, 2.0]] * 2)
    got = processors(ids, logits.clone())
    # CTRL's rule: a seen token's positive logit halves, a negative one doubles
    assert got[0].tolist() == [1.0, 1.0, 1.0, 1.0, 2.0, -8.0, 2.0]   # the pad token (6) is not "seen"
    assert got[1].tolist() == [1.0, 1.0, 1.0, 0.5, 2.0, -8.0, 2.0]
    both = penalty_processors(ids, mask, repetition=2.0, frequency=1.0)
    assert len(both) == 2   # repetition first, then frequency/presence: before temperature and top-p


def test_eval_generate_takes_the_penalties(tmp_path):
    rows = [{"instruction": "Once upon a time", "output": "there was a cat."},
            {"instruction": "The dog", "output": "ran home."}]
    data = aligned(tmp_path, "eval", rows)
    base = ["eval", "generate", "-m", shared_path(STORIES), "-d", data, "--template", "default",
            "--max-new-tokens", "32", "-q", "-o"]
    ok([*base, tmp_path / "plain.jsonl"])
    ok([*base, tmp_path / "penalised.jsonl", "--frequency-penalty", "2", "--repetition-penalty", "1.3"])
    plain = [json.loads(x)["prediction"] for x in (tmp_path / "plain.jsonl").read_text().splitlines()]
    penalised = [json.loads(x)["prediction"] for x in (tmp_path / "penalised.jsonl").read_text().splitlines()]
    assert plain != penalised
    for flag, value in (("--frequency-penalty", "2.5"), ("--presence-penalty", "-3"), ("--repetition-penalty", "0")):
        assert flag in bad([*base, tmp_path / "x.jsonl", flag, value])


# ----------------------------------------------------------------------------- serve

@pytest.fixture(scope="module")
def server():
    pytest.importorskip("httpx")
    from test_serve import KEY, Server

    s = Server("-m", str(shared_path(STORIES)), "--template", "default", "--name", "stories", api_key=KEY)
    yield s
    s.stop()


def _post(server, **fields):
    import httpx
    from test_serve import KEY

    body = {"messages": [{"role": "user", "content": "Once upon a time"}], "temperature": 0, "max_tokens": 40,
            **fields}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"})


def test_serve_validates_the_penalty_fields(server):
    for field, value in (("frequency_penalty", 2.5), ("frequency_penalty", -2.01), ("presence_penalty", 3),
                         ("presence_penalty", "1"), ("repetition_penalty", 0), ("repetition_penalty", -1),
                         ("repetition_penalty", True)):
        response = _post(server, **{field: value})
        assert response.status_code == 400, (field, value, response.text)
        error = response.json()["error"]
        assert error["param"] == field and error["type"] == "invalid_request_error"
    for field, value in (("frequency_penalty", -2), ("presence_penalty", 2), ("repetition_penalty", 1.2),
                         ("frequency_penalty", None)):
        assert _post(server, **{field: value}).status_code == 200, (field, value)


def test_serve_penalties_change_the_answer(server):
    def text(**fields) -> str:
        response = _post(server, **fields)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    plain = text()
    assert text() == plain   # greedy: the same answer again
    for fields in ({"frequency_penalty": 2}, {"presence_penalty": 2}, {"repetition_penalty": 1.5}):
        assert text(**fields) != plain, fields
    # fewer repeated words under a strong frequency penalty
    words = plain.split()
    penalised = text(frequency_penalty=2).split()
    assert len(set(penalised)) / max(len(penalised), 1) >= len(set(words)) / max(len(words), 1)
