"""The MQTT facility path against a real Mosquitto: the simulator's BMS publisher,
the collector, and what lands in the Parquet archive."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

import aiomqtt
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.model import FACILITY_SAMPLE
from pipeline.sinks.parquet import ArchiveWriter
from pipeline.sources.bms import BmsPublisher
from pipeline.sources.bms_tree import STATE_METRICS, UNITS, decode_meta, decode_reading, encode_meta, \
    encode_reading
from pipeline.sources.mqtt import Backoff, MqttCollector
from pipeline.sources.simulate import FleetSimulator
from tests.conftest import make_config
from tests.services import Mosquitto

T0_MS = 1_767_225_600_000  # 2026-01-01


@pytest.fixture(scope="module")
def broker():
    b = Mosquitto().start()
    yield b
    b.close()


def simulator(site: str, racks: int = 2) -> FleetSimulator:
    return FleetSimulator(make_config(fleet={"racks": racks, "site": site, "fault_interval_s": 0}).fleet,
                          start=datetime(2026, 1, 1, tzinfo=timezone.utc))


def fast_backoff() -> Backoff:
    return Backoff(initial_s=0.05, max_s=0.5)


def rows(batches: list[pa.RecordBatch]) -> list[dict]:
    return pa.Table.from_batches(batches, schema=FACILITY_SAMPLE).to_pylist() if batches else []


def key(r: dict) -> tuple:
    ts_ms = round(r["ts"].timestamp() * 1000)
    return r["device"], r["metric"], ts_ms


def assert_same_readings(got: list[dict], expected: list[dict]) -> None:
    """Every expected reading exactly once, in base units, with its rack and quality."""
    keys = [key(r) for r in got]
    assert len(keys) == len(set(keys)), "duplicate readings"
    by_key = {key(r): r for r in got}
    missing = [key(r) for r in expected if key(r) not in by_key]
    assert not missing, f"{len(missing)} of {len(expected)} readings lost, e.g. {missing[:3]}"
    assert len(got) == len(expected)
    for e in expected:
        g = by_key[key(e)]
        assert (g["site"], g["rack"], g["quality"]) == (e["site"], e["rack"], e["quality"])
        assert math.isclose(g["value"], e["value"], rel_tol=1e-9, abs_tol=1e-9), (key(e), g["value"], e["value"])


class Collecting:
    """A collector running in the background, its batches kept."""

    def __init__(self, collector: MqttCollector) -> None:
        self.collector = collector
        self.batches: list[pa.RecordBatch] = []
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(collector.run(self._publish, self.stop))

    async def _publish(self, batch: pa.RecordBatch) -> None:
        assert batch.schema == FACILITY_SAMPLE
        self.batches.append(batch)

    @property
    def rows(self) -> int:
        return sum(b.num_rows for b in self.batches)

    async def until_rows(self, n: int, timeout_s: float = 15.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.rows < n and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self.stop.set()
        await self.task


async def subscribed(collector: MqttCollector) -> None:
    """The collector's session exists, so the broker keeps what is published for it."""
    await asyncio.wait_for(collector.subscribed.wait(), 10)


