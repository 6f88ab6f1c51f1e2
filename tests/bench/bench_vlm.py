"""Vision-language sft keeps flat memory: images stay encoded in the (memory-mapped) packed rows and
are decoded and processed per batch by the collator, so peak RSS does not grow with the number of
image rows. A tiny Qwen2-VL (tests/vlmkit.py) trains one epoch of LoRA over 1,000 and over N
(default 10,000) generated 112x112 image rows; rows/s and peak RSS of both runs go to RESULTS.md.

    python tests/bench/bench_vlm.py [ROWS]
"""

from __future__ import annotations

import json
import sys

from common import LMFORGE, ROOT, WORK, measure_isolated, record, table, versions

sys.path.insert(0, str(ROOT / "tests"))

BATCH = 16
SIZE = (112, 112)


def main(rows_big: int = 10_000) -> None:
    from vlmkit import colour_rows, qwen2_vl

    work = WORK / "vlm"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    model = qwen2_vl(work / "model")
    results = []
    for n in (1_000, rows_big):
        raw = colour_rows(work / f"raw{n}", n, seed=n, sizes=(SIZE,))
        aligned, packed = work / f"a{n}.arrow", work / f"p{n}.arrow"
        measure_isolated([LMFORGE, "data", "align", raw, "-o", aligned, "-q"])
        pack = measure_isolated([LMFORGE, "data", "pack", aligned, "-m", model, "--cutoff", 256, "-o", packed, "-q"])
        out = work / f"run{n}"
        run = measure_isolated([LMFORGE, "train", "sft", "-m", model, "-d", packed, "-o", out, "--epochs", 1,
                                "--batch-size", BATCH, "--grad-accum", 1, "--save-steps", 10**6,
                                "--logging-steps", 50, "-q"])
        metrics = json.loads((out / "lmforge.json").read_text())["metrics"]
        results.append([f"{n:,}", f"{packed.stat().st_size / 2**20:.1f}", f"{pack['seconds']:.1f}",
                        metrics["steps"], f"{n / metrics['runtime_seconds']:.1f}", f"{run['peak_mib']:,.0f}"])
    per_image = 64 * 1176 * 4   # Qwen2-VL pixel_values of one 112x112 image: 8x8 patches of 1,176 fp32
    body = table(["image rows", "packed MiB", "pack s", "steps", "train rows/s", "train peak RSS MiB"], results)
    body += (f"\n\nOne epoch of LoRA, batch {BATCH}, on a tiny Qwen2-VL (tests/vlmkit.py: 2 text and 2 vision "
             f"layers); images {SIZE[0]}x{SIZE[1]} PNG (a coloured square), 16 image tokens each. Holding every "
             f"image's processed pixels would take {rows_big * per_image / 2**20:,.0f} MiB at {rows_big:,} rows; "
             "the collator decodes each batch's images only, so the peak stays that of the 1,000-row run. "
             "Pack seconds include the process start (imports, the image processor). "
             + versions("torch", "transformers", "peft") + ".")
    record("vlm", f"Vision-language sft over {rows_big:,} image rows: flat memory", f"python tests/bench/bench_vlm.py {rows_big}",
           body)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
