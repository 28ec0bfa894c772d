"""End-to-end: the MQTT collector and the daemon against a real Mosquitto broker (moved from
tests/test_mqtt.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from datetime import datetime, timezone

import aiomqtt
import polars as pl
import pyarrow as pa
import pytest

from pipeline.model import FACILITY_SAMPLE
from pipeline.sinks.parquet import ArchiveWriter
from pipeline.sources.bms import BmsPublisher
from pipeline.sources.bms_tree import encode_meta
from pipeline.sources.mqtt import Backoff, MqttCollector
from pipeline.sources.simulate import FleetSimulator
from tests.conftest import make_config
from tests.services import Mosquitto
from tests.test_mqtt import T0_MS, reading


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
    assert archived.schema["ts"] == pl.Datetime("us", "UTC")  # archive format 2: Spark reads it
    assert_same_readings(archived.to_dicts(), expected)


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
        (f"{cdu}/diff_pressure/meta", encode_meta("inH2O", "r01"), "unknown_unit"),
        (f"{cdu}/diff_pressure", reading(3.0, T0_MS), "unknown_unit"),  # its point's unit is unknown
        (f"{cdu}/return_temp/meta", encode_meta("psi", "r01"), "unknown_unit"),  # not a temperature
        (f"{cdu}/leak_detect/meta", b'{"unit": "bool"}', "bad_metadata"),  # no rack
    ]
    good_meta = [(f"{cdu}/supply_temp/meta", encode_meta("degF", "r01")),
                 (f"{cdu}/pump_state/meta", encode_meta("bool", "r01"))]
    sequence = [*good_meta, (f"{cdu}/supply_temp", reading(86.0, T0_MS)), (f"{cdu}/pump_state", reading(True, T0_MS)),
                (f"{cdu}/flow", reading(26.0, T0_MS))]  # before its metadata: it waits for it
    for i, (topic, payload, _) in enumerate(bad):  # a good reading after each bad message
        sequence += [(topic, payload), (f"{cdu}/supply_temp", reading(86.0 + i, T0_MS + 1000 * (i + 1)))]
    sequence += [(f"{cdu}/flow/meta", encode_meta("gpm", "r01")), (f"{cdu}/flow", reading(26.0, T0_MS + 1)),
                 (f"{cdu}/supply_temp", reading(50.0, T0_MS)),  # not newer than the last: a duplicate
                 (f"{cdu}/pump_state", reading(0, T0_MS + 1)),
                 (f"{cdu}/leak_detect", reading(True, T0_MS))]  # its metadata never comes: dead-lettered at the stop

    async def go():
        col = Collecting(MqttCollector(broker.host, broker.port, site, dead, backoff=fast_backoff()))
        await subscribed(col.collector)
        async with aiomqtt.Client(broker.host, broker.port) as bms:
            for topic, payload in sequence:
                await bms.publish(topic, payload, qos=1, retain=topic.endswith("/meta"))
        await col.until_rows(2 + len(bad) + 3)
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
    assert [(r["metric"], key(r)[2], r["value"]) for r in got if r["metric"] != "supply_temp_c"] == [
        ("pump_on", T0_MS, 1.0), ("flow_lpm", T0_MS, pytest.approx(26.0 * 3.785411784)),
        ("flow_lpm", T0_MS + 1, pytest.approx(26.0 * 3.785411784)), ("pump_on", T0_MS + 1, 0.0)]
    assert {r["rack"] for r in got} == {"r01"}

    stats = col.collector.stats
    bad.append((f"{cdu}/leak_detect", reading(True, T0_MS), "no_metadata"))
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
def test_a_restarted_collector_keeps_what_the_broker_queued_before_the_metadata_came(broker, tmp_path):
    """A new collector knows no point, and the broker sends what it queued for the session, and a
    retained reading, before the retained metadata its subscription brings: every one of them had
    been dead-lettered as having no metadata (a Kubernetes rollout, a crash)."""
    site = f"s{uuid.uuid4().hex[:8]}"
    cdu = f"bms/v1/{site}/cdu/cdu-r01"

    async def go():
        first = Collecting(MqttCollector(broker.host, broker.port, site, tmp_path / "dead.jsonl",
                                         backoff=fast_backoff()))
        await subscribed(first.collector)
        async with aiomqtt.Client(broker.host, broker.port) as bms:
            await bms.publish(f"{cdu}/supply_temp/meta", encode_meta("degF", "r01"), qos=1, retain=True)
            await bms.publish(f"{cdu}/leak_detect/meta", encode_meta("bool", "r01"), qos=1, retain=True)
            await bms.publish(f"{cdu}/supply_temp", reading(86.0, T0_MS), qos=1)
            await first.until_rows(1)
            await first.close()  # its session stays: the broker queues for it
            for i in range(1, 6):
                await bms.publish(f"{cdu}/supply_temp", reading(86.0 + i, T0_MS + 1000 * i), qos=1)
            await bms.publish(f"{cdu}/leak_detect", reading(True, T0_MS + 500), qos=1, retain=True)  # a state
        second = Collecting(MqttCollector(broker.host, broker.port, site, tmp_path / "dead.jsonl",
                                          backoff=fast_backoff()))
        await second.until_rows(6)
        await asyncio.sleep(0.3)
        await second.close()
        return first, second

    first, second = asyncio.run(go())
    got = sorted((r["metric"], key(r)[2]) for r in rows(second.batches))
    assert got == [("leak", T0_MS + 500)] + [("supply_temp_c", T0_MS + 1000 * i) for i in range(1, 6)]
    assert second.collector.stats.dead_letters == {} and second.collector.waiting == 0


@pytest.mark.mqtt
def test_two_collectors_under_one_client_id_back_off_and_say_so(broker, tmp_path, caplog):
    """The broker evicts one for the other at each connect: they had reconnected six times a second
    each, for ever, a warning every time, the backoff starting over at each connection (a test
    instance pointed at production's broker)."""
    site = f"s{uuid.uuid4().hex[:8]}"

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == "pipeline.sources.mqtt"]

    async def go():
        twins = [Collecting(MqttCollector(broker.host, broker.port, site, tmp_path / f"dead-{i}.jsonl"))
                 for i in range(2)]
        deadline = asyncio.get_running_loop().time() + 60
        while not said() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        attempts = [c.collector.backoff.attempt for c in twins]
        for c in twins:
            await c.close()
        return attempts

    with caplog.at_level(logging.INFO, logger="pipeline.sources.mqtt"):
        attempts = asyncio.run(go())
    errors = said()
    assert errors and f"client id 'fleetwatch-facility-{site}'" in errors[0]
    assert max(attempts) >= 3  # its backoff grew through the evictions (it had started over at each one)
    lost = [r for r in caplog.records if r.levelno == logging.WARNING and "connection lost" in r.getMessage()
            and r.name == "pipeline.sources.mqtt"]
    assert len(lost) <= 2  # once per collector: one outage each, not one per eviction


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


