"""GPU telemetry through a real Kafka broker, against the same work in-process.

One run on this machine, a simulated fleet of RACKS x 8 nodes x 8 GPUs, TICKS scrapes:
  produce   the simulator's scrapes as one Arrow IPC message per node (the source role)
  consume   one consumer (group `detect`) reads the backlog: decode, coalesce, detect,
            and archive to Parquet (what the detect and archive roles do, in one process)
  baseline  the same decode-free work on the same batches without Kafka: coalesce,
            detect, archive
and prints messages/s, GPU samples/s and metric values/s (19 per sample), and the
consumer's throughput as a ratio of the baseline's. A broker is started from
Maven Central's jars (tests/services.py) unless --bootstrap names one.

    python bench/kafka_throughput.py [--racks 32] [--ticks 300] [--bootstrap HOST:PORT]
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

from pipeline.bus import EndOfStream, Message, Topic  # noqa: E402
from pipeline.bus.batching import coalesce, split_by  # noqa: E402
from pipeline.bus.kafka import KafkaBus  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.detect.engine import Engine  # noqa: E402
from pipeline.model import GPU_METRICS  # noqa: E402
from pipeline.sinks.parquet import ArchiveWriter  # noqa: E402
from pipeline.sources.simulate import FleetSimulator  # noqa: E402

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
        print(f"{name:44s} {len(messages) / secs:11,.0f} {samples / secs:14,.0f} {samples * VALUES / secs:13,.0f} "
              f"{base_s / secs if 'consume' in name else float('nan'):10.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--racks", type=int, default=32)
    ap.add_argument("--ticks", type=int, default=300)
    ap.add_argument("--bootstrap")
    args = ap.parse_args()
    if args.bootstrap:
        asyncio.run(run(args.bootstrap, args.racks, args.ticks))
        return
    from tests.services import KafkaBroker
    broker = KafkaBroker().start()
    try:
        asyncio.run(run(broker.bootstrap, args.racks, args.ticks))
    finally:
        broker.close()


if __name__ == "__main__":
    main()