@pytest.mark.mqtt
def test_simulator_through_mosquitto_reaches_the_archive_in_base_units(broker, tmp_path):
    site = f"s{uuid.uuid4().hex[:8]}"
    sim = simulator(site)
    published = [sim.step().facility for _ in range(20)]

    async def go():
        col = Collecting(MqttCollector(broker.host, broker.port, site, tmp_path / "dead.jsonl",
                                       backoff=fast_backoff()))
        await subscribed(col.collector)
        pub, stop = BmsPublisher(broker.host, broker.port, client_id=f"sim-{site}"), asyncio.Event()
        task = asyncio.create_task(pub.run(stop))
        for batch in published:
            pub.publish(batch)
            await asyncio.sleep(0.01)
        stop.set()
        await task
        await col.until_rows(sum(b.num_rows for b in published))
        await col.close()
        # What a BMS client sees: non-base units, so the collector did convert.
        want = {f"bms/v1/{site}/cdu/cdu-r01/{point}/meta" for point in ("supply_temp", "flow")}
        seen = {}
        async with aiomqtt.Client(broker.host, broker.port) as raw:
            await raw.subscribe(f"bms/v1/{site}/cdu/cdu-r01/+/meta", qos=1)
            async with asyncio.timeout(5):
                async for m in raw.messages:
                    seen[m.topic.value] = json.loads(m.payload)
                    if want <= seen.keys():
                        break
        return col, pub, seen

    col, pub, seen = asyncio.run(go())
    assert seen[f"bms/v1/{site}/cdu/cdu-r01/supply_temp/meta"] == {"unit": "degF", "rack": "r01"}
    assert seen[f"bms/v1/{site}/cdu/cdu-r01/flow/meta"]["unit"] == "gpm"

    expected = rows(published)
    got = rows(col.batches)
    assert_same_readings(got, expected)
    stats = col.collector.stats
    assert stats.rows == len(expected) and stats.duplicates == 0 and pub.stats.dropped == 0
    assert stats.dead_letters == {}
    assert len(col.batches) < 20, "rows are batched, not one batch per reading"

    writer = ArchiveWriter(tmp_path / "archive")
    for b in col.batches:
        writer.add("facility_samples", b)
    writer.flush()
    archived = pl.scan_parquet(tmp_path / "archive" / "facility_samples", hive_partitioning=True) \
        .select(FACILITY_SAMPLE.names).collect()
    assert archived.schema["ts"] == pl.Datetime("ns", "UTC")
    assert_same_readings(archived.to_dicts(), expected)


def reading(value, ts_ms: int, quality: int = 1) -> bytes:
    return json.dumps({"value": value, "timestamp": ts_ms, "quality": quality}).encode()


