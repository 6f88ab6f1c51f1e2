"""SmolLM2-135M-Instruct on MMLU (val split, 5-shot): average and per-category accuracy, wall
time and questions/s on this machine."""

from __future__ import annotations

import json
import subprocess
import sys

from bench_train import smollm2
from common import LMFORGE, record, shared, table


def main() -> None:
    mmlu = shared("data/eval/mmlu/mmlu.zip")
    if mmlu is None:
        sys.exit("needs ../shared/data/eval/mmlu")
    model = smollm2()
    cmd = [LMFORGE, "eval", "mmlu", "-m", str(model), "-d", str(mmlu), "--split", "val", "--shots", "5",
           "--batch-size", "4", "--json", "-q"]
    out = subprocess.run(cmd, capture_output=True, check=True)
    report = json.loads(out.stdout)
    rows = [[c, v["questions"], f"{v['accuracy']:.2f}"] for c, v in report["categories"].items()]
    rows.append(["**average**", report["questions"], f"**{report['average']:.2f}**"])
    body = table(["category", "questions", "accuracy (%)"], rows)
    body += (f"\n\n{report['questions']:,} questions in {report['seconds']:.0f} s ({report['questions_per_second']:.2f} "
             f"questions/s), template `{report['template']}` (the model's own chat template), fp32 on the CPU. "
             "Random guessing scores 25%.")
    record("mmlu", "SmolLM2-135M-Instruct on MMLU (val, 5-shot)",
           "lmforge eval mmlu -m smollm2 -d mmlu.zip --split val --shots 5", body)


if __name__ == "__main__":
    main()
