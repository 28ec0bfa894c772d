"""Time that lies does not blind detection: readings stamped outside a window around the
receiver's clock (intake.max_ahead_s ahead, intake.max_age_s old) are dead-lettered with
the reason and counted, in every consumer and in the MQTT collector. The clock is injected
in these tests; the simulator, which runs faster than real time, is judged by its own clock.

The end-to-end tests (processes, brokers, tmpfs) are in tests/e2e/test_time_window.py."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.bus import Message, Topic
from pipeline.bus.intake import TimeWindow, split
from pipeline.daemon import run_daemon
from pipeline.roles.context import intake_window
from pipeline.model import GPU_SAMPLE, TS
from pipeline.sources.bms_tree import encode_meta, encode_reading
from pipeline.sources.mqtt import MqttCollector
from pipeline.sources.simulate import FleetSimulator
from tests.conftest import make_config
from tests.test_poison import START, archived, config, dead_lines, run_consumers, sim_ticks

DAY_NS = 86_400 * 10**9


def stamped(batch: pa.RecordBatch, row: int, ts_ns: int) -> pa.RecordBatch:
    """One row of a batch, stamped `ts_ns`."""
    one = batch.slice(row, 1)
    return one.set_column(0, GPU_SAMPLE.field("ts"), pa.array([ts_ns], pa.int64()).cast(TS))


def test_the_window_is_around_the_injected_clock():
    now = START.timestamp()
    w = TimeWindow(300, 7 * 86400, lambda: now)
    now_ns = int(now * 1e9)
    assert w.judge(now_ns) is None and w.judge(now_ns + 299 * 10**9) is None
    assert w.judge(now_ns + DAY_NS)[0] == "time_ahead"
    assert w.judge(0)[0] == "too_old"
    assert w.judge(now_ns - 8 * DAY_NS)[0] == "too_old"
    assert TimeWindow(0, 0, lambda: now).judge(2**63 - 1) is None  # both limits off
    batch = sim_ticks(make_config(fleet={"racks": 1, "nodes_per_rack": 1}), 1)[0].value
    ts = batch.column("ts").cast(pa.int64()).to_pylist()
    ts[0], ts[1], ts[2] = 0, 2**63 - 1, ts[2] + DAY_NS
    late = batch.set_column(0, GPU_SAMPLE.field("ts"), pa.array(ts, pa.int64()).cast(TS))
    valid, rejected = split(Topic.GPU, late, w)
    assert valid.num_rows == batch.num_rows - 3
    assert {r.reason: r.rows.num_rows for r in rejected} == {"too_old": 1, "time_ahead": 2}
    # Without a window only the impossible ones go: 1970 and 2262 are not nanoseconds of this era.
    valid, rejected = split(Topic.GPU, late)
    assert valid.num_rows == batch.num_rows - 2 and {r.reason for r in rejected} == {"bad_timestamp"}


def test_a_gpu_from_1970_or_2262_blinds_nothing_and_opens_no_partition(tmp_path):
    """One GPU's sample stamped 1970 taught detect a reporting interval of 56 years (the GPU
    could then stop reporting unnoticed, or raise a false GpuNotReporting), and one stamped
    2262 created a date=2262-04-11 archive partition. Both are dead-lettered, and when that
    GPU really stops reporting, GpuNotReporting fires for it and nothing else."""
    cfg = config(tmp_path)
    ticks = sim_ticks(cfg, 70)
    gpu = ticks[0].value
    victim = gpu.column("gpu_uuid")[3].as_py()
    now = START.timestamp() + 60.0
    publish = []
    for i, m in enumerate(ticks):
        if m.topic == Topic.GPU and i // 2 == 40:  # one scrape: the victim says 1970, another GPU 2262
            ts = m.value.column("ts").cast(pa.int64()).to_pylist()
            ts[3], ts[5] = 0, 2**63 - 1
            m = Message(Topic.GPU, m.value.set_column(0, GPU_SAMPLE.field("ts"), pa.array(ts, pa.int64()).cast(TS)))
        elif m.topic == Topic.GPU and i // 2 >= 50:  # the victim stops reporting; its node goes on
            m = Message(Topic.GPU, m.value.filter(pc.not_equal(m.value.column("gpu_uuid"), victim)))
        publish.append(m)
    publish.insert(90, Message(Topic.GPU, stamped(gpu, 6, int(now * 1e9) + DAY_NS)))  # a day ahead
    out = asyncio.run(run_consumers(cfg, publish, TimeWindow(300, 7 * 86400, lambda: now)))

    alerts = [json.loads(x) for x in cfg.alerts_log.read_text().splitlines()]
    silent = [(a["labels"]["alertname"], a["labels"]["node"], a["labels"]["gpu"]) for a in alerts
              if a["labels"]["alertname"] in ("GpuNotReporting", "NodeNotReporting")]
    assert silent == [("GpuNotReporting", gpu.column("node")[3].as_py(), str(gpu.column("gpu")[3].as_py()))]
    days = {p.name for p in (tmp_path / "archive" / "gpu_samples").iterdir()}
    assert days == {"date=2026-01-01"}
    sent = sum(m.value.num_rows for m in publish if m.topic == Topic.GPU)
    assert archived(tmp_path, "gpu_samples").num_rows == sent - 3
    letters = dead_lines(tmp_path)
    # In-process each batch is screened once, for detect and the archive alike.
    assert sorted((x["group"], x["reason"], x["row"]["ts"][:4]) for x in letters) == [
        ("intake", "time_ahead", "2026"), ("intake", "time_ahead", "2262"), ("intake", "too_old", "1970")]
    assert out["gates"]["intake"].rejected == {"too_old": 1, "time_ahead": 2}
    assert "intake.max_ahead_s" in next(x["detail"] for x in letters if x["reason"] == "time_ahead")


def test_the_receiver_s_clock_is_the_simulator_s_where_it_runs():
    sim = FleetSimulator(make_config().fleet, start=datetime(2030, 6, 1, tzinfo=timezone.utc))
    cfg = make_config()
    w = intake_window(cfg, frozenset({"simulate", "detect", "archive", "notify"}), sim)
    assert w.now() == sim.now.timestamp() and w.max_ahead_s == 300
    sim.step()
    assert w.now() == sim.now.timestamp()  # it follows simulated time, whatever the speed
    # Consumers alone judge by the wall clock; a simulator faster than real time elsewhere
    # cannot be judged by it, so there is no limit ahead (the age limit stays).
    alone = frozenset({"detect"})
    assert intake_window(cfg, alone, sim).max_ahead_s == 300
    fast = intake_window(make_config(fleet={"speed": 20}), alone, sim)
    assert fast.max_ahead_s == 0 and fast.max_age_s == 7 * 86400
    off = intake_window(make_config(intake={"max_ahead_s": 0, "max_age_s": 0}), alone, sim)
    assert off.bounds_ns() == (None, None)


def test_the_simulator_faster_than_real_time_is_never_dead_lettered(tmp_path):
    """`fleetwatch run --speed 0`: simulated time runs far ahead of the wall clock, and a
    window of 1 s ahead still takes every reading, because the simulator's clock is the
    receiver's in that process."""
    cfg = make_config(data_dir=str(tmp_path), fleet={"racks": 1, "nodes_per_rack": 2, "speed": 0},
                      intake={"max_ahead_s": 1}, alerts={"console": False})
    summary = asyncio.run(run_daemon(cfg, duration_s=3))
    assert summary.gpu_samples_published > 0
    assert not (tmp_path / "deadletter" / "intake.jsonl").exists()
    assert archived(tmp_path, "gpu_samples").num_rows == summary.gpu_samples_published == summary.gpu_samples


