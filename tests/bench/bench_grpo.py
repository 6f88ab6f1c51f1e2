"""`train grpo` against TRL's GRPOTrainer used directly: same model (stories260K), same task (the
demo's "first word" prompts with their answers), same settings (LoRA r 8, groups of 4, batch of 2
prompts, 8 new tokens, exact-match reward, beta 0, dapo). Steps/s, generated tokens/s and peak RSS.

The direct run is `python bench_grpo.py --trl MODEL PROMPTS.jsonl OUT STEPS` (a fresh process, so
its peak memory is its own); it renders the prompts with the same template text lmforge packed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

STEPS, GROUP, PROMPTS_PER_STEP, NEW_TOKENS = 8, 4, 2, 8


def trl_direct(model: str, prompts: str, out: str, steps: int) -> None:
    """TRL's GRPOTrainer on its own: text prompts, its own tokenization and reward plumbing."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(x) for x in Path(prompts).read_text().splitlines()]
    data = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "reference": [r["reference"] for r in rows]})
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def exact(prompts, completions, reference, **_):
        return [float(" ".join(c.split()) == " ".join((r or "").split())) for c, r in zip(completions, reference)]

    torch.set_num_threads(os.cpu_count() or 1)
    config = GRPOConfig(output_dir=out, per_device_train_batch_size=PROMPTS_PER_STEP * GROUP,
                        num_generations=GROUP, max_completion_length=NEW_TOKENS, max_steps=steps,
                        learning_rate=1e-4, beta=0.0, loss_type="dapo", logging_steps=1, save_strategy="no",
                        report_to="none", use_cpu=True, seed=42, disable_tqdm=True, temperature=1.0)
    lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear")
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model), reward_funcs=exact, args=config,
                          train_dataset=data, processing_class=tokenizer, peft_config=lora)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    logs = [e for e in trainer.state.log_history if "completions/mean_length" in e]
    generated = sum(e["completions/mean_length"] * PROMPTS_PER_STEP * GROUP for e in logs)
    print(json.dumps({"train_seconds": seconds, "generated": generated, "steps": len(logs)}))


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/, for demo.py
    import demo
    from common import LMFORGE, WORK, measure_isolated, record, shared, table, versions

    model = shared("models/stories260K")
    if model is None:
        raise SystemExit("needs ../shared/models/stories260K")
    work = WORK / "grpo"
    work.mkdir(parents=True, exist_ok=True)
    demo.write(work / "raw", rows=800)
    rows = [json.loads(x) for x in (work / "raw" / "tasks.jsonl").read_text().splitlines()]
    first = [r for r in rows if r["instruction"] == demo.INSTRUCTIONS["first"]]
    (work / "first.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first))
    run = lambda *args: measure_isolated([LMFORGE, *args, "-q"])  # noqa: E731
    run("data", "align", work / "first.jsonl", "-o", work / "first.arrow")
    packed = work / "first.packed"
    packed.unlink(missing_ok=True)
    run("data", "pack", work / "first.arrow", "-m", model, "-t", "default", "-s", "ppo", "--cutoff", 64, "-o", packed)

    # the same prompts as text for TRL: lmforge's packed ids decoded (specials kept), and the answers
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    ds = Dataset.from_file(str(packed))
    with open(work / "prompts.jsonl", "w") as f:
        for r in ds:
            f.write(json.dumps({"prompt": tokenizer.decode(r["prompt_ids"]),
                                "reference": tokenizer.decode(r["response_ids"], skip_special_tokens=True).strip()}) + "\n")

    ours = run("train", "grpo", "-m", model, "-d", packed, "-o", work / "ours", "--overwrite", "--reward", "exact",
               "--max-steps", STEPS, "--batch-size", PROMPTS_PER_STEP, "--num-generations", GROUP,
               "--max-new-tokens", NEW_TOKENS, "--lr", "1e-4", "--lora-rank", 8, "--save-steps", 1000)
    record_ = json.loads((work / "ours" / "lmforge.json").read_text())
    log = [json.loads(x) for x in (work / "ours" / "trainer_log.jsonl").read_text().splitlines()]
    steps_log = [e for e in log if "completions/mean_length" in e]
    ours_train = record_["metrics"]["runtime_seconds"]
    ours_generated = sum(e["completions/mean_length"] * PROMPTS_PER_STEP * GROUP for e in steps_log)

    result = work / "trl_result.json"
    result.unlink(missing_ok=True)
    helper = measure_isolated([sys.executable, __file__, "--trl", model, work / "prompts.jsonl", work / "trl", STEPS])
    if not result.exists():
        raise SystemExit("the TRL run wrote no result")
    trl = json.loads(result.read_text())
    rows_out = [
        ["lmforge train grpo", f"{STEPS / ours_train:.2f}", f"{ours_generated / ours_train:.0f}",
         f"{ours['peak_mib']:,.0f}", f"{ours['seconds']:.0f}"],
        ["TRL GRPOTrainer, direct", f"{trl['steps'] / trl['train_seconds']:.2f}",
         f"{trl['generated'] / trl['train_seconds']:.0f}", f"{helper['peak_mib']:,.0f}", f"{helper['seconds']:.0f}"],
    ]
    load = os.getloadavg()[0]
    body = table(["run", "steps/s", "generated tokens/s", "peak RSS MiB", "wall s (with loading)"], rows_out)
    body += (f"\n\nstories260K, fp32 on the CPU; {STEPS} steps of {PROMPTS_PER_STEP} prompts x {GROUP} completions, "
             f"{NEW_TOKENS} new tokens, LoRA r 8 (all linear layers), beta 0, loss dapo, exact-match reward on the demo's "
             f"\"first word\" prompts. steps/s and tokens/s over the training loop only. Load average {load:.1f} on "
             f"{os.cpu_count()} cores while measuring (a machine shared with other jobs: the figures are noisy). "
             f"{versions('torch', 'transformers', 'peft', 'trl')}.")
    record("grpo", "GRPO: lmforge train grpo vs TRL's GRPOTrainer used directly (stories260K, CPU)",
           "python tests/bench/run.py bench_grpo", body)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--trl"]:
        model_, prompts_, out_, steps_ = sys.argv[2:6]
        import contextlib
        import io

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            trl_direct(model_, prompts_, out_, int(steps_))
        result = buffer.getvalue().strip().splitlines()[-1]
        Path(out_).parent.joinpath("trl_result.json").write_text(result)
    else:
        main()
