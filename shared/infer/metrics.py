"""Generation metrics: ROUGE-1/2/L (rouge-score), BLEU-4 (sacrebleu) and exact match.

Text with Chinese, Japanese or Korean characters is scored at character level, as the seed paper
does: each CJK character is a token (runs of other letters and digits stay words). Other text
is lowercased and split into words and digits. ROUGE is the mean F1 over examples, BLEU the
corpus BLEU-4 (sacrebleu, `zh` tokenisation for CJK), both x100.
"""

from __future__ import annotations

import re

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W_]+", re.UNICODE)


def has_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


def tokens(text: str) -> list[str]:
    """Words, with every CJK character a word of its own."""
    return _TOKEN.findall(text.lower())


class _Tokenizer:
    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Tokenizer())
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = max(len(predictions), 1)
    return {f"rouge-{key[5:].lower()}": round(100 * value / n, 4) for key, value in totals.items()}


def bleu(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    cjk = any(has_cjk(t) for t in references + predictions)
    score = sacrebleu.corpus_bleu(predictions, [references], tokenize="zh" if cjk else "13a")
    return round(score.score, 4)


def exact_match(predictions: list[str], references: list[str]) -> float:
    same = sum(" ".join(p.split()) == " ".join(r.split()) for p, r in zip(predictions, references))
    return round(100 * same / max(len(predictions), 1), 4)


def all_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    return {**rouge(predictions, references), "bleu-4": bleu(predictions, references),
            "exact_match": exact_match(predictions, references), "count": len(predictions)}