@pytest.mark.mqtt
def test_the_daemon_reads_the_facility_from_mqtt_and_alerts_on_it(broker, tmp_path):
    """`fleetwatch run --mqtt`: the simulator publishes its coolant loops and power
    feeds on the BMS tree, the facility collector reads them back, and the rack faults
    injected in the simulator raise their alerts from what came over MQTT. Every
    reading published is archived exactly once."""
    from tests.conftest import fleetwatch
    from tests.helpers import FAST, archived
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


@pytest.mark.mqtt
def test_a_broker_that_wants_a_user_and_tls_gets_them_and_a_refusal_says_what_to_set(tmp_path, caplog):
    """Mosquitto 2 refuses anonymous clients once a listener is configured, and BMS brokers
    want a login: there had been no way to give one (and the hint said to check host and port)."""
    from pipeline.config import ConfigError
    from pipeline.sources.mqtt import connect_options
    from tests.services import self_signed_tls
    password = "pw-Mq7-s3cr3t"
    tls = self_signed_tls(tmp_path / "tls")
    secure = Mosquitto(tmp_path / "broker", users={"fleetwatch": password}, tls=tls).start()
    site = f"s{uuid.uuid4().hex[:8]}"
    cfg = make_config(mqtt={"broker": f"127.0.0.1:{secure.port}", "username": "fleetwatch",
                            "password_env": "FW_MQTT_PASSWORD", "ca_file": str(tls["ca.pem"])})
    options = connect_options(cfg.mqtt, {"FW_MQTT_PASSWORD": password})
    try:
        async def go():
            anonymous = Collecting(MqttCollector(secure.host, secure.port, site, tmp_path / "dead-a.jsonl",
                                                 backoff=fast_backoff(), connect={"tls_context": options["tls_context"]}))
            col = Collecting(MqttCollector(secure.host, secure.port, site, tmp_path / "dead.jsonl",
                                           backoff=fast_backoff(), connect=options))
            await subscribed(col.collector)
            pub = BmsPublisher(secure.host, secure.port, client_id=f"sim-{site}", backoff=fast_backoff(),
                               connect=options)
            stop = asyncio.Event()
            task = asyncio.create_task(pub.run(stop, drain_timeout_s=20))
            published = simulator(site).step().facility
            pub.publish(published)
            stop.set()
            await task
            await col.until_rows(published.num_rows)
            await col.close()
            await anonymous.close()
            return col, anonymous, published

        with caplog.at_level(logging.INFO):
            col, anonymous, published = asyncio.run(go())
    finally:
        secure.close()
    assert_same_readings(rows(col.batches), rows([published]))
    assert not anonymous.collector.subscribed.is_set() and anonymous.collector.stats.messages == 0
    refused = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert refused and "set mqtt.username and mqtt.password_env" in refused[0]
    assert password not in caplog.text
    with pytest.raises(ConfigError, match="mqtt.password_env = 'FW_MQTT_PASSWORD': that environment variable"):
        connect_options(cfg.mqtt, {})


