"""GPU telemetry through a real Kafka broker, against the same work in-process.

One run on this machine, a simulated fleet of RACKS x 8 nodes x 8 GPUs, TICKS scrapes:
  produce   the simulator's scrapes as one Arrow IPC message per node (the source role)
  consume   one consumer (group `detect`) reads the backlog: decode, coalesce, detect,
            and archive to Parquet (what the detect and archive roles do, in one process)
  baseline  the same decode-free work on the same batches without Kafka: coalesce,
            detect, archive
and prints messages/s, GPU samples/s and metric values/s (19 per sample), and the
consumer's throughput as a ratio of the baseline's.

Then live, at LIVE_SPEED x real time for LIVE_SECONDS, the daemon's own roles with
frequent faults: the source publishes, detect (exactly-once over Kafka: a transaction
per 1 s commit) raises alerts, and a reader of the alerts topic times each alert from
the publication of the scrape that raised it (produce-to-alert latency), while the
detect group's lag is sampled twice a second. The same run on the in-process bus is
the baseline. A broker is started from Maven Central's jars (tests/services.py)
unless --bootstrap names one.

    python bench/kafka_throughput.py [--racks 32] [--ticks 300] [--live-seconds 60]
                                     [--live-speed 1] [--commit-interval 1] [--bootstrap HOST:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from pipeline.bus import EndOfStream, MemoryBus, Message, Topic  # noqa: E402
from pipeline.bus.batching import coalesce, split_by  # noqa: E402
from pipeline.bus.kafka import KafkaBus  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.bus import keys  # noqa: E402
from pipeline.roles import DETECT_TOPICS, SOURCE_TOPICS  # noqa: E402
from pipeline.roles.detect import detect_role  # noqa: E402
from pipeline.detect.checkpoint import Checkpointer  # noqa: E402
from pipeline.detect.engine import Engine  # noqa: E402
from pipeline.model import GPU_METRICS  # noqa: E402
from pipeline.sinks.parquet import ArchiveWriter  # noqa: E402
from pipeline.sources.simulate import FleetSimulator, SimulatorSource  # noqa: E402

VALUES = len(GPU_METRICS)


def detect_and_archive(engine: Engine, writer: ArchiveWriter, messages: list[Message]) -> None:
    for m in messages:
        writer.add("gpu_samples", m.value, m.partition, m.offset)
    for m in coalesce(messages):
        engine.process(m)


async def run(bootstrap: str, racks: int, ticks: int) -> None:
    cfg = load_config(env={}, overrides={"fleet": {"racks": racks, "fault_interval_s": 0}})
    sim = FleetSimulator(cfg.fleet, start=datetime(2026, 1, 1, tzinfo=timezone.utc))
    messages = [m for _ in range(ticks) for m in split_by(Topic.GPU, sim.step().gpu, "node")]
    samples = sum(m.value.num_rows for m in messages)
    bus = KafkaBus(bootstrap, partitions=6, prefix=f"bench{uuid.uuid4().hex[:6]}.")
    await bus.start()

    t0 = time.perf_counter()
    for m in messages:
        await bus.publish(m)
    await bus.flush()
    produce_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        engine, writer = Engine(cfg), ArchiveWriter(Path(tmp) / "kafka")
        sub = bus.subscribe([Topic.GPU], "detect")
        await bus.end([Topic.GPU])
        consumed = 0
        t0 = time.perf_counter()
        while True:
            try:
                got = await sub.get_batch(max_messages=2048, timeout_s=0.2)
            except EndOfStream:
                break
            detect_and_archive(engine, writer, got)
            consumed += sum(m.value.num_rows for m in got)
        writer.flush()
        await sub.commit()
        consume_s = time.perf_counter() - t0

        engine, writer = Engine(cfg), ArchiveWriter(Path(tmp) / "memory")
        t0 = time.perf_counter()
        for i in range(0, len(messages), 2048):
            detect_and_archive(engine, writer, messages[i:i + 2048])
        writer.flush()
        base_s = time.perf_counter() - t0
    await bus.close()

    assert consumed == samples, (consumed, samples)
    gpus = sim.n_gpus
    print(f"fleet: {gpus} GPUs, {ticks} scrapes, {len(messages)} messages (one per node scrape), "
          f"{samples:,} GPU samples, {VALUES} metric values each; {os.cpu_count()} CPUs")
    print(f"{'stage':44s} {'messages/s':>11s} {'GPU samples/s':>14s} {'values/s':>13s} {'x baseline':>10s}")
    for name, secs in (("produce (idempotent, acks=all)", produce_s),
                       ("consume: decode + detect + archive", consume_s),
                       ("baseline: detect + archive, no Kafka", base_s)):
        ratio = f"{base_s / secs:10.2f}" if "consume" in name else ""
        print(f"{name:44s} {len(messages) / secs:11,.0f} {samples / secs:14,.0f} {samples * VALUES / secs:13,.0f} "
              f"{ratio}")


def ns(column: pa.Array) -> list[int]:
    return column.cast(pa.timestamp("ns", "UTC")).cast(pa.int64()).to_pylist()


class TimedPublisher:
    """The bus as the source sees it, noting when each scrape's first message went out."""

    def __init__(self, bus) -> None:
        self.bus, self.keyed = bus, bus.keyed
        self.published_at: dict[int, float] = {}  # sample time (ns) -> wall clock

    async def emit(self, topic: Topic, batch: pa.RecordBatch) -> None:
        """What the source hands its batches to (sources/base.py), keyed as the daemon keys them."""
        for message in keys.messages(topic, batch, self.keyed):
            if message.topic == Topic.GPU:
                self.published_at.setdefault(ns(message.value.column("ts"))[0], time.time())
            await self.bus.publish(message)


