"""Memory of model-sharing PPO (the seed's RLHF design) on SmolLM2-135M-Instruct, CPU: peak RSS of
`train ppo --layout shared` (one base model; policy, value and reward are adapters, the reference
is the base with adapters off) against `train sft --method lora` on the same model, and against
the four-model layout (`--layout separate`). Goal: shared <= 1.5x sft-lora."""

from __future__ import annotations

import os

from bench_train import smollm2
from common import LMFORGE, WORK, measure_isolated, record, shared, table, versions


def main() -> None:
    model = smollm2()
    WORK.mkdir(parents=True, exist_ok=True)
    prefs = shared("data/llamafactory/dpo_en_demo.json")
    alpaca = shared("data/llamafactory/alpaca_en_demo.json")
    if prefs is None or alpaca is None:
        raise SystemExit("needs ../shared/data/llamafactory")
    run = lambda *args: measure_isolated([LMFORGE, *args, "-q"])  # noqa: E731
    run("data", "align", prefs, "-o", WORK / "ppo_prefs.arrow")
    run("data", "align", alpaca, "-o", WORK / "ppo_prompts.arrow")
    run("data", "pack", WORK / "ppo_prefs.arrow", "-m", model, "-t", "smollm", "-s", "rm", "--cutoff", 256,
        "-o", WORK / "ppo_rm.packed")
    run("data", "pack", WORK / "ppo_prompts.arrow", "-m", model, "-t", "smollm", "-s", "ppo", "--cutoff", 128,
        "-o", WORK / "ppo_prompts.packed")
    run("data", "pack", WORK / "ppo_prompts.arrow", "-m", model, "-t", "smollm", "--cutoff", 256,
        "-o", WORK / "ppo_sft.packed")
    rm = WORK / "ppo_reward"
    run("train", "rm", "-m", model, "-d", WORK / "ppo_rm.packed", "-o", rm, "--method", "lora", "--max-steps", 4,
        "--batch-size", 2, "--grad-accum", 1, "--overwrite")
    common = ["--batch-size", 4, "--mini-batch-size", 2, "--max-steps", 3, "--max-new-tokens", 32, "--overwrite"]
    runs = {
        "train sft --method lora (batch 4)": run("train", "sft", "-m", model, "-d", WORK / "ppo_sft.packed",
                                                 "-o", WORK / "ppo_sftrun", "--method", "lora", "--max-steps", 3,
                                                 "--batch-size", 4, "--grad-accum", 1, "--overwrite"),
        "train ppo --layout shared": run("train", "ppo", "-m", model, "--reward", rm, "-d",
                                         WORK / "ppo_prompts.packed", "-o", WORK / "ppo_shared", "--layout",
                                         "shared", *common),
        "train ppo --layout separate (four models)": run("train", "ppo", "-m", model, "--reward", rm, "-d",
                                                         WORK / "ppo_prompts.packed", "-o", WORK / "ppo_separate",
                                                         "--layout", "separate", *common),
    }
    sft_peak = runs["train sft --method lora (batch 4)"]["peak_mib"]
    rows = [[name, f"{r['peak_mib']:,.0f}", f"{r['peak_mib'] / sft_peak:.2f}x", f"{r['seconds']:.0f}"]
            for name, r in runs.items()]
    body = table(["run", "peak RSS MiB", "vs sft-lora", "wall s"], rows)
    body += ("\n\nSmolLM2-135M-Instruct, fp32 on the CPU "
             f"({os.cpu_count()} threads); PPO: 3 steps of 4 prompts (alpaca_en_demo), 32 new tokens, mini-batches "
             "of 2, LoRA r 8; reward model: `train rm --method lora` on dpo_en_demo (4 steps). "
             f"{versions('torch', 'transformers', 'peft', 'trl')}.")
    record("ppo-memory", "PPO memory: model sharing vs sft-lora vs four models (SmolLM2-135M, CPU)",
           "python tests/bench/run.py bench_ppo", body)


if __name__ == "__main__":
    main()
