"""`data align` throughput and memory (goal >= 50,000 rows/s; peak memory flat in input size).

alpaca_en_demo replicated to 100,000 and 400,000 rows of JSONL. Side by side: the plain approach
(LLaMA-Factory's): `datasets.load_dataset("json")` then `.map()` into the same aligned columns.
"""

from __future__ import annotations

import json
import sys

from common import LMFORGE, WORK, measure_isolated, record, shared, table, versions

BASELINE = r'''
import sys, datasets
datasets.disable_progress_bars()
ds = datasets.load_dataset("json", data_files=sys.argv[1], split="train", cache_dir=sys.argv[2])
def convert(ex):
    content = "\n".join(x for x in (ex["instruction"], ex["input"]) if x)
    return {"prompt": [{"role": "user", "content": content}],
            "response": [{"role": "assistant", "content": ex["output"]}], "system": "", "tools": ""}
ds = ds.map(convert, remove_columns=ds.column_names)
ds.to_parquet(sys.argv[3])
'''


def make_input(rows: int) -> str:
    src = shared("data/llamafactory/alpaca_en_demo.json")
    if src is None:
        sys.exit("needs ../shared/data/llamafactory/alpaca_en_demo.json (set LMFORGE_SHARED)")
    base = json.loads(src.read_text())
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"alpaca_{rows}.jsonl"
    if not path.exists():
        with open(path, "w") as f:
            for i in range(rows):
                f.write(json.dumps(base[i % len(base)]) + "\n")
    return str(path)


def main() -> None:
    rows_out = []
    for n in (100_000, 400_000):
        src = make_input(n)
        ours = measure_isolated([LMFORGE, "data", "align", src, "-o", WORK / "aligned.arrow", "-q"])
        entry = [f"{n:,}", f"{n / ours['seconds']:,.0f}", f"{ours['peak_mib']:.0f}"]
        if n == 100_000:
            base = measure_isolated([sys.executable, "-c", BASELINE, src, WORK / "hf_cache", WORK / "base.parquet"])
            entry += [f"{n / base['seconds']:,.0f}", f"{base['peak_mib']:.0f}",
                      f"{base['seconds'] / ours['seconds']:.1f}x"]
        else:
            entry += ["", "", ""]
        rows_out.append(entry)
    body = table(["rows", "lmforge rows/s", "lmforge peak MiB", "datasets+map rows/s", "datasets+map peak MiB",
                  "speed-up"], rows_out)
    body += ("\n\nWall time of the whole command (start-up included). Peak memory is the process's "
             "max RSS; equal peaks at 100k and 400k rows show it does not grow with the input. "
             f"Versions: {versions('pyarrow', 'datasets')}.")
    record("align", "`data align`: alpaca_en_demo replicated (goal >= 50,000 rows/s, flat memory)",
           "python tests/bench/bench_align.py", body)


if __name__ == "__main__":
    main()
