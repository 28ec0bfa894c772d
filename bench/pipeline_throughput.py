"""GPU samples per second through the embedded pipeline, against its own source.

Measures, in one run on this machine, for a fleet of RACKS x 8 nodes x 8 GPUs:
  source    the fleet simulator alone (the baseline: the cost of producing the data)
  detect    simulator + detection engine in lock step (what `fleetwatch eval` runs)
  daemon    the whole daemon flat out: simulator -> in-process bus -> detect -> archive
            (Parquet, zstd) + notify (alerts.jsonl), as `fleetwatch run --speed 0`
and prints samples/s and each stage's throughput as a ratio of the source's.

    python bench/pipeline_throughput.py [--racks 4] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.bus import Message, Topic  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.daemon import run_daemon  # noqa: E402
from pipeline.detect.engine import Engine  # noqa: E402
from pipeline.sinks.console import Console  # noqa: E402
from pipeline.sources.simulate import FleetSimulator  # noqa: E402


def timed_ticks(step, seconds: float) -> tuple[int, float]:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--racks", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(env={}, overrides={"data_dir": tmp, "fleet": {"racks": args.racks, "speed": 0.0},
                                             "alerts": {"console": False}, "daemon": {"status_interval_s": 3600}})
        start = datetime(2026, 1, 1, tzinfo=timezone.utc)
        gpus = FleetSimulator(cfg.fleet, start=start).n_gpus

        sim = FleetSimulator(cfg.fleet, start=start)
        n_src, t_src = timed_ticks(sim.step, args.seconds)

        sim, engine = FleetSimulator(cfg.fleet, start=start), Engine(cfg)

        def detect_step() -> None:
            tick = sim.step()
            engine.process(Message(Topic.GPU, tick.gpu))
            engine.process(Message(Topic.FACILITY, tick.facility))
            if tick.events is not None:
                engine.process(Message(Topic.EVENTS, tick.events))
        n_det, t_det = timed_ticks(detect_step, args.seconds)

        with open(os.devnull, "w") as devnull:
            summary = asyncio.run(run_daemon(cfg, args.seconds, Console(devnull)))
        # The daemon's wall time includes start-up (imports are done; kernels load from cache).
        rows = {
            "source (baseline)": n_src * gpus / t_src,
            "source + detect": n_det * gpus / t_det,
            "daemon (source, bus, detect, archive, notify)": summary.gpu_samples / summary.wall_s,
        }
    base = rows["source (baseline)"]
    print(f"fleet: {gpus} GPUs ({args.racks} racks x 8 nodes x 8 GPUs), {args.seconds:.0f} s per stage, "
          f"{os.cpu_count()} CPUs")
    print(f"{'stage':50s} {'GPU samples/s':>14s} {'x source':>9s}")
    for name, rate in rows.items():
        print(f"{name:50s} {rate:14,.0f} {rate / base:9.2f}")


if __name__ == "__main__":
    main()