@pytest.mark.mqtt
def test_bad_messages_are_dead_lettered_and_the_good_ones_around_them_arrive(broker, tmp_path, caplog):
    site = f"s{uuid.uuid4().hex[:8]}"
    root = f"bms/v1/{site}"
    cdu = f"{root}/cdu/cdu-r01"
    dead = tmp_path / "dead.jsonl"
    bad = [  # (topic, payload, reason)
        (f"{cdu}/supply_temp", b"{not json", "bad_json"),
        (f"{cdu}/supply_temp", b"[1, 2]", "bad_json"),
        (f"{cdu}/supply_temp", b'{"timestamp": 1767225600000}', "bad_json"),
        (f"{cdu}/supply_temp", b"[" * 100_000, "bad_json"),  # would blow the parser's stack
        (f"{cdu}/humidity", reading(40, T0_MS), "unknown_point"),
        (f"{root}/chiller/ch-1/power", reading(40, T0_MS), "bad_topic"),
        (f"{cdu}", reading(40, T0_MS), "bad_topic"),
        (f"{cdu}/supply_temp/x/y", reading(40, T0_MS), "bad_topic"),
        (f"{cdu}/supply_temp", b'{"value": NaN, "timestamp": 1767225600500}', "bad_value"),
        (f"{cdu}/supply_temp", reading("86.0", T0_MS + 600), "bad_value"),
        (f"{cdu}/supply_temp", reading(10**400, T0_MS + 700), "bad_value"),  # no float holds it
        (f"{cdu}/pump_state", reading(2, T0_MS), "bad_value"),
        (f"{cdu}/supply_temp", reading(86.0, T0_MS // 1000), "bad_timestamp"),
        (f"{cdu}/flow", reading(26.0, T0_MS), "no_metadata"),  # before its metadata
        (f"{cdu}/diff_pressure/meta", encode_meta("inH2O", "r01"), "unknown_unit"),
        (f"{cdu}/diff_pressure", reading(3.0, T0_MS), "unknown_unit"),  # its point's unit is unknown
        (f"{cdu}/return_temp/meta", encode_meta("psi", "r01"), "unknown_unit"),  # not a temperature
        (f"{cdu}/leak_detect/meta", b'{"unit": "bool"}', "bad_metadata"),  # no rack
    ]
    good_meta = [(f"{cdu}/supply_temp/meta", encode_meta("degF", "r01")),
                 (f"{cdu}/pump_state/meta", encode_meta("bool", "r01"))]
    sequence = [*good_meta, (f"{cdu}/supply_temp", reading(86.0, T0_MS)), (f"{cdu}/pump_state", reading(True, T0_MS))]
    for i, (topic, payload, _) in enumerate(bad):  # a good reading after each bad message
        sequence += [(topic, payload), (f"{cdu}/supply_temp", reading(86.0 + i, T0_MS + 1000 * (i + 1)))]
    sequence += [(f"{cdu}/flow/meta", encode_meta("gpm", "r01")), (f"{cdu}/flow", reading(26.0, T0_MS + 1)),
                 (f"{cdu}/supply_temp", reading(50.0, T0_MS)),  # not newer than the last: a duplicate
                 (f"{cdu}/pump_state", reading(0, T0_MS + 1))]

    async def go():
        col = Collecting(MqttCollector(broker.host, broker.port, site, dead, backoff=fast_backoff()))
        await subscribed(col.collector)
        async with aiomqtt.Client(broker.host, broker.port) as bms:
            for topic, payload in sequence:
                await bms.publish(topic, payload, qos=1, retain=topic.endswith("/meta"))
        await col.until_rows(2 + len(bad) + 2)
        await asyncio.sleep(0.3)  # anything more (there should be nothing) arrives too
        await col.close()
        return col

    with caplog.at_level(logging.WARNING, logger="pipeline.sources.mqtt"):
        col = asyncio.run(go())

    got = rows(col.batches)
    expected_supply = [(T0_MS, 30.0)] + [(T0_MS + 1000 * (i + 1), (86.0 + i - 32) * 5 / 9) for i in range(len(bad))]
    supply = [(key(r)[2], r["value"]) for r in got if r["metric"] == "supply_temp_c"]
    assert [t for t, _ in supply] == [t for t, _ in expected_supply]
    assert all(math.isclose(v, e, rel_tol=1e-12) for (_, v), (_, e) in zip(supply, expected_supply))
    assert [(r["metric"], r["value"]) for r in got if r["metric"] != "supply_temp_c"] == [
        ("pump_on", 1.0), ("flow_lpm", pytest.approx(26.0 * 3.785411784)), ("pump_on", 0.0)]
    assert {r["rack"] for r in got} == {"r01"}

    stats = col.collector.stats
    reasons: dict[str, int] = {}
    for _, _, reason in bad:
        reasons[reason] = reasons.get(reason, 0) + 1
    assert stats.dead_letters == reasons
    assert stats.duplicates == 1

    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [(d["topic"], d["payload"], d["reason"]) for d in letters] == [
        (t, p.decode(), r) for t, p, r in bad]
    assert all(d["detail"] and d["time"].endswith("Z") for d in letters)
    logged = [r.getMessage() for r in caplog.records if "Dead-lettered" in r.getMessage()]
    assert len(logged) == len(reasons)  # once per reason
    assert any("inH2O" in m and "known: kPa" in m for m in logged)


@pytest.mark.mqtt
def test_broker_restart_mid_stream_loses_and_repeats_nothing(broker, tmp_path, caplog):
    site = f"s{uuid.uuid4().hex[:8]}"
    sim = simulator(site)
    ticks = 120
    published = [sim.step().facility for _ in range(ticks)]

    async def go():
        col = Collecting(MqttCollector(broker.host, broker.port, site, tmp_path / "dead.jsonl",
                                       backoff=fast_backoff()))
        await subscribed(col.collector)
        pub = BmsPublisher(broker.host, broker.port, client_id=f"sim-{site}", backoff=fast_backoff())
        stop = asyncio.Event()
        task = asyncio.create_task(pub.run(stop, drain_timeout_s=20))
        for i, batch in enumerate(published):
            pub.publish(batch)
            await asyncio.sleep(0.02)
            if i == 40:
                rows_before = col.rows
                await asyncio.to_thread(broker.stop)
                await asyncio.sleep(2.0)  # the publisher keeps publishing into its buffer
            if i == 80:
                buffered = pub.buffered
                await asyncio.to_thread(broker.start)
        stop.set()
        await task
        await col.until_rows(sum(b.num_rows for b in published), timeout_s=20)
        await col.close()
        return col, pub, rows_before, buffered

    with caplog.at_level(logging.INFO):
        col, pub, rows_before, buffered = asyncio.run(go())
    total = sum(b.num_rows for b in published)
    assert 0 < rows_before < total and buffered > 0, "the restart happened mid-stream"
    assert col.collector.stats.reconnects >= 1 and pub.stats.reconnects >= 1
    assert pub.stats.dropped == 0
    assert_same_readings(rows(col.batches), rows(published))
    assert col.collector.stats.dead_letters == {}
    # One warning per outage, not one per failed attempt.
    lost = [r for r in caplog.records if r.name == "pipeline.sources.mqtt" and r.levelno == logging.WARNING]
    assert len(lost) == 1 and "connection lost" in lost[0].getMessage()


# ---- payload parsing and unit conversion (no broker) ------------------------------

@pytest.mark.parametrize("metric, unit, value, base", [
    ("supply_temp_c", "degF", 212.0, 100.0), ("supply_temp_c", "K", 273.15, 0.0),
    ("flow_lpm", "gpm", 1.0, 3.785411784), ("flow_lpm", "m3/h", 6.0, 100.0),
    ("dp_kpa", "psi", 1.0, 6.894757293168361), ("dp_kpa", "bar", 1.5, 150.0),
    ("power_w", "kW", 12.5, 12_500.0), ("energy_j", "kWh", 1.0, 3.6e6), ("energy_j", "Wh", 2.0, 7200.0),
])
def test_units_convert_to_base(metric, unit, value, base):
    _, got, _ = decode_reading(reading(value, T0_MS), decode_meta(encode_meta(unit, "r01"), metric))
    assert got == pytest.approx(base, rel=1e-12)


_UNIT_CASES = st.sampled_from([(m, u) for m, units in UNITS.items() for u in units])


@settings(max_examples=300, deadline=None)
@given(case=_UNIT_CASES, base=st.floats(-1e7, 1e7, allow_nan=False), ms=st.integers(10**11, 10**14 - 1),
       quality=st.sampled_from([0, 1]))
def test_encode_then_decode_gives_the_base_value_back(case, base, ms, quality):
    metric, unit = case
    meta = decode_meta(encode_meta(unit, "r07"), metric)
    if metric in STATE_METRICS:
        base = float(base > 0)
    payload = encode_reading(meta.conversion.from_base(base), ms * 1_000_000, quality, metric in STATE_METRICS)
    ts_ns, value, q = decode_reading(payload, meta)
    assert (ts_ns, q, meta.rack) == (ms * 1_000_000, quality, "r07")
    assert math.isclose(value, base, rel_tol=1e-9, abs_tol=1e-6)


_JSON = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.just(10**400) | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
_PAYLOADS = st.one_of(
    st.binary(max_size=40),
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"value": _JSON, "timestamp": _JSON}, optional={"quality": _JSON})
    .map(lambda d: json.dumps(d).encode()),
)
_TOPICS = st.one_of(
    st.sampled_from(["bms/v1/p/cdu/cdu-r01/supply_temp", "bms/v1/p/cdu/cdu-r01/pump_state",
                     "bms/v1/p/meter/meter-main/energy", "bms/v1/p/cdu/cdu-r01/supply_temp/meta",
                     "bms/v1/p/rack/pdu-r01/power", "bms/v1/p/cdu/cdu-r01/flow", "bms/v1/q/cdu/cdu-r01/flow"]),
    st.text(max_size=30).map(lambda t: "bms/v1/p/" + t),
)


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(st.tuples(_TOPICS, _PAYLOADS), max_size=20))
def test_any_message_becomes_a_row_a_duplicate_or_a_dead_letter(messages):
    with tempfile.TemporaryDirectory() as tmp:
        collector = MqttCollector("h", 1, "p", Path(tmp) / "dead.jsonl")
        for topic, payload in [("bms/v1/p/cdu/cdu-r01/supply_temp/meta", encode_meta("degF", "r01")),
                               ("bms/v1/p/cdu/cdu-r01/pump_state/meta", encode_meta("bool", "r01")),
                               ("bms/v1/p/meter/meter-main/energy/meta", encode_meta("MWh", ""))] + messages:
            collector.handle(topic, payload)
        batch = collector.take_batch()
        collector.dead_letters.close()
        stats = collector.stats
        n_rows = batch.num_rows if batch is not None else 0
        assert stats.messages == stats.metadata + n_rows + stats.duplicates + sum(stats.dead_letters.values())
        lines = (Path(tmp) / "dead.jsonl").read_text().splitlines() if stats.dead_letters else []
        assert len(lines) == sum(stats.dead_letters.values())
        if batch is not None:
            assert batch.schema == FACILITY_SAMPLE
            values = batch.column("value").to_pylist()
            assert all(math.isfinite(v) for v in values)
            for metric, v in zip(batch.column("metric").to_pylist(), values):
                if metric == "pump_on":
                    assert v in (0.0, 1.0)


