"""`data pack` throughput (goal >= 3x a plain baseline).

alpaca_en_demo replicated to 100,000 rows, Qwen3 tokenizer and template, cutoff 1024, sft with
packing, `--num-proc 2`. Side by side, on the same aligned rows:
- plain baseline: `datasets.map` rendering each row with `apply_chat_template`, then batched
  tokenization (single process, the straightforward script), and the same with `num_proc=2`;
- LLaMA-Factory 0.9.5's own preprocessing (`llamafactory-cli train` with `tokenized_path`, which
  stops after the data pipeline), when its virtualenv exists (`make lf-venv`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from common import (
    LMFORGE,
    ROOT,
    WORK,
    measure_isolated,
    record,
    shared,
    table,
    versions,
)

ROWS = 100_000
BASELINE = r'''
import sys, datasets
from transformers import AutoTokenizer
datasets.disable_progress_bars()
src, tokdir, nproc = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(tokdir)
ds = datasets.Dataset.from_file(src)
def render(ex):
    msgs = ([{"role": "system", "content": ex["system"]}] if ex["system"] else []) + ex["prompt"] + ex["response"]
    return {"text": tok.apply_chat_template(msgs, tokenize=False)}
ds = ds.map(render, num_proc=nproc, remove_columns=ds.column_names)
ds = ds.map(lambda b: tok(b["text"], add_special_tokens=False, truncation=True, max_length=1024),
            batched=True, num_proc=nproc, remove_columns=["text"])
print(sum(len(x) for x in ds["input_ids"]))
'''
LF_VENV = ROOT / ".bench" / "lf-venv"


def aligned_input() -> Path:
    src = shared("data/llamafactory/alpaca_en_demo.json")
    if src is None:
        sys.exit("needs ../shared/data/llamafactory/alpaca_en_demo.json (set LMFORGE_SHARED)")
    WORK.mkdir(parents=True, exist_ok=True)
    raw = WORK / f"alpaca_{ROWS}.json"
    base = json.loads(src.read_text())
    if not raw.exists():
        raw.write_text(json.dumps([base[i % len(base)] for i in range(ROWS)]))
    out = WORK / f"alpaca_{ROWS}.arrow"
    if not out.exists():
        measure_isolated([LMFORGE, "data", "align", raw, "-o", out, "-q"])
    return out


def llamafactory(raw: Path, tokdir: Path) -> dict | None:
    """LLaMA-Factory's data pipeline alone: it writes the tokenized dataset to `tokenized_path`.

    (0.9.5 then goes on to load model weights; the stand-in model directory has none, so the run
    ends there, after the data is written. Its time is the pipeline's, plus start-up.)"""
    cli = LF_VENV / "bin" / "llamafactory-cli"
    if not cli.exists():
        return None
    import yaml

    work = WORK / "lf"
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    (work / "model").mkdir()
    for f in tokdir.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, work / "model" / f.name)
    (work / "model" / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 4096}))
    shutil.copy(raw, work / "data" / "alpaca_bench.json")
    (work / "data" / "dataset_info.json").write_text(json.dumps({"alpaca_bench": {"file_name": "alpaca_bench.json"}}))
    config = {"model_name_or_path": str(work / "model"), "stage": "sft", "do_train": True, "finetuning_type": "lora",
              "dataset": "alpaca_bench", "dataset_dir": str(work / "data"), "template": "qwen3", "cutoff_len": 1024,
              "packing": True, "preprocessing_num_workers": 2, "tokenized_path": str(work / "tokenized"),
              "output_dir": str(work / "out"), "overwrite_cache": True, "report_to": "none"}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    result = measure_isolated([cli, "train", work / "config.yaml"], allow_failure=True, cwd=work,
                              env={"HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "CUDA_VISIBLE_DEVICES": ""})
    if not (work / "tokenized" / "dataset_dict.json").exists():
        print(f"LLaMA-Factory run failed: {result['stderr'][-800:]}")
        return None
    return result


def main() -> None:
    tokdir = shared("tokenizers/qwen3")
    if tokdir is None:
        sys.exit("needs ../shared/tokenizers/qwen3")
    src = aligned_input()
    out = WORK / "packed.arrow"
    ours = measure_isolated([LMFORGE, "data", "pack", src, "-m", tokdir, "-t", "qwen3", "--cutoff", "1024",
                             "--packing", "--num-proc", "2", "-o", out, "-q"])
    import pyarrow as pa

    tokens = sum(len(x) for x in pa.ipc.open_stream(pa.memory_map(str(out))).read_all().column("input_ids").to_pylist())
    rows = [["lmforge data pack --packing --num-proc 2", f"{ours['seconds']:.1f}", f"{ROWS / ours['seconds']:,.0f}",
             f"{tokens / ours['seconds']:,.0f}", f"{ours['peak_mib']:.0f}", "1.0x"]]
    results = {}
    for nproc in (1, 2):
        fresh = WORK / f"baseline_{nproc}"
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
        shutil.copy(src, fresh / "in.arrow")  # datasets writes its caches beside the input: start clean
        results[nproc] = measure_isolated([sys.executable, "-c", BASELINE, fresh / "in.arrow", tokdir, nproc])
    for nproc, label in ((1, "datasets.map + apply_chat_template (plain, 1 process)"),
                         (2, "datasets.map + apply_chat_template, num_proc=2")):
        r = results[nproc]
        rows.append([label, f"{r['seconds']:.1f}", f"{ROWS / r['seconds']:,.0f}", f"{tokens / r['seconds']:,.0f}",
                     f"{r['peak_mib']:.0f}", f"{r['seconds'] / ours['seconds']:.1f}x"])
    lf = llamafactory(WORK / f"alpaca_{ROWS}.json", tokdir)
    if lf:
        rows.append(["LLaMA-Factory 0.9.5 preprocessing (2 workers, packing)", f"{lf['seconds']:.1f}",
                     f"{ROWS / lf['seconds']:,.0f}", f"{tokens / lf['seconds']:,.0f}", f"{lf['peak_mib']:.0f}",
                     f"{lf['seconds'] / ours['seconds']:.1f}x"])
    else:
        rows.append(["LLaMA-Factory 0.9.5", "not run (no .bench/lf-venv: `make lf-venv`)", "", "", "", ""])
    body = table(["pipeline", "seconds", "rows/s", "tokens/s", "peak MiB", "lmforge speed-up"], rows)
    body += (f"\n\n{ROWS:,} alpaca rows, Qwen3 tokenizer and template, cutoff 1024; wall time of each whole "
             "command (start-up included: importing transformers and loading the tokenizer take about 4 s of "
             "lmforge's time). lmforge also writes labels and packs rows; the datasets baseline only "
             f"renders and tokenizes. tokens/s counts the {tokens:,} tokens lmforge produced. "
             f"Versions: {versions('transformers', 'tokenizers', 'tiktoken', 'datasets')}.")
    record("pack", "`data pack`: 100k alpaca rows, Qwen3, cutoff 1024, packing (goal >= 3x baseline)",
           "python tests/bench/bench_pack.py", body)


if __name__ == "__main__":
    main()
