"""Context parallelism: peak memory per process and tokens/s against the row length, 2 processes.

    python tests/bench/bench_contextpar.py [CUTOFF ...]        # default 4096 8192 16384 32768

A tiny Llama (hidden 128, 4 layers, 4 query / 2 key-value heads of 32, vocabulary 1,024), full
tuning with plain SGD (no optimizer state), lmforge's chunked loss, no gradient checkpointing: what
grows with the row is the activations. Each row is one example of CUTOFF tokens. Two processes
(torchrun, gloo) per run, each run in fresh processes:

- N = 1: data parallel, each process trains a whole row (lmforge's per-example sdpa);
- N = 2, Ulysses / ring: both processes share one row (shared/train/contextpar).

Per process: the tensors autograd keeps for backward (counted in one more forward pass, each
storage once, parameters left out: what context parallelism divides), and the resident memory
before the first step and at its peak (max RSS), whose difference also holds backward's passing
buffers and what the allocator keeps. tokens/s counts the tokens the two processes trained
together (N = 1: two rows per step, N = 2: one), over the timed steps after one warm-up step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import record, table, versions

CUTOFFS = (4096, 8192, 16384, 32768)
STEPS = 2   # timed, after one warm-up step
RUNS = (("N = 1 (data parallel)", 1, "none"), ("N = 2, Ulysses", 2, "ulysses"), ("N = 2, ring", 2, "ring"))


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(cutoff: int, size: int, mode: str) -> None:
    import resource

    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmforge.shared.train.patches import lossfn, packedattn

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    config = AutoConfig.for_model("llama", vocab_size=1024, hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=cutoff, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").train()
    rows = 1
    batch = {"input_ids": torch.randint(0, 1024, (rows, cutoff)), "position_ids": torch.arange(cutoff)[None],
             "use_cache": False}
    batch["labels"] = batch["input_ids"].clone()
    if size > 1:
        from lmforge.shared.train.contextpar import attention
        from lmforge.shared.train.contextpar.layout import setup
        from lmforge.shared.train.contextpar.shard import shard_causal

        layout = setup(size)
        attention.install(model, layout, mode)
        batch = shard_causal(batch, layout)
    else:
        packedattn.install(model)
    lossfn.install(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    world = dist.get_world_size()
    before = _rss_mib()
    times = []
    for step in range(STEPS + 1):
        dist.barrier()
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        for p in model.parameters():   # DDP's averaging, done by hand (the same all-reduce)
            dist.all_reduce(p.grad)
            p.grad /= world
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        if step:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def count(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        loss = model(**batch).loss
    del loss
    mine = torch.tensor([before, peak, sum(times) / len(times), sum(kept.values()) / 2**20], dtype=torch.float64)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    if dist.get_rank() == 0:
        seconds = max(float(e[2]) for e in everyone)
        tokens = cutoff * world // size   # rows trained per step x their length
        print(json.dumps({"before": [float(e[0]) for e in everyone], "peak": [float(e[1]) for e in everyone],
                          "saved": max(float(e[3]) for e in everyone), "seconds": seconds,
                          "tokens_per_second": tokens / seconds}), flush=True)
    dist.destroy_process_group()


def launch(cutoff: int, size: int, mode: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), __file__, "--worker", str(cutoff), str(size), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"cutoff {cutoff}, N = {size} ({mode}) failed:\n{out.stderr[-3000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    cutoffs = [int(a) for a in sys.argv[1:]] or list(CUTOFFS)
    rows = []
    for cutoff in cutoffs:
        base = None
        for name, size, mode in RUNS:
            started = time.monotonic()
            r = launch(cutoff, size, mode)
            grown = max(p - b for p, b in zip(r["peak"], r["before"]))
            base = base or (r["saved"], grown, r["tokens_per_second"])
            rows.append([f"{cutoff:,}", name, f"{r['saved']:,.0f}", f"{r['saved'] / base[0]:.2f}x",
                         f"{max(r['peak']):,.0f}", f"{grown:,.0f}", f"{grown / base[1]:.2f}x",
                         f"{r['tokens_per_second']:,.0f}", f"{r['tokens_per_second'] / base[2]:.2f}x",
                         f"{r['seconds']:.2f}"])
            print(f"cutoff {cutoff} {name}: {r} ({time.monotonic() - started:.0f}s)", file=sys.stderr, flush=True)
    body = table(["tokens per row", "run", "kept for backward, MiB per process", "vs N = 1",
                  "peak RSS MiB per process", "RSS growth MiB", "vs N = 1", "tokens/s (both processes)", "vs N = 1",
                  "s per step"], rows)
    body += ("\n\nTiny Llama (hidden 128, 4 layers, 4 query / 2 key-value heads of 32, vocabulary 1,024), full tuning "
             "with SGD, lmforge's chunked loss, no gradient checkpointing, one example per row; 2 processes (gloo, "
             f"1 thread each); {STEPS} timed steps after a warm-up step. \"kept for backward\": the tensors autograd "
             "saves in a forward pass (each storage once, no parameters); \"RSS growth\": a process's peak minus its "
             "resident memory before the first step; both the larger of the two processes. "
             f"{versions('torch', 'transformers')}.")
    record("contextpar", "Context parallelism: memory per process and tokens/s against row length (2 processes, CPU)",
           f"python tests/bench/bench_contextpar.py {' '.join(map(str, cutoffs))}", body)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        main()