@pytest.mark.mqtt
def test_a_client_certificate_renewed_on_disk_is_used_at_the_next_connection(tmp_path, caplog):
    """A broker that takes only clients with a certificate its CA signed rotates that CA, and the
    collector's certificate is renewed on disk (cert-manager): the collector had kept the one it
    read at start, and the broker refused it at every reconnect until a restart."""
    import shutil

    from pipeline.sources.mqtt import connect_options
    from tests.services import client_certificate, self_signed_tls
    tls, rotated = self_signed_tls(tmp_path / "tls"), self_signed_tls(tmp_path / "tls2")
    old = client_certificate(tls, tmp_path / "old", "collector")
    new = client_certificate(rotated, tmp_path / "new", "collector")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    shutil.copy(old[0], cert), shutil.copy(old[1], key)
    secure = Mosquitto(tmp_path / "broker", tls=tls, client_ca=tls["ca.pem"]).start()
    site = f"s{uuid.uuid4().hex[:8]}"
    cfg = make_config(mqtt={"broker": f"127.0.0.1:{secure.port}", "ca_file": str(tls["ca.pem"]),
                            "cert_file": str(cert), "key_file": str(key)})
    try:
        async def go():
            col = Collecting(MqttCollector(secure.host, secure.port, site, tmp_path / "dead.jsonl",
                                           backoff=fast_backoff(), connect=connect_options(cfg.mqtt)))
            await subscribed(col.collector)
            shutil.copy(new[1], key), shutil.copy(new[0], cert)  # renewed, by the new CA
            secure.stop()
            secure.config.write_text(secure.config.read_text().replace(str(tls["ca.pem"]), str(rotated["ca.pem"])))
            secure.start()
            deadline = time.monotonic() + 30
            while col.collector.stats.reconnects == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await col.close()
            return col
        with caplog.at_level(logging.INFO):
            col = asyncio.run(go())
    finally:
        secure.close()
    assert col.collector.stats.reconnects == 1, caplog.text[-3000:]
    assert f"the client certificate {cert} changed on disk: loaded" in caplog.text


@pytest.mark.mqtt
def test_a_bus_that_stalls_leaves_the_broker_to_queue_not_the_collectors_memory(broker, tmp_path):
    """While publish waits (Kafka's outbox full), the collector had read and acknowledged every
    reading into its own memory (70,800 rows in 5 s, a pod's 1 GiB for a long stall, all lost by
    an OOM kill): now it holds at most MAX_PENDING_BATCHES batches, then disconnects with its
    session kept, and the broker queues the rest until the bus takes them."""
    site = f"s{uuid.uuid4().hex[:8]}"
    cdu = f"bms/v1/{site}/cdu/cdu-r01"
    n = 20_000

    async def go():
        flowing = asyncio.Event()
        batches: list[pa.RecordBatch] = []

        async def publish(batch):
            await flowing.wait()  # the bus is full until the test lets it go
            batches.append(batch)
        collector = MqttCollector(broker.host, broker.port, site, tmp_path / "dead.jsonl", max_batch_rows=100,
                                  backoff=fast_backoff())
        stop = asyncio.Event()
        task = asyncio.create_task(collector.run(publish, stop))
        await subscribed(collector)
        async with aiomqtt.Client(broker.host, broker.port, max_inflight_messages=1000) as bms:
            await bms.publish(f"{cdu}/supply_temp/meta", encode_meta("degF", "r01"), qos=1, retain=True)
            for start in range(0, n, 500):  # (a window of QoS 1 messages in flight at a time)
                await asyncio.gather(*(bms.publish(f"{cdu}/supply_temp", reading(86.0, T0_MS + i), qos=1)
                                       for i in range(start, start + 500)))
        while not collector.stats.paused:
            await asyncio.sleep(0.05)
        flowing.set()
        deadline = asyncio.get_running_loop().time() + 60
        while sum(b.num_rows for b in batches) < n and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await task
        return collector, batches

    collector, batches = asyncio.run(go())
    got = [key(r)[2] for r in rows(batches)]
    assert sorted(got) == [T0_MS + i for i in range(n)]  # every one, once
    cap = collector.max_pending_rows
    print(f"held at most {collector.stats.most_pending} rows (cap {cap}), paused {collector.stats.paused} times")
    assert collector.stats.paused >= 1 and collector.stats.most_pending < cap + 5_000 < n
