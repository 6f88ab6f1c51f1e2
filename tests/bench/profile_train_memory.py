"""Where a `train sft` run's peak memory goes: RSS at each phase of one run, step by step.

    python tests/bench/profile_train_memory.py MODEL PACKED [STEPS] [extra train sft options...] [--glibc-default]

Runs `lmforge train sft` in this process with a sampler thread (RSS every 5 ms, so short peaks
inside a step are seen) and marks: after the model is loaded, after the method is applied, after
the Trainer is built, then each step's peak and end RSS, and the optimizer's state once it exists.
Prints one JSON object (phases, per-step peaks, the run's peak) on stdout. Memory that grows from
step to step after the first few is a leak; a first-step jump is the optimizer state and the
allocator's high-water mark of the first forward/backward.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = self.window = rss_mib()
        self.running = True

    def run(self):
        while self.running:
            now = rss_mib()
            self.peak = max(self.peak, now)
            self.window = max(self.window, now)
            time.sleep(0.005)

    def take_window(self) -> float:
        value, self.window = self.window, rss_mib()
        return value


def main() -> None:
    model, packed = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    extra = sys.argv[4:]
    sampler = Sampler()
    sampler.start()
    phases: list[tuple[str, float, float]] = []

    def mark(name: str) -> None:
        phases.append((name, round(rss_mib()), round(sampler.take_window())))

    mark("start")
    import torch  # noqa: F401
    from lmforge.shared.model import models
    from lmforge.shared.train import methods, training
    from transformers import TrainerCallback

    mark("torch, transformers imported")
    load, apply, build = models.load_model, methods.apply, training.build_default_trainer
    tensors: dict[str, float] = {}

    def load_model(*a, **k):
        model = load(*a, **k)
        tensors["weights_mib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        mark("model loaded")
        return model

    def apply_method(model, o):
        model = apply(model, o)
        mark("method applied (LoRA)")
        return model

    steps_seen: list[dict] = []

    class Steps(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_train_begin(self, args, state, control, **kw):
            mark("Trainer.train begins")

        def on_step_begin(self, args, state, control, **kw):
            self.before = rss_mib()
            sampler.take_window()

        def on_step_end(self, args, state, control, **kw):
            entry = {"step": state.global_step, "before": round(self.before), "peak": round(sampler.take_window()),
                     "after": round(rss_mib())}
            optimizer = getattr(self.trainer, "optimizer", None)
            if optimizer is not None and state.global_step == 1:
                tensors["optimizer_state_mib"] = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                                                     for t in s.values() if torch.is_tensor(t)) / 2**20
                tensors["grads_mib"] = sum(p.numel() * p.element_size() for g in optimizer.param_groups
                                           for p in g["params"]) / 2**20
            steps_seen.append(entry)

    def build_default_trainer(o, model, tokenizer, args, data, eval_data):
        trainer, collator = build(o, model, tokenizer, args, data, eval_data)
        mark("Trainer built (dataset opened)")
        trainer.add_callback(Steps(trainer))
        return trainer, collator

    if "--glibc-default" in extra:   # kept for the command lines in RESULTS.md: glibc's default is lmforge's
        extra.remove("--glibc-default")
    models.load_model = load_model
    methods.apply = apply_method
    training.build_default_trainer = build_default_trainer
    from lmforge.tools.main import app

    out = Path("/tmp") / f"lmforge-memprofile-{os.getpid()}-{int(time.time())}"
    try:
        app(["train", "sft", "-m", model, "-d", packed, "-o", str(out), "--max-steps", str(steps), "-q",
             "--save-steps", "100000", *extra], standalone_mode=False)
    finally:
        mark("run finished (saved)")
        sampler.running = False
    metrics = json.loads((out / "lmforge.json").read_text())["metrics"] if (out / "lmforge.json").exists() else {}
    print(json.dumps({"tokens_per_second": metrics.get("tokens_per_second"), "phases": phases, "steps": steps_seen, "peak_mib": round(sampler.peak),
                      "tensors_mib": {k: round(v, 1) for k, v in tensors.items()}}, indent=1))


if __name__ == "__main__":
    main()