def test_backoff_doubles_up_to_its_cap_with_jitter_and_starts_over_after_a_connection():
    backoff = Backoff(initial_s=0.1, max_s=2.0, rng=random.Random(1))
    delays = [backoff.next_s() for _ in range(12)]
    for i, d in enumerate(delays):
        nominal = min(2.0, 0.1 * 2 ** i)
        assert nominal / 2 <= d <= nominal
    assert len({round(d, 6) for d in delays[6:]}) > 1, "capped delays are jittered, not all equal"
    backoff.reset()
    assert backoff.next_s() <= 0.1


@pytest.mark.mqtt
def test_the_daemon_reads_the_facility_from_mqtt_and_alerts_on_it(broker, tmp_path):
    """`fleetwatch run --mqtt`: the simulator publishes its coolant loops and power
    feeds on the BMS tree, the facility collector reads them back, and the rack faults
    injected in the simulator raise their alerts from what came over MQTT. Every
    reading published is archived exactly once."""
    from tests.conftest import fleetwatch
    from tests.test_daemon import FAST, archived
    r = fleetwatch("run", "--mqtt", f"{broker.host}:{broker.port}", "--duration", "15", "--data-dir", "data",
                   cwd=tmp_path, timeout=120,
                   env=FAST | {"FLEETWATCH_FLEET__FAULTS": "coolant_leak,coolant_flow_loss,pdu_overload",
                               "FLEETWATCH_FLEET__SITE": f"e2e{uuid.uuid4().hex[:6]}",
                               "FLEETWATCH_FLEET__FAULT_INTERVAL_S": "60"})
    assert r.returncode == 0, r.stderr[-3000:]
    site = r.stderr.split("bms/v1/")[1].split("/")[0]
    published = int(r.stderr.split("BMS simulator: ")[1].split(" ")[0])
    collected = int(r.stderr.split("MQTT messages, ")[1].split(" ")[0])
    rows = archived(tmp_path / "data", "facility_samples")
    print(f"mqtt e2e: {published} readings published on MQTT, {collected} collected, {rows.height} archived")
    assert published > 1000 and collected == published == rows.height
    assert rows.select(pl.struct("device", "metric", "ts").n_unique()).item() == rows.height
    assert set(rows["site"]) == {site}
    labels = archived(tmp_path / "data", "fault_labels")
    alerts = archived(tmp_path / "data", "alerts").filter(pl.col("status") == "firing")
    assert labels.height >= 1
    expected = {"coolant_leak": "CoolantLeak", "coolant_flow_loss": "CoolantFlowLoss", "pdu_overload": "PduOverload"}
    for fault in labels.filter(pl.col("start") < labels["start"].max()).iter_rows(named=True):
        hits = alerts.filter((pl.col("alertname") == expected[fault["fault_type"]]) & (pl.col("rack") == fault["rack"]))
        assert hits.height >= 1, f"{fault['fault_type']} on {fault['rack']} raised no alert"