async def live(make_bus, racks: int, seconds: float, speed: float, commit_s: float) -> dict[str, float]:
    """Produce-to-alert latency and detect's lag at `speed` x real time."""
    bus = make_bus()
    cfg = load_config(env={}, overrides={"fleet": {"racks": racks, "speed": speed, "fault_interval_s": 2.0,
                                                    "faults": ["gpu_fell_off_bus", "ecc_uncorrectable",
                                                               "coolant_leak", "pcie_replay_storm",
                                                               "nvlink_crc_storm", "pdu_overload"]}})
    await bus.start()
    kafka = isinstance(bus, KafkaBus)
    engine = Engine(cfg, node_staleness=not kafka)
    detect_topics = [Topic.GPU, Topic.FACILITY, Topic.EVENTS]
    sub = bus.subscribe(detect_topics, "detect", transactional=True) if kafka else bus.subscribe(detect_topics, "detect")
    alerts_sub = bus.subscribe([Topic.ALERTS], "bench-alerts")
    timed, stop = TimedPublisher(bus), asyncio.Event()
    latencies, lags = [], []

    async def read_alerts() -> None:
        while True:
            try:
                got = await alerts_sub.get_batch(timeout_s=0.2)
            except EndOfStream:
                return
            now = time.time()
            for m in got:
                for status, ts in zip(m.value.column("status").to_pylist(), ns(m.value.column("starts_at"))):
                    if status == "firing" and ts in timed.published_at:
                        latencies.append(now - timed.published_at[ts])

    async def sample_lag() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.5)
            if kafka:
                tps = sub.consumer.assignment()
                committed = [await sub.consumer.committed(tp) or 0 for tp in tps]
                lags.append(sum((sub.consumer.highwater(tp) or 0) - c for tp, c in zip(tps, committed)))
            else:
                lags.append(sub.queue.qsize())

    checkpoint = Checkpointer(engine, 6) if kafka else None
    source = SimulatorSource(FleetSimulator(cfg.fleet, start=datetime(2026, 1, 1, tzinfo=timezone.utc)), speed)
    tasks = [asyncio.create_task(source.run(timed.emit, stop)),
             asyncio.create_task(detect_role(bus, engine, sub, commit_s, checkpoint)),
             asyncio.create_task(read_alerts()), asyncio.create_task(sample_lag())]
    await asyncio.sleep(seconds)
    stop.set()
    await tasks[0]
    await bus.end(SOURCE_TOPICS)
    await tasks[1]
    await bus.end(DETECT_TOPICS)
    await asyncio.gather(*tasks[2:])
    await bus.close()
    lat = np.array(latencies) * 1000
    return {"samples/s": source.stats()["gpu_samples"] / seconds, "alerts": len(lat),
            "p50 ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
            "p99 ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
            "lag p50": float(np.percentile(lags, 50)), "lag max": float(max(lags))}


def print_live(results: dict[str, dict[str, float]], racks: int, seconds: float, speed: float,
               commit_s: float) -> None:
    print(f"\nlive: {racks * 64} GPUs at {speed:g}x real time for {seconds:.0f} s, faults every 2 s; "
          f"detect commits every {commit_s:g} s")
    print(f"{'bus':40s} {'values/s':>10s} {'alerts':>7s} {'latency p50':>12s} {'p99':>9s} "
          f"{'lag p50 msgs':>13s} {'lag max':>8s}")
    for name, r in results.items():
        print(f"{name:40s} {r['samples/s'] * VALUES:10,.0f} {r['alerts']:7d} {r['p50 ms']:10.1f}ms "
              f"{r['p99 ms']:7.1f}ms {r['lag p50']:13.0f} {r['lag max']:8.0f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--racks", type=int, default=32)
    ap.add_argument("--ticks", type=int, default=300)
    ap.add_argument("--live-seconds", type=float, default=60.0)
    ap.add_argument("--live-speed", type=float, default=1.0)
    ap.add_argument("--commit-interval", type=float, default=1.0, help="detect's kafka.commit_interval_s")
    ap.add_argument("--bootstrap")
    args = ap.parse_args()
    broker = None
    if not args.bootstrap:
        from tests.services import KafkaBroker
        broker = KafkaBroker().start()
    bootstrap = args.bootstrap or broker.bootstrap
    try:
        asyncio.run(run(bootstrap, args.racks, args.ticks))
        if args.live_seconds > 0:
            results = {}
            for name, make_bus in (("in-process (baseline)", MemoryBus),
                                   ("Kafka (exactly-once detect)",
                                    lambda: KafkaBus(bootstrap, partitions=6, prefix=f"live{uuid.uuid4().hex[:6]}."))):
                results[name] = asyncio.run(live(make_bus, args.racks, args.live_seconds, args.live_speed,
                                                 args.commit_interval))
            print_live(results, args.racks, args.live_seconds, args.live_speed, args.commit_interval)
    finally:
        if broker is not None:
            broker.close()


if __name__ == "__main__":
    main()
