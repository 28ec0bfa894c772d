"""Facility readings through a real Mosquitto, against the collector's own work without MQTT.

One run on this machine, the simulated fleet's facility readings (RACKS x 8 points
+ 2 per tick), READINGS of them, each one MQTT message (QoS 1) of the BMS tree:
  publish   BmsPublisher sends them all, while the collector's persistent session
            is offline (the broker queues them for it)
  ingest    the collector connects and takes the backlog: MQTT, JSON, unit
            conversion, dedupe, one record batch per flush
  live      publisher and collector at once, in one process and event loop
  baseline  the collector's per-message path (handle + batching) fed the same
            topics and payloads directly, without MQTT
and prints messages/s of each and ingest and live as a ratio of the baseline.
A Mosquitto is started (tests/services.py) unless --port names one on --host.

    python bench/mqtt_ingest.py [--readings 200000] [--racks 32] [--host 127.0.0.1 --port 1883]
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

import pyarrow as pa  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.sources.bms import BMS_UNITS, BmsPublisher  # noqa: E402
from pipeline.sources.bms_tree import DEFAULT_ROOT, STATE_METRICS, UNITS, encode_meta, encode_reading, \
    reading_topic  # noqa: E402
from pipeline.sources.mqtt import MqttCollector  # noqa: E402
from pipeline.sources.simulate import FleetSimulator  # noqa: E402


def facility_batches(site: str, racks: int, readings: int) -> list[pa.RecordBatch]:
    cfg = load_config(env={}, overrides={"fleet": {"racks": racks, "site": site, "fault_interval_s": 0}})
    sim = FleetSimulator(cfg.fleet, start=datetime(2026, 1, 1, tzinfo=timezone.utc))
    batches, n = [], 0
    while n < readings:
        batches.append(sim.step().facility)
        n += batches[-1].num_rows
    return batches


def messages(batches: list[pa.RecordBatch]) -> list[tuple[str, bytes]]:
    """What BmsPublisher sends, built with the same functions: metadata, then readings."""
    table = pa.Table.from_batches(batches)
    rows = zip(*(table.column(c).to_pylist() for c in ("site", "rack", "device_class", "device", "metric", "value",
                                                        "quality")),
               table.column("ts").cast(pa.int64()).to_pylist())
    meta, out = {}, []
    for site, rack, cls, device, metric, value, quality, ts in rows:
        topic = reading_topic(DEFAULT_ROOT, site, cls, device, metric)
        unit = BMS_UNITS[metric]
        meta.setdefault(f"{topic}/meta", encode_meta(unit, rack))
        out.append((topic, encode_reading(UNITS[metric][unit].from_base(value), ts, quality, metric in STATE_METRICS)))
    return list(meta.items()) + out


class Sink:
    def __init__(self) -> None:
        self.rows = 0
        self.done = asyncio.Event()
        self.expected = 0

    async def publish(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        if self.rows >= self.expected:
            self.done.set()


async def publish_all(host: str, port: int, batches: list[pa.RecordBatch], client_id: str) -> BmsPublisher:
    pub, stop = BmsPublisher(host, port, client_id=client_id), asyncio.Event()
    task = asyncio.create_task(pub.run(stop, drain_timeout_s=600))
    for b in batches:
        pub.publish(b)
    stop.set()
    await task
    return pub


async def collect(collector: MqttCollector, sink: Sink, timeout_s: float = 600) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(sink.publish, stop))
    await asyncio.wait_for(sink.done.wait(), timeout_s)
    stop.set()
    await task


async def subscribe_once(collector: MqttCollector) -> None:
    """Create the collector's persistent session, then leave it offline."""
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(lambda b: asyncio.sleep(0), stop))
    await asyncio.wait_for(collector.subscribed.wait(), 10)
    stop.set()
    await task


async def run(host: str, port: int, racks: int, readings: int, tmp: Path) -> None:
    site = f"bench{uuid.uuid4().hex[:6]}"
    batches = facility_batches(site, racks, readings)
    n = sum(b.num_rows for b in batches)

    collector = MqttCollector(host, port, site, tmp / "dead-backlog.jsonl")
    await subscribe_once(collector)
    t0 = time.perf_counter()
    pub = await publish_all(host, port, batches, f"bench-pub-{site}")
    publish_s = time.perf_counter() - t0
    sink = Sink()
    sink.expected = n
    t0 = time.perf_counter()
    await collect(collector, sink)
    ingest_s = time.perf_counter() - t0
    assert sink.rows == n and not collector.stats.dead_letters and collector.stats.duplicates == 0, collector.stats

    live_site = f"live{uuid.uuid4().hex[:6]}"
    live_batches = facility_batches(live_site, racks, readings)
    live = MqttCollector(host, port, live_site, tmp / "dead-live.jsonl")
    sink = Sink()
    sink.expected = n
    t0 = time.perf_counter()
    collecting = asyncio.create_task(collect(live, sink))
    await asyncio.wait_for(live.subscribed.wait(), 10)
    await publish_all(host, port, live_batches, f"bench-pub-{live_site}")
    await collecting
    live_s = time.perf_counter() - t0
    assert sink.rows == n, live.stats

    direct = MqttCollector(host, port, site, tmp / "dead-direct.jsonl")
    msgs = messages(batches)
    t0 = time.perf_counter()
    rows = 0
    for topic, payload in msgs:
        direct.handle(topic, payload)
        if direct.pending_rows >= direct.max_batch_rows:
            rows += direct.take_batch().num_rows
    last = direct.take_batch()
    rows += last.num_rows if last is not None else 0
    base_s = time.perf_counter() - t0
    assert rows == n

    print(f"facility readings: {n:,} ({racks} racks, {len(batches)} ticks), one QoS 1 message each, "
          f"{pub.stats.sent - n} metadata messages; {os.cpu_count()} CPUs")
    print(f"{'stage':58s} {'messages/s':>11s} {'x baseline':>10s}")
    for name, secs in (("publish: BmsPublisher -> Mosquitto (collector offline)", publish_s),
                       ("ingest: Mosquitto -> collector (the queued backlog)", ingest_s),
                       ("live: publisher and collector at once, one process", live_s),
                       ("baseline: collector parse + batch, no MQTT", base_s)):
        ratio = f"{base_s / secs:10.2f}" if name.startswith(("ingest", "live")) else f"{'':10s}"
        print(f"{name:58s} {n / secs:11,.0f} {ratio}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--readings", type=int, default=200_000)
    ap.add_argument("--racks", type=int, default=32)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int)
    args = ap.parse_args()
    broker = None
    if args.port is None:
        from tests.services import Mosquitto
        broker = Mosquitto().start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(run(args.host, args.port or broker.port, args.racks, args.readings, Path(tmp)))
    finally:
        if broker is not None:
            broker.close()


if __name__ == "__main__":
    main()
