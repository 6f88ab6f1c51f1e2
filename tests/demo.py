"""The built-in demo's data: small string tasks that a tiny model learns in minutes on a CPU.

Written by the project (nothing copied): `python tests/demo.py OUT_DIR [--rows N]`
writes, deterministically,
    tasks.jsonl   alpaca rows   {"instruction", "input", "output"}
    chat.json     sharegpt rows {"conversations": [...]} with two tasks per conversation
    prefs.jsonl   pairwise rows {"instruction", "input", "chosen", "rejected"}
    corpus.jsonl  plain text {"text"}, one worked example per document, for pre-training
    eval.jsonl    held-out alpaca rows for before/after evaluation (50 per task)
    grpo.jsonl    prompts of the two tasks the SFT model gets partly right (capitals, last word) with
                  their answers, for GRPO: a group of sampled answers then holds right and wrong ones

The tasks (reverse a list of words, say its first or last word, count it, write it in capitals)
are learnable by a model of about a million parameters in minutes, so the metrics really move.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

WORDS = ("ant bee cat dog elk fox gnu hen ibis jay kiwi lion mole newt owl pig quail rat seal toad urchin vole "
         "wasp yak zebra").split()
TASKS = ("reverse", "first", "last", "count", "upper")
INSTRUCTIONS = {
    "reverse": "Reverse the order of the words.",
    "first": "What is the first word?",
    "last": "What is the last word?",
    "count": "How many words are there?",
    "upper": "Write the words in capital letters.",
}
CORPUS_PER_ROW = 2  # pre-training sees more worked examples than fine-tuning
NUMBERS = "zero one two three four five six seven eight nine".split()


def answer(task: str, words: list[str]) -> str:
    if task == "reverse":
        return " ".join(reversed(words))
    if task == "first":
        return words[0]
    if task == "last":
        return words[-1]
    if task == "count":
        return NUMBERS[len(words)]
    return " ".join(w.upper() for w in words)


def example(rng: random.Random, tasks: tuple[str, ...] = TASKS) -> tuple[str, str, str]:
    task = rng.choice(tasks)
    words = rng.sample(WORDS, rng.randint(2, 5))
    return INSTRUCTIONS[task], " ".join(words), answer(task, words)


def wrong(rng: random.Random, instruction: str, words: str, right: str) -> str:
    """A plausible wrong answer for preference data: the words unchanged, or shuffled."""
    options = [words, " ".join(rng.sample(words.split(), len(words.split())))]
    options = [o for o in options if o != right] or [right + " " + rng.choice(WORDS)]
    return rng.choice(options)


def write(out: Path, rows: int = 2000, seed: int = 0) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "tasks.jsonl", "w", encoding="utf-8") as f:
        for _ in range(rows):
            ins, inp, outp = example(rng)
            f.write(json.dumps({"instruction": ins, "input": inp, "output": outp}) + "\n")
    chats = []
    for _ in range(rows // 4):
        turns = []
        for _ in range(2):
            ins, inp, outp = example(rng)
            turns += [{"from": "human", "value": f"{ins}\n{inp}"}, {"from": "gpt", "value": outp}]
        chats.append({"conversations": turns})
    (out / "chat.json").write_text(json.dumps(chats, indent=1) + "\n", encoding="utf-8")
    with open(out / "prefs.jsonl", "w", encoding="utf-8") as f:
        for _ in range(rows // 2):
            ins, inp, outp = example(rng)
            f.write(json.dumps({"instruction": ins, "input": inp, "chosen": outp,
                                "rejected": wrong(rng, ins, inp, outp)}) + "\n")
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for _ in range(rows * CORPUS_PER_ROW):
            ins, inp, outp = example(rng)
            f.write(json.dumps({"text": f"{ins}\n{inp}\n{outp}"}) + "\n")
    with open(out / "eval.jsonl", "w", encoding="utf-8") as f:
        for task in TASKS:
            for _ in range(50):
                ins, inp, outp = example(rng, (task,))
                f.write(json.dumps({"instruction": ins, "input": inp, "output": outp}) + "\n")
    with open(out / "grpo.jsonl", "w", encoding="utf-8") as f:
        for _ in range(rows // 4):
            ins, inp, outp = example(rng, ("upper", "last"))
            f.write(json.dumps({"instruction": ins, "input": inp, "output": outp}) + "\n")


def table(reports: list[tuple[str, Path]]) -> str:
    """The before/after table `make demo` ends with: one column per model, from `eval --json` files,
    and exact match per task from the predictions saved beside each (`-o NAME.jsonl`)."""
    loaded = [(name, json.loads(Path(path).read_text()), _per_task(Path(path).with_suffix(".jsonl")))
              for name, path in reports]
    width = max(len(name) for name, _, _ in loaded) + 2
    lines = ["metric (held-out demo tasks)".ljust(30) + "".join(name.rjust(width) for name, _, _ in loaded)]
    for metric in ["exact_match", "rouge-l", "bleu-4"]:
        lines.append(metric.ljust(30) + "".join(f"{report[metric]:.1f}".rjust(width) for _, report, _ in loaded))
    for task in TASKS:
        if all(task in tasks for _, _, tasks in loaded):
            lines.append(f"  exact match: {task}".ljust(30)
                         + "".join(f"{tasks[task]:.1f}".rjust(width) for _, _, tasks in loaded))
    return "\n".join(lines)


def _per_task(predictions: Path) -> dict[str, float]:
    """Exact match (in %) of each task, from `eval generate -o` predictions (none: {})."""
    if not predictions.exists():
        return {}
    by_instruction = {text: task for task, text in INSTRUCTIONS.items()}
    right: dict[str, list[bool]] = {}
    for line in predictions.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        task = by_instruction.get(row["prompt"].split("\n")[0])
        if task is not None:
            right.setdefault(task, []).append(" ".join(row["prediction"].split()) == " ".join(row["reference"].split()))
    return {task: 100.0 * sum(marks) / len(marks) for task, marks in right.items()}


def serve_once(model: str, adapter: str | None, question: str) -> str:
    """Start `lmforge serve` on a free port, ask one question through the API, stop it."""
    import os
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lmforge = Path(sys.executable).parent / "lmforge"
    cmd = [str(lmforge), "serve", "-m", model, "--port", str(port), "-q"] + (["--adapter", adapter] if adapter else [])
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=os.environ)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"serve failed: {server.stderr.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("serve did not start in 300 s") from None
                time.sleep(0.3)
        body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": 24,
                           "temperature": 0}).encode()
        request = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
        return answer["choices"][0]["message"]["content"]
    finally:
        server.terminate()
        server.wait(timeout=30)


USAGE = """usage: python tests/demo.py OUT_DIR [ROWS]          write the demo data
       python tests/demo.py --table NAME=EVAL.json...   the before/after table
       python tests/demo.py --reward RUN/lmforge.json   a GRPO run's reward, first steps -> last
       python tests/demo.py --serve-once MODEL [ADAPTER]  one request through `lmforge serve`"""

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    if args[0] == "--table":
        print(table([tuple(a.split("=", 1)) for a in args[1:]]))
    elif args[0] == "--reward":
        metrics = json.loads(Path(args[1]).read_text())["metrics"]
        print(f"GRPO reward on its prompts (sampled answers, mean of the first and of the last steps): "
              f"{metrics['first_reward']:.2f} -> {metrics['final_reward']:.2f}")
    elif args[0] == "--serve-once":
        question = "Write the words in capital letters.\nowl fox bee"
        print(f"POST /v1/chat/completions  user: {question!r}")
        print(f"assistant: {serve_once(args[1], args[2] if len(args) > 2 else None, question)!r}")
    else:
        write(Path(args[0]), int(args[1]) if len(args) > 1 else 2000)
