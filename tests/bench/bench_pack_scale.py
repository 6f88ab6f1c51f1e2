"""`data align` + `data pack` on a million alpaca rows: rows/s and peak memory, which must stay
flat as the input grows.

    python tests/bench/bench_pack_scale.py [ROWS [LF_ROWS]]   # default 1,000,000; also runs ROWS / 10;
                                                              # LLaMA-Factory on LF_ROWS (default ROWS)

Synthetic alpaca rows (seeded random words: instruction 5-30 words, input empty or 5-40 words,
output 20-300 words) are written once to a JSON array under $LMFORGE_BENCH_DIR (default .bench;
`LMFORGE_BENCH_DIR=/tmp/...` keeps them off the repository's disk). Each command runs on its own
while a sampler reads the resident memory of its whole process tree (the command and its
`--num-proc` workers) every 50 ms: the table gives the tree's peak and the largest single
process's. LLaMA-Factory 0.9.5's preprocessing runs on the same JSON when its virtualenv exists
(`make lf-venv`).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import LMFORGE, WORK, command, record, shared, table, versions

ROWS = 1_000_000
CUTOFF = 1024


def make_rows(path: Path, rows: int, seed: int = 0) -> None:
    """A JSON array of `rows` alpaca examples, streamed to disk (never all in memory)."""
    if path.exists():
        return
    rng = random.Random(seed)
    words = [w.strip(".,;:!?\"'()").lower() for w in
             (shared("data/llamafactory/alpaca_en_demo.json") or Path(__file__)).read_text().split()]
    words = [w for w in words if w.isalpha()] or ["word"]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        f.write("[\n")
        for i in range(rows):
            def text(lo: int, hi: int) -> str:
                return " ".join(rng.choices(words, k=rng.randint(lo, hi)))
            row = {"instruction": text(5, 30).capitalize() + "?", "input": text(5, 40) if rng.random() < 0.5 else "",
                   "output": text(20, 300).capitalize() + "."}
            f.write(("," if i else "") + json.dumps(row) + "\n")
        f.write("]\n")
    tmp.rename(path)


def _tree_rss(pid: int) -> tuple[int, int, int]:
    """(sum, largest, anonymous sum) resident KiB of `pid` and its descendants. Resident memory counts the
    pages of memory-mapped files read (the input, mapped, is reclaimable page cache); the anonymous part is
    the memory the processes hold themselves."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total = largest = anon = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kib = int(line.split()[1])
                    total, largest = total + kib, max(largest, kib)
                elif line.startswith("RssAnon:"):
                    anon += int(line.split()[1])
        except OSError:
            continue
    return total, largest, anon


