"""What a scrape of 8 GPUs costs the NVML agent, against the bare NVML calls.

The agent runs its real code against 8 replayed H100s (pipeline/sources/nvml_replay.py)
that block for each call's recorded latency, as the GPU did. Measured in one run:
  baseline  the same NVML calls made directly in a loop: no agent, no Arrow batch
  agent     NvmlAgent.scrape(): the calls, unsupported-field bookkeeping, reset and
            loss checks, and the columnar RecordBatch
and, with the agent's async loop scraping every INTERVAL, the event loop's lag
(a 5 ms sleep probe): what the rest of the daemon would feel.

    python bench/nvml_scrape.py [--scrapes 100] [--interval 0.2] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import pynvml  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.sources.nvml import CALLS, FIELDS, NvmlAgent  # noqa: E402
from pipeline.sources.nvml_replay import NvmlReplay  # noqa: E402

RECORDING = "h100"  # the recording that ships with Fleetwatch


def timed(step, n: int) -> tuple[float, float]:
    """(wall s, CPU s) per call of step."""
    w, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    return (time.perf_counter() - w) / n, (time.process_time() - c) / n


def bare_calls(handles: list, fields: list[int]) -> None:
    for h in handles:
        pynvml.nvmlDeviceGetFieldValues(h, fields)
        for _, call in CALLS.values():
            call(h)


async def loop_lag(agent: NvmlAgent, seconds: float) -> list[float]:
    lags: list[float] = []
    stop = asyncio.Event()

    async def discard(_batch) -> None:
        pass

    async def probe() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - t - 0.005)
    tasks = [asyncio.create_task(agent.run(discard, discard, stop)), asyncio.create_task(probe())]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    return lags


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scrapes", type=int, default=100)
    ap.add_argument("--interval", type=float, default=0.2, help="scrape interval for the loop-lag run")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--recording", default=RECORDING)
    args = ap.parse_args()
    cfg = load_config(env={}, overrides={"agent": {"interval_s": args.interval}})
    replay = NvmlReplay(args.recording, gpus=8)
    with replay.installed():
        agent = NvmlAgent(cfg.agent, "bench")
        agent.open()
        agent.scrape()  # learn what is unsupported, as a running agent has
        fields = agent.gpus[0].fields
        base_wall, base_cpu = timed(lambda: bare_calls([g.handle for g in agent.gpus], fields), args.scrapes)
        wall, cpu = timed(agent.scrape, args.scrapes)
        agent.close()
        lags = asyncio.run(loop_lag(NvmlAgent(cfg.agent, "bench"), args.seconds))
    lag = np.array(lags) * 1000
    print(f"8 replayed H100s, recorded latencies; {args.scrapes} scrapes each; {os.cpu_count()} CPUs")
    print(f"{'':34s} {'wall ms/scrape':>15s} {'CPU ms/scrape':>14s} {'CPU share at 1 Hz':>18s}")
    for name, w, c in (("bare NVML calls (baseline)", base_wall, base_cpu), ("agent scrape", wall, cpu)):
        print(f"{name:34s} {w * 1000:15.1f} {c * 1000:14.2f} {c * 100:17.2f}%")
    print(f"agent CPU / baseline CPU: {cpu / base_cpu:.2f}x; fields asked per GPU: {len(fields)} of {len(FIELDS)} "
          f"(the rest answered NOT_SUPPORTED once)")
    print(f"event loop lag while scraping every {args.interval:g} s for {args.seconds:g} s: "
          f"p50 {np.percentile(lag, 50):.2f} ms, p99 {np.percentile(lag, 99):.2f} ms, max {lag.max():.2f} ms "
          f"({lag.size} probes)")


if __name__ == "__main__":
    main()
