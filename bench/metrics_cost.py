"""The cost of /metrics on the hot path: GPU samples per second through the embedded daemon
flat out (`fleetwatch run --speed 0`), without --http and with --http while a scraper
fetches /metrics every second, as Prometheus would. Both in the same run, alternately
(`--rounds`), each in a fresh process, on a fleet of RACKS x 8 nodes x 8 GPUs.

With `--tree DIR` (a checkout of another commit, e.g. `git archive <commit> | tar -x -C DIR`)
it also runs that code's daemon, alternately with the others: the cost of the counting
itself (pipeline/ops/progress.py), which runs with or without --http.

    python bench/metrics_cost.py [--racks 4] [--seconds 15] [--rounds 2] [--tree DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

CHILD = """
import asyncio, json, os, sys, tempfile
from pipeline.config import load_config
from pipeline.daemon import run_daemon
from pipeline.sinks.console import Console
racks, seconds, http = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
with tempfile.TemporaryDirectory() as tmp:
    daemon = {"status_interval_s": 3600}
    if http:
        daemon["http"] = http
    cfg = load_config(env={}, overrides={"data_dir": tmp, "fleet": {"racks": racks, "speed": 0.0},
                                         "alerts": {"console": False}, "daemon": daemon})
    with open(os.devnull, "w") as devnull:
        s = asyncio.run(run_daemon(cfg, seconds, Console(devnull)))
print(json.dumps({"samples": s.gpu_samples, "wall_s": s.wall_s}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scraper(threading.Thread):
    """GET /metrics every `every_s` until stopped; records each scrape's time and size."""

    def __init__(self, url: str, every_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.url, self.every_s = url, every_s
        self.stop = threading.Event()
        self.scrapes: list[tuple[float, int]] = []

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    size = len(r.read())
            except OSError:
                continue  # not serving yet (start-up) or already stopped
            self.scrapes.append((time.perf_counter() - t0, size))


def measure(racks: int, seconds: float, http: bool, tree: str = REPO) -> dict:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")} | {"PYTHONPATH": tree}
    scraper = Scraper(f"http://127.0.0.1:{port}/metrics") if http else None
    if scraper is not None:
        scraper.start()
    out = subprocess.run([sys.executable, "-c", CHILD, str(racks), str(seconds), f"127.0.0.1:{port}" if http else ""],
                         cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, check=True)
    if scraper is not None:
        scraper.stop.set()
        scraper.join()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["rate"] = result["samples"] / result["wall_s"]
    result["scrapes"] = scraper.scrapes if scraper is not None else []
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--racks", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tree", help="another checkout whose daemon to run alternately (before pipeline/ops)")
    args = ap.parse_args()
    gpus = args.racks * 64
    runs = {"no --http": [], "--http, /metrics scraped every 1 s": []}
    if args.tree:
        runs = {f"other tree ({args.tree})": [], **runs}
    scrapes: list[tuple[float, int]] = []
    for _ in range(args.rounds):  # alternately: a busy machine slows every configuration alike
        if args.tree:
            runs[f"other tree ({args.tree})"].append(measure(args.racks, args.seconds, False, args.tree)["rate"])
        runs["no --http"].append(measure(args.racks, args.seconds, False)["rate"])
        r = measure(args.racks, args.seconds, True)
        runs["--http, /metrics scraped every 1 s"].append(r["rate"])
        scrapes += r["scrapes"]
    base = statistics.mean(runs["no --http"])
    print(f"fleet: {gpus} GPUs ({args.racks} racks x 8 nodes x 8 GPUs), daemon flat out (--speed 0), "
          f"{args.seconds:.0f} s per run, {args.rounds} rounds alternately, {os.cpu_count()} CPUs")
    print(f"{'daemon':45s} {'GPU samples/s (each run)':>34s} {'mean':>10s} {'x no --http':>12s}")
    for name, rates in runs.items():
        mean = statistics.mean(rates)
        print(f"{name:45s} {', '.join(f'{r:,.0f}' for r in rates):>34s} {mean:10,.0f} {mean / base:12.3f}")
    if scrapes:
        times = sorted(t for t, _ in scrapes)
        print(f"/metrics: {len(scrapes)} scrapes, {statistics.median(s for _, s in scrapes) / 1024:.0f} KiB each, "
              f"median {statistics.median(times) * 1e3:.1f} ms, max {times[-1] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
