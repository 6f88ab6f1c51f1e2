"""`lmforge serve` under load: 32 concurrent streaming clients against SmolLM2-135M-Instruct on the
CPU, compared with the same 32 requests sent one after another, in the same run.

Reports requests/s, generated tokens/s, p50/p95 time to first token and to completion, errors,
and the server's RSS before and after (it must not grow from one round of load to the next)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_train import smollm2
from common import LMFORGE, record, table, versions

CLIENTS = 32
MAX_TOKENS = 32
TOPICS = ["the sea", "a robot", "bread", "winter", "a library", "trains", "bees", "the moon"]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one(client, url: str, i: int) -> dict:
    body = {"messages": [{"role": "user", "content": f"Write one sentence about {TOPICS[i % len(TOPICS)]}."}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens, ok = None, 0, False
    try:
        async with client.stream("POST", url, json=body, timeout=600) as response:
            if response.status_code != 200:
                return {"error": response.status_code}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    ok = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk["choices"]:
                    if first is None and c["delta"].get("content"):
                        first = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - counted as an error
        return {"error": repr(exc)}
    if not ok:
        return {"error": "stream ended without [DONE]"}
    return {"ttft": first if first is not None else time.perf_counter() - start,
            "latency": time.perf_counter() - start, "tokens": tokens}


async def round_of(url: str, concurrent: bool) -> dict:
    import httpx

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=CLIENTS)) as client:
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one(client, url, i) for i in range(CLIENTS)))
        else:
            results = [await one(client, url, i) for i in range(CLIENTS)]
        wall = time.perf_counter() - start
    good = [r for r in results if "error" not in r]

    def pct(key: str, q: float) -> float:
        values = sorted(r[key] for r in good)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {"wall": wall, "errors": len(results) - len(good), "requests_s": len(good) / wall,
            "tokens_s": sum(r["tokens"] for r in good) / wall, "tokens": sum(r["tokens"] for r in good),
            "ttft50": statistics.median(r["ttft"] for r in good), "ttft95": pct("ttft", 0.95),
            "lat50": statistics.median(r["latency"] for r in good), "lat95": pct("latency", 0.95),
            "first_error": next((r["error"] for r in results if "error" in r), None)}


def main() -> None:
    model = smollm2()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [LMFORGE, "serve", "-m", str(model), "--port", str(port), "-q", *os.environ.get("SERVE_ARGS", "").split()]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                sys.exit(f"serve did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        url = base + "/v1/chat/completions"
        asyncio.run(round_of(url, concurrent=True))  # warm-up: allocator and caches settle
        rss_start = rss_mib(server.pid)
        sequential = asyncio.run(round_of(url, concurrent=False))
        rss_sequential = rss_mib(server.pid)
        concurrent = asyncio.run(round_of(url, concurrent=True))
        rss_concurrent = rss_mib(server.pid)
        again = asyncio.run(round_of(url, concurrent=True))
        rss_end = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)

    def row(name: str, r: dict) -> list:
        return [name, f"{r['requests_s']:.2f}", f"{r['tokens_s']:.1f}", f"{r['ttft50']:.2f} / {r['ttft95']:.2f}",
                f"{r['lat50']:.2f} / {r['lat95']:.2f}", f"{r['wall']:.1f}", r["errors"]]

    body = table(["32 requests", "requests/s", "generated tokens/s", "TTFT p50 / p95 (s)",
                  "latency p50 / p95 (s)", "wall (s)", "errors"],
                 [row("sequential (one client)", sequential), row(f"{CLIENTS} concurrent streaming clients", concurrent),
                  row(f"{CLIENTS} concurrent, second round", again)])
    body += (f"\n\nSpeed-up of concurrent over sequential: **{concurrent['tokens_s'] / sequential['tokens_s']:.1f}x** "
             f"generated tokens/s. Server RSS: {rss_start:.0f} MiB after warm-up, {rss_sequential:.0f} MiB after "
             f"the sequential round, {rss_concurrent:.0f} MiB after the concurrent round, {rss_end:.0f} MiB after "
             f"a second concurrent round (growth from warm-up to the end: {rss_end - rss_start:+.0f} MiB).\n\n"
             f"Each request: a one-sentence chat prompt, greedy, max_tokens {MAX_TOKENS}, streamed with usage. "
             f"Server: `lmforge serve` defaults (hf backend, --max-batch 32, --max-concurrency 32), "
             f"{os.cpu_count()} CPU threads, fp32. {versions('torch', 'transformers', 'fastapi', 'uvicorn')}.")
    if concurrent["errors"] or sequential["errors"] or again["errors"]:
        body += f"\n\nFirst error: {concurrent['first_error'] or sequential['first_error'] or again['first_error']}"
    record("serve", "serve under load: 32 concurrent streaming clients vs sequential (SmolLM2-135M, CPU)",
           "python tests/bench/run.py bench_serve", body)


if __name__ == "__main__":
    main()
