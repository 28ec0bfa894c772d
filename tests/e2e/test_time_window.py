"""End-to-end: the time window against a real Mosquitto broker (moved from tests/test_time_window.py)."""

from __future__ import annotations

import asyncio
import json
import uuid

import pyarrow as pa
import pytest

from pipeline.bus.intake import TimeWindow
from pipeline.sources.bms_tree import encode_meta, encode_reading
from pipeline.sources.mqtt import MqttCollector
from tests.test_time_window import DAY_NS, T0_NS


@pytest.mark.mqtt
def test_a_bms_clock_a_day_ahead_over_mosquitto(tmp_path):
    """Through a real broker: one reading of a point stamped a day ahead is dead-lettered,
    and the point's later readings all arrive."""
    import aiomqtt

    from tests.services import Mosquitto
    from tests.e2e.test_mqtt import Collecting, fast_backoff, subscribed
    broker = Mosquitto().start()
    site = f"s{uuid.uuid4().hex[:8]}"
    topic = f"bms/v1/{site}/cdu/cdu-r01/flow"
    stamps = [T0_NS, T0_NS + DAY_NS] + [T0_NS + k * 10**9 for k in range(1, 11)]

    async def go():
        col = Collecting(MqttCollector(broker.host, broker.port, site, tmp_path / "dead.jsonl",
                                       backoff=fast_backoff(), window=TimeWindow(300, 0, lambda: T0_NS / 1e9 + 5)))
        await subscribed(col.collector)
        async with aiomqtt.Client(broker.host, broker.port) as pub:
            await pub.publish(f"{topic}/meta", encode_meta("L/min", "r01"), qos=1, retain=True)
            for ts in stamps:
                await pub.publish(topic, encode_reading(100.0, ts, 1, False), qos=1)
        await col.until_rows(len(stamps) - 1)
        await col.close()
        return col
    try:
        col = asyncio.run(go())
    finally:
        broker.close()
    got = pa.Table.from_batches(col.batches).column("ts").cast(pa.int64()).to_pylist()
    assert got == [s for s in stamps if s != T0_NS + DAY_NS]
    assert col.collector.stats.dead_letters == {"time_ahead": 1}
    [letter] = [json.loads(x) for x in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert letter["reason"] == "time_ahead" and letter["topic"] == topic
