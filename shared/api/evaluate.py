"""`lmforge eval ...` as functions (`api.eval.mmlu(...)`): each returns its report, the dict that
`--json` prints."""

from __future__ import annotations

from typing import Any

from lmforge.shared.api._options import options
from lmforge.shared.core.commands.infer import EvalBenchmark, EvalGenerate, EvalPerplexity, EvalRM


def _benchmark(which: str, o: EvalBenchmark | None, values: dict) -> dict:
    from lmforge.shared.infer.evaluate import benchmark

    return benchmark(options(EvalBenchmark, o, values), which)


def mmlu(o: EvalBenchmark | None = None, **values: Any) -> dict:
    """MMLU accuracy per subject and category."""
    return _benchmark("mmlu", o, values)


def cmmlu(o: EvalBenchmark | None = None, **values: Any) -> dict:
    """CMMLU accuracy per subject and category."""
    return _benchmark("cmmlu", o, values)


def ceval(o: EvalBenchmark | None = None, **values: Any) -> dict:
    """C-Eval accuracy per subject and category."""
    return _benchmark("ceval", o, values)


def generate(o: EvalGenerate | None = None, **values: Any) -> dict:
    """Answers for aligned prompts, scored against their references (ROUGE, BLEU-4, exact match)."""
    from lmforge.shared.infer.evaluate import generate_eval

    return generate_eval(options(EvalGenerate, o, values))


def perplexity(o: EvalPerplexity | None = None, **values: Any) -> dict:
    """Perplexity on packed pt or sft data."""
    from lmforge.shared.infer.evaluate import perplexity_eval

    return perplexity_eval(options(EvalPerplexity, o, values))


def rm(o: EvalRM | None = None, **values: Any) -> dict:
    """A reward model's pairwise accuracy and mean margin."""
    from lmforge.shared.infer.evaluate import reward_eval

    return reward_eval(options(EvalRM, o, values))
