"""`lmforge board`: time to first paint and to a usable page (forms built from the catalog), in
Debian's Chromium driven by Playwright; and how long the board takes to answer after its start.

    python tests/bench/bench_board.py
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from common import LMFORGE, command, record, table, versions

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOADS = 7


def main() -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as ws, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        start = time.perf_counter()
        token = "bench-board-token-0123456789"
        board = subprocess.Popen(command([LMFORGE, "board", "--workspace", ws, "--port", str(port), "--token", token]),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env={**os.environ, "LMFORGE_LOG_INTERVAL": "1000"})
        url = f"http://127.0.0.1:{port}/?token={token}"
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/catalog?token={token}", timeout=1).read()
                break
            except OSError:
                time.sleep(0.02)
        answering = time.perf_counter() - start
        paints, ready = [], []
        try:
            with sync_playwright() as p:
                chrome = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                for i in range(LOADS + 1):
                    page = chrome.new_page()
                    t0 = time.perf_counter()
                    page.goto(url)
                    page.wait_for_selector("body[data-ready]")
                    t1 = time.perf_counter()
                    fcp = page.evaluate("performance.getEntriesByName('first-contentful-paint')[0]?.startTime")
                    page.close()
                    if i:   # the first load warms the browser's own start-up
                        paints.append(fcp)
                        ready.append((t1 - t0) * 1000)
                chrome.close()
        finally:
            board.terminate()
            board.wait()
    size = sum(f.stat().st_size for f in (Path(__file__).resolve().parents[2] / "shared" / "board" / "static").iterdir())
    rows = [["first contentful paint", f"{statistics.median(paints):.0f} ms"],
            ["page ready (forms built from /api/catalog, strings loaded)", f"{statistics.median(ready):.0f} ms"],
            ["`lmforge board` start -> first answer", f"{answering * 1000:.0f} ms"],
            ["page weight (HTML + JS + CSS, no other requests but the API)", f"{size / 1024:.0f} KiB"]]
    record("board", "lmforge board: time to first paint", "python tests/bench/bench_board.py",
           f"Median of {LOADS} page loads after one warm-up, headless Chromium "
           f"({subprocess.run([CHROMIUM, '--version'], capture_output=True, text=True).stdout.strip()}) "
           f"on the same machine as the board; load average {os.getloadavg()[0]:.1f} while measuring.\n\n" + table(["measure", "value"], rows)
           + f"\n\n{versions('playwright', 'fastapi', 'uvicorn')}.")


if __name__ == "__main__":
    main()