# ---- MQTT ------------------------------------------------------------------------------------

T0_NS = 1_767_225_600_000 * 10**6  # 2026-01-01, the collector's clock below
READING = "bms/v1/p/cdu/cdu-r01/supply_temp"


def collector(tmp_path: Path, **window) -> MqttCollector:
    clock = {"now": T0_NS / 1e9}
    c = MqttCollector("h", 1, "p", tmp_path / "dead.jsonl",
                      window=TimeWindow(window.get("ahead", 300), window.get("age", 86400), lambda: clock["now"]))
    c.clock = clock
    c.handle(f"{READING}/meta", encode_meta("degC", "r01"))
    return c


def read(c: MqttCollector, *ts_ns: int) -> None:
    for ts in ts_ns:
        c.handle(READING, encode_reading(30.0, ts, 1, False))


def test_one_mqtt_reading_a_day_ahead_does_not_hide_the_later_ones(tmp_path):
    c = collector(tmp_path)
    later = [T0_NS + k * 10**9 for k in range(1, 6)]
    read(c, T0_NS, T0_NS + DAY_NS, *later, T0_NS - 2 * DAY_NS)
    rows = c.take_batch().column("ts").cast(pa.int64()).to_pylist()
    assert rows == [T0_NS, *later]  # every honest reading; the day-ahead one and the 2-day-old one are dead letters
    c.dead_letters.close()
    letters = [json.loads(x) for x in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert [x["reason"] for x in letters] == ["time_ahead", "too_old"]
    assert c.stats.dead_letters == {"time_ahead": 1, "too_old": 1} and c.stats.duplicates == 0


def test_dedupe_never_trusts_a_future_timestamp_inside_the_window(tmp_path):
    """A reading 200 s ahead (within the 300 s window) is taken, but the readings after it,
    stamped by an honest clock, are not dropped as duplicates."""
    c = collector(tmp_path)
    read(c, T0_NS, T0_NS + 200 * 10**9)
    c.clock["now"] += 1
    read(c, T0_NS + 10**9, T0_NS + 10**9)  # an honest reading, then its redelivery
    rows = c.take_batch().column("ts").cast(pa.int64()).to_pylist()
    assert rows == [T0_NS, T0_NS + 200 * 10**9, T0_NS + 10**9]
    assert c.stats.duplicates == 1 and not c.stats.dead_letters


def test_a_second_copy_of_a_reading_ahead_of_the_clock_is_a_duplicate(tmp_path):
    c = collector(tmp_path)
    read(c, T0_NS, T0_NS + 200 * 10**9, T0_NS + 200 * 10**9)
    rows = c.take_batch().column("ts").cast(pa.int64()).to_pylist()
    assert rows == [T0_NS, T0_NS + 200 * 10**9] and c.stats.duplicates == 1


def test_without_a_limit_ahead_a_future_reading_still_hides_nothing(tmp_path):
    """intake.max_ahead_s = 0: a reading a day ahead is taken, and so is every later one."""
    c = collector(tmp_path, ahead=0)
    later = [T0_NS + k * 10**9 for k in range(1, 4)]
    read(c, T0_NS, T0_NS + DAY_NS, *later)
    rows = c.take_batch().column("ts").cast(pa.int64()).to_pylist()
    assert rows == [T0_NS, T0_NS + DAY_NS, *later] and c.stats.duplicates == 0


def test_a_gateways_backlog_behind_its_live_readings_is_taken_and_a_redelivery_is_not(tmp_path):
    """A store-and-forward BMS gateway back from an outage sends its backlog, maybe behind its
    live readings: every one of it had been dropped as a duplicate (older than the point's
    newest). It is taken now; a redelivery of a recent reading, and the broker's retained one
    sent again at a subscription, are still duplicates."""
    c = collector(tmp_path)
    c.clock["now"] += 60
    live = [T0_NS + k * 10**9 for k in range(50)]
    backlog = [T0_NS - (100 - k) * 10**9 for k in range(10)]  # from a pause of 90 s
    read(c, *live, *backlog)
    read(c, *live[5:40], backlog[3])  # QoS 1 redeliveries after a reconnect: a window of 35, older than the last 16
    c.handle(READING, encode_reading(30.0, T0_NS - 50 * 10**9, 1, False), retained=True)  # the broker's last
    rows = c.take_batch().column("ts").cast(pa.int64()).to_pylist()
    assert rows == live + backlog
    assert c.stats.backfilled == 10 and c.stats.duplicates == 37