def sampled(cmd: list, cwd: Path | None = None, env: dict | None = None) -> dict:
    """Run `cmd`; wall seconds and the peak RSS (MiB) of its process tree, sampled every 50 ms."""
    import os

    start = time.perf_counter()
    proc = subprocess.Popen(command(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd,
                            env={**os.environ, **(env or {})})
    peak = {"tree": 0, "largest": 0, "anon": 0}

    def watch():
        while proc.poll() is None:
            total, largest, anon = _tree_rss(proc.pid)
            peak["tree"], peak["largest"] = max(peak["tree"], total), max(peak["largest"], largest)
            peak["anon"] = max(peak["anon"], anon)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    return {"seconds": time.perf_counter() - start, "tree_mib": peak["tree"] / 1024,
            "largest_mib": peak["largest"] / 1024, "anon_mib": peak["anon"] / 1024}


def run_size(rows: int, tokdir: Path) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    raw = WORK / f"synthetic_alpaca_{rows}.json"
    make_rows(raw, rows)
    aligned, packed = WORK / f"synthetic_{rows}.aligned.arrow", WORK / f"synthetic_{rows}.packed.arrow"
    align = sampled([LMFORGE, "data", "align", raw, "--format", "alpaca", "-o", aligned, "-q"])
    pack = sampled([LMFORGE, "data", "pack", aligned, "-m", tokdir, "-t", "qwen3", "--cutoff", CUTOFF, "--packing",
                    "--num-proc", "2", "-o", packed, "-q"])
    import pyarrow as pa
    import pyarrow.compute as pc

    tokens = packed_rows = 0
    with pa.memory_map(str(packed)) as source:
        for batch in pa.ipc.open_stream(source):   # batch by batch: a million rows' tokens stay on disk
            tokens += pc.sum(pc.list_value_length(batch.column("input_ids"))).as_py() or 0
            packed_rows += batch.num_rows
    sizes = {"json_mib": raw.stat().st_size / 2**20, "packed_rows": packed_rows, "tokens": tokens}
    aligned.unlink(missing_ok=True)
    packed.unlink(missing_ok=True)
    return {"align": align, "pack": pack, **sizes}


def main() -> None:
    numbers = [int(a) for a in sys.argv[1:] if a.isdigit()]   # (run.py passes benchmark names: ignored)
    rows = numbers[0] if numbers else ROWS
    lf_rows = numbers[1] if len(numbers) > 1 else rows   # LLaMA-Factory's side is slower: a smaller size keeps it short
    tokdir = shared("tokenizers/qwen3")
    if tokdir is None:
        sys.exit("needs ../shared/tokenizers/qwen3")
    sizes = [rows // 10, rows]
    results = {n: run_size(n, tokdir) for n in sizes}
    lines = []
    for n, r in results.items():
        for step in ("align", "pack"):
            m = r[step]
            lines.append([f"{n:,}", f"lmforge data {step}" + (" --packing --num-proc 2" if step == "pack" else ""),
                          f"{m['seconds']:.1f}", f"{n / m['seconds']:,.0f}", f"{m['tree_mib']:,.0f}",
                          f"{m['anon_mib']:,.0f}", f"{m['largest_mib']:,.0f}"])
    from bench_pack import llamafactory

    if lf_rows not in results:
        make_rows(WORK / f"synthetic_alpaca_{lf_rows}.json", lf_rows)
    lf = llamafactory(WORK / f"synthetic_alpaca_{lf_rows}.json", tokdir)
    if lf:
        lines.append([f"{lf_rows:,}", "LLaMA-Factory 0.9.5 preprocessing (2 workers, packing)", f"{lf['seconds']:.1f}",
                      f"{lf_rows / lf['seconds']:,.0f}", "", "", f"{lf['peak_mib']:,.0f}"])
    else:
        lines.append([f"{lf_rows:,}", "LLaMA-Factory 0.9.5", "not run: no .bench/lf-venv (`make lf-venv`)", "", "", "",
                      ""])
    big = results[rows]
    small = results[rows // 10]
    growth = big["pack"]["tree_mib"] / max(small["pack"]["tree_mib"], 1)
    anon_growth = big["pack"]["anon_mib"] / max(small["pack"]["anon_mib"], 1)
    body = table(["rows", "command", "seconds", "rows/s", "peak MiB (process tree)", "of it anonymous (peak)",
                  "peak MiB (largest process)"], lines)
    body += (f"\n\nSynthetic alpaca rows (seeded random words), {big['json_mib']:,.0f} MiB of JSON at {rows:,} rows; "
             f"Qwen3 tokenizer and template, cutoff {CUTOFF}, packing: {big['tokens']:,} tokens in "
             f"{big['packed_rows']:,} packed rows. Wall time of each whole command (start-up included). Peak memory "
             f"sampled every 50 ms over the command and its workers. Ten times the rows: x{growth:.2f} the peak "
             f"resident memory of `data pack`, x{anon_growth:.2f} its anonymous memory (resident memory includes the "
             "pages of the memory-mapped input read so far: page cache the kernel reclaims, not memory the "
             f"command holds). Versions: {versions('transformers', 'tokenizers', 'tiktoken', 'pyarrow')}.")
    record("pack-scale", f"`data align` + `data pack` at {rows:,} alpaca rows: rows/s and flat memory",
           f"python tests/bench/bench_pack_scale.py {rows}" + (f" {lf_rows}" if lf_rows != rows else ""), body)


if __name__ == "__main__":
    main()
