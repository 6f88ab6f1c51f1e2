"""The output layer + cross-entropy at a 150k vocabulary on the CPU: lmforge's chunked loss
(shared/train/lossfn.py) against the plain one (logits for every token, then
`F.cross_entropy`, as transformers' ForCausalLMLoss computes it), forward and backward.

Each variant runs in a fresh process: the inputs (hidden states, output weights, labels) are made
first, then the process's peak RSS is read before and after the loss's forward and backward, so
the figure is what the loss itself adds. Sizes: Qwen2.5-0.5B's hidden size (896) and Qwen's
vocabulary (151,936); `python tests/bench/bench_loss.py TOKENS` for another token count.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from common import record, table, versions

TOKENS, HIDDEN, VOCAB, REPEATS = 2048, 896, 151_936, 2

CHILD = r'''
import json, resource, sys, time
import torch
import torch.nn.functional as F
from lmforge.shared.train.patches.lossfn import linear_cross_entropy
variant, trains, tokens, hidden, vocab, repeats = sys.argv[1], sys.argv[2] == "1", *map(int, sys.argv[3:7])
torch.manual_seed(0)
h = torch.randn(tokens, hidden).mul_(0.5).requires_grad_(True)   # in place: no transient copy in the baseline
w = torch.randn(vocab, hidden).mul_(0.02).requires_grad_(trains)
y = torch.randint(0, vocab, (tokens,))
y[::7] = -100   # some tokens without a label (prompt tokens)
def plain():
    logits = (h @ w.T).float()
    return F.cross_entropy(logits, y, ignore_index=-100, reduction="sum") / (y != -100).sum()
def chunked():
    keep = y != -100
    return linear_cross_entropy(h[keep], w, None, y[keep]) / keep.sum()
fn = {"plain": plain, "chunked": chunked}[variant]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # inputs made, nothing computed yet
times, losses = [], []
for _ in range(repeats + 1):   # the first is a warm-up (allocator, thread pools), not timed
    start = time.perf_counter()
    loss = fn()
    loss.backward()
    times.append(time.perf_counter() - start)
    losses.append(float(loss))
    h.grad = w.grad = None
times = times[1:]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"times": times, "loss": losses[-1], "base_mib": base / 1024, "peak_mib": peak / 1024}))
'''


def run(variant: str, trains: bool, tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, variant, "1" if trains else "0", str(tokens), str(HIDDEN),
                          str(VOCAB), str(REPEATS)],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else TOKENS
    logits_mib = tokens * VOCAB * 4 / 2**20
    rows = []
    for trains, case in ((False, "frozen (LoRA)"), (True, "trained (full)")):
        results = {v: run(v, trains, tokens) for v in ("plain", "chunked")}
        plain = results["plain"]
        for name, label in (("plain", "plain: logits, then F.cross_entropy"),
                            ("chunked", "lmforge chunked linear cross-entropy")):
            r = results[name]
            added = r["peak_mib"] - r["base_mib"]
            rows.append([case, label, f"{added:,.0f}", f"{(plain['peak_mib'] - plain['base_mib']) / max(added, 1):.1f}x",
                         f"{statistics.median(r['times']):.2f}",
                         f"{statistics.median(r['times']) / statistics.median(plain['times']):.2f}x", f"{r['loss']:.5f}"])
    body = table(["output layer", "loss", "memory the loss adds (MiB)", "less than plain", "seconds (fwd+bwd)",
                  "time vs plain", "loss value"], rows)
    body += (f"\n\n{tokens:,} tokens, hidden size {HIDDEN}, vocabulary {VOCAB:,} (Qwen's), fp32 on the CPU, "
             f"every 7th token unlabelled; seconds: median of {REPEATS} after a warm-up; memory: the process's peak "
             "RSS over the runs minus its RSS once the inputs exist (the output weights' gradient, 519 MiB, counts "
             f"when they train). One token's logits are {VOCAB * 4 / 1024:.0f} KiB, all of them {logits_mib:,.0f} "
             "MiB: the plain loss holds the logits, their softmax and their gradient at once; the chunked loss "
             "computes the logits of 256 tokens at a time (at least 32 MiB) and hands back the gradients it "
             f"computed in the forward pass. Same loss value (fp32 rounding). {versions('torch')}.")
    record("loss", f"Chunked cross-entropy vs the plain loss at a {VOCAB:,}-token vocabulary (CPU)",
           f"python tests/bench/bench_loss.py {tokens}", body)


if __name__ == "__main__":
    main()
