"""The MQTT facility path against a real Mosquitto: the simulator's BMS publisher,
the collector, and what lands in the Parquet archive.

The end-to-end tests (processes, brokers, tmpfs) are in tests/e2e/test_mqtt.py."""

from __future__ import annotations

import json
import math
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.model import FACILITY_SAMPLE
from pipeline.sources.bms_tree import STATE_METRICS, UNITS, decode_meta, decode_reading, encode_meta, \
    encode_reading
from pipeline.sources.mqtt import Backoff, MqttCollector

T0_MS = 1_767_225_600_000  # 2026-01-01


def reading(value, ts_ms: int, quality: int = 1) -> bytes:
    return json.dumps({"value": value, "timestamp": ts_ms, "quality": quality}).encode()


# ---- payload parsing and unit conversion (no broker) ------------------------------

@pytest.mark.parametrize("metric, unit, value, base", [
    ("supply_temp_c", "degF", 212.0, 100.0), ("supply_temp_c", "K", 273.15, 0.0),
    ("flow_lpm", "gpm", 1.0, 3.785411784), ("flow_lpm", "m3/h", 6.0, 100.0),
    ("dp_kpa", "psi", 1.0, 6.894757293168361), ("dp_kpa", "bar", 1.5, 150.0),
    ("power_w", "kW", 12.5, 12_500.0), ("energy_j", "kWh", 1.0, 3.6e6), ("energy_j", "Wh", 2.0, 7200.0),
])
def test_units_convert_to_base(metric, unit, value, base):
    _, got, _, _ = decode_reading(reading(value, T0_MS), decode_meta(encode_meta(unit, "r01"), metric))
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
    ts_ns, value, q, odd = decode_reading(payload, meta)
    assert (ts_ns, q, odd, meta.rack) == (ms * 1_000_000, quality, "", "r07")
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
        waiting = collector.waiting  # (readings whose metadata has not come: dead-lettered when it does not)
        collector.expire_waiting(everything=True)
        collector.dead_letters.close()
        stats = collector.stats
        n_rows = batch.num_rows if batch is not None else 0
        assert stats.messages == (stats.metadata + n_rows + stats.duplicates + stats.cleared
                                  + sum(stats.dead_letters.values()))
        assert waiting <= stats.dead_letters.get("no_metadata", 0)
        lines = (Path(tmp) / "dead.jsonl").read_text().splitlines() if stats.dead_letters else []
        assert len(lines) == sum(stats.dead_letters.values())
        if batch is not None:
            assert batch.schema == FACILITY_SAMPLE
            values = batch.column("value").to_pylist()
            assert all(math.isfinite(v) for v in values)
            for metric, v in zip(batch.column("metric").to_pylist(), values):
                if metric == "pump_on":
                    assert v in (0.0, 1.0)


def test_the_power_branch_of_the_tree_is_not_equipment_and_is_left_alone(tmp_path):
    """Power requests and their answers (power/mqtt_intake.py) share the site's tree: the
    collector neither reads them as readings nor dead-letters them."""
    collector = MqttCollector("h", 1, "p", tmp_path / "dead.jsonl")
    for topic in ("bms/v1/p/power/requests", "bms/v1/p/power/requests/dr-1/status", "bms/v1/p/power/requests/rejected"):
        collector.handle(topic, b'{"id": "dr-1", "reduction_kw": 20}')
    collector.handle("bms/v1/p/powerhouse/x/y", b"{}")  # only the branch itself: this is a bad topic
    assert collector.stats.messages == 1 and sum(collector.stats.dead_letters.values()) == 1
    collector.dead_letters.close()


def test_a_dead_letter_file_whose_open_hangs_holds_no_message(tmp_path):
    """paho hands messages over on the event loop: a dead letter written there, to a file on a hung disk (a
    FIFO: its open waits for a reader), had stopped the whole process at one bad message. It is written by
    a thread of its own: handle() returns at once."""
    import os
    import threading
    fifo = tmp_path / "dead.jsonl"
    os.mkfifo(fifo)
    collector = MqttCollector("h", 1, "p", fifo)
    collector.handle("bms/v1/p/cdu/cdu-r01/supply_temp/meta", encode_meta("degF", "r01"))
    returned, held = threading.Event(), threading.Event()
    read = []

    def disk() -> None:  # the hung disk, for 10 s at most (then it answers, and the handler goes on)
        if not returned.wait(10):
            held.set()
        with open(fifo) as f:
            read.append(f.read())
    answering = threading.Thread(target=disk, daemon=True)
    answering.start()
    collector.handle("bms/v1/p/cdu/cdu-r01/supply_temp", b"N/A")
    returned.set()
    collector.handle("bms/v1/p/cdu/cdu-r01/supply_temp", reading(86.0, T0_MS))
    collector.dead_letters.close()
    answering.join(30)
    assert not held.is_set()  # handle() did not wait on the disk
    assert collector.take_batch().num_rows == 1 and '"reason": "bad_json"' in read[0]


def test_an_empty_message_clears_a_retained_one_and_is_no_dead_letter(tmp_path):
    """An empty message is MQTT's way of deleting a retained one: a gateway that clears its tree had filled the
    dead letters with a bad_json each (its readings and metadata alike)."""
    collector = MqttCollector("h", 1, "p", tmp_path / "dead.jsonl")
    collector.handle("bms/v1/p/cdu/cdu-r01/supply_temp/meta", encode_meta("degC", "r01"))
    for topic in ("bms/v1/p/cdu/cdu-r01/supply_temp", "bms/v1/p/cdu/cdu-r01/supply_temp/meta", "bms/v1/p/x/y/z"):
        collector.handle(topic, b"")
    collector.dead_letters.close()
    assert collector.stats.cleared == 3 and collector.stats.dead_letters == {} and collector.take_batch() is None
    assert not (tmp_path / "dead.jsonl").exists()


def test_backoff_doubles_up_to_its_cap_with_jitter_and_starts_over_after_a_connection():
    backoff = Backoff(initial_s=0.1, max_s=2.0, rng=random.Random(1))
    delays = [backoff.next_s() for _ in range(12)]
    for i, d in enumerate(delays):
        nominal = min(2.0, 0.1 * 2 ** i)
        assert nominal / 2 <= d <= nominal
    assert len({round(d, 6) for d in delays[6:]}) > 1, "capped delays are jittered, not all equal"
    backoff.reset()
    assert backoff.next_s() <= 0.1


def test_handoff_carries_the_retain_flag_only_to_a_handler_that_asks_for_it():
    """The collector's handler takes (topic, payload): its point metadata comes retained. The power
    intake's takes the flag too: a request the broker sends because it is retained is refused."""
    import aiomqtt

    from pipeline.sources.mqtt import handoff
    got = []
    message = aiomqtt.Message("bms/v1/p/power/requests", b"{}", qos=1, retain=True, mid=1, properties=None)
    handoff(lambda *a: got.append(a))().put_nowait(message)
    handoff(lambda *a: got.append(a), with_retain=True)().put_nowait(message)
    assert got == [("bms/v1/p/power/requests", b"{}"), ("bms/v1/p/power/requests", b"{}", True)]


def test_a_dead_letter_file_that_cannot_be_written_or_a_failing_handler_stops_nothing(tmp_path, caplog):
    """An OSError writing the dead letter had escaped into paho, which logs, does not acknowledge,
    and hands the same message back: 42,509 times in 5 s, and nothing else read."""
    import aiomqtt

    from pipeline.sources.mqtt import handoff
    (tmp_path / "file").write_text("")
    collector = MqttCollector("h", 1, "p", tmp_path / "file" / "dead.jsonl")  # (under a file: cannot be made)
    collector.handle("bms/v1/p/cdu/cdu-r01/supply_temp/meta", encode_meta("degF", "r01"))
    with caplog.at_level("INFO", logger="pipeline.sources.mqtt"):
        for i in range(3):
            collector.handle("bms/v1/p/cdu/cdu-r01/supply_temp", b"N/A")
            collector.handle("bms/v1/p/cdu/cdu-r01/supply_temp", reading(86.0 + i, T0_MS + i))
    assert collector.take_batch().num_rows == 3
    collector.dead_letters.close()
    assert collector.stats.dead_letters == {"bad_json": 3} and collector.dead_letters.unwritten == 3
    assert caplog.text.count("cannot write") == 1

    def broken(topic, payload):
        raise RuntimeError("a bug")
    message = aiomqtt.Message("bms/v1/p/x", b"{}", qos=1, retain=False, mid=1, properties=None)
    queue = handoff(broken)()
    with caplog.at_level("ERROR", logger="pipeline.sources.mqtt"):
        queue.put_nowait(message)  # taken (and acknowledged), said once
        queue.put_nowait(message)
    assert caplog.text.count("could not be handled") == 1


@pytest.mark.parametrize("settings, key", [({"site": "dc1/#"}, "mqtt.site"), ({"site": "+"}, "mqtt.site"),
                                           ({"topic_root": "bms/#"}, "mqtt.topic_root")])
def test_a_site_or_root_with_mqtts_wildcards_is_refused_at_start(settings, key):
    """`<root>/<site>/#` with a site of `dc1/#` or `+` had subscribed to other sites' trees."""
    from pipeline.config import ConfigError
    from pipeline.sources.mqtt import preflight
    from tests.conftest import make_config
    with pytest.raises(ConfigError, match=f"config error: {key} = "):
        preflight(make_config(mqtt={"broker": "127.0.0.1:1883", **settings}))
    preflight(make_config(mqtt={"broker": "127.0.0.1:1883", "site": "dc1"}))


def test_a_pause_is_no_outage_and_a_loss_after_it_is_said():
    """A collector that leaves the broker to queue (its bus slow) and comes back: the outage from
    its start had never ended ("reconnected after 3611 s" at each pause, a loss after it unsaid)."""
    from pipeline.sources.mqtt import Outages
    now = [100.0]
    said = []

    class Log:
        def warning(self, *a):
            said.append(a[0] % a[1:])
        error = warning
    outages = Outages("MQTT b:1", Backoff(rng=random.Random(1)), Log(), "id", clock=lambda: now[0])
    outages.down(OSError("refused"), "retrying")  # cannot connect at start
    now[0] = 110.0
    assert outages.up() is None  # the first connection
    now[0] = 3700.0
    outages.ended()  # a pause
    now[0] = 3711.0
    assert outages.up() is None  # back from the pause: no reconnect, no outage
    now[0] = 3716.0
    outages.down(OSError("gone"), "retrying")  # a loss 5 s later: a new outage, said
    assert said == ["MQTT b:1: cannot connect (refused); retrying", "MQTT b:1: connection lost (gone); retrying"]


def test_points_whose_metadata_never_comes_do_not_crowd_out_the_others(tmp_path):
    collector = MqttCollector("h", 1, "p", tmp_path / "dead.jsonl")
    now = [1000.0]
    collector.clock = lambda: now[0]
    orphan, good = "bms/v1/p/cdu/cdu-r09/supply_temp", "bms/v1/p/cdu/cdu-r01/supply_temp"
    for i in range(1000):  # one point's readings, its metadata never coming: at most its share waits
        collector.handle(orphan, reading(86.0, T0_MS + i))
    assert collector.waiting == 256 and collector.stats.dead_letters == {"no_metadata": 744}
    now[0] += 61.0
    collector.expire_waiting()  # its grace is over: its next readings go at once, without waiting
    collector.handle(orphan, reading(86.0, T0_MS + 2000))
    assert collector.waiting == 0 and collector.stats.dead_letters == {"no_metadata": 1001}
    for i in range(5):  # a point whose metadata comes (after a restart) still waits for it
        collector.handle(good, reading(86.0, T0_MS + i))
    collector.handle(good + "/meta", encode_meta("degF", "r01"))
    assert collector.take_batch().num_rows == 5
    collector.dead_letters.close()


@pytest.mark.parametrize("quality, alerted", [(1, True), (True, True), (0, False), (False, False), (192, False)])
def test_a_reading_its_bms_marks_bad_is_archived_not_detected_on(tmp_path, caplog, quality, alerted):
    """A faulted leak sensor whose gateway sends its last value marked bad (quality 0) had raised CoolantLeak;
    an OPC gateway's own good code (192) is bad too, and said once."""
    from pipeline.bus import Message, Topic
    from pipeline.bus.intake import TimeWindow, split
    from pipeline.detect.engine import Engine
    from tests.conftest import make_config
    clock = [T0_MS / 1000.0]
    c = MqttCollector("bms", 1883, site="site-a", dead_letter_path=tmp_path / "dl.jsonl",
                      window=TimeWindow(now=lambda: clock[0]))
    root = "bms/v1/site-a/cdu/cdu-r01"
    for point, unit in (("leak_detect", "bool"), ("flow", "lpm"), ("supply_temp", "C"), ("return_temp", "C")):
        c.handle(f"{root}/{point}/meta", json.dumps({"unit": unit, "rack": "r01"}).encode(), retained=True)
    engine, fired, archived = Engine(make_config(fleet={"racks": 1})), [], []
    for i in range(180):
        clock[0] = T0_MS / 1000.0 + i
        ms, leak = T0_MS + 1000 * i, i >= 60
        c.handle(f"{root}/leak_detect", json.dumps({"value": leak, "timestamp": ms,
                                                    "quality": quality if leak else 1}).encode())
        for point, value in (("flow", 120.0), ("supply_temp", 30.0), ("return_temp", 38.0)):
            c.handle(f"{root}/{point}", json.dumps({"value": value, "timestamp": ms, "quality": 1}).encode())
        batch, _ = split(Topic.FACILITY, c.take_batch(), TimeWindow(now=lambda: clock[0]))
        archived += [r for r in batch.to_pylist() if r["metric"] == "leak" and r["value"] == 1.0]
        fired += [a.alertname for _, a in engine.process(Message(Topic.FACILITY, batch)).alerts]
    assert ("CoolantLeak" in fired) == alerted
    assert len(archived) == 120 and {r["quality"] for r in archived} == {int(alerted)}  # kept, as sent
    assert engine.stats.bad_quality == (0 if alerted else 120)
    odd = [r.getMessage() for r in caplog.records if "neither 1 (good) nor 0 (bad)" in r.getMessage()]
    assert len(odd) == (quality == 192) and c.stats.odd_quality == (120 if quality == 192 else 0)


def test_a_rack_or_meter_reading_under_a_kilowatt_doubts_its_unit_once(tmp_path, caplog):
    """A BMS that sends kW under a /meta that says W: a 35 kW rack read as 35 W (its PduOverload could never
    fire, a demand response would be baselined 1000x low), without a word. Taken as sent, said once."""
    c = MqttCollector("bms", 1883, site="site-a", dead_letter_path=tmp_path / "dl.jsonl")
    for device, cls, rack in (("pdu-r01", "rack", "r01"), ("pdu-r02", "rack", "r02"), ("meter-main", "meter", "")):
        c.handle(f"bms/v1/site-a/{cls}/{device}/power/meta", json.dumps({"unit": "W", "rack": rack}).encode(),
                 retained=True)
    for i, (device, cls, value) in enumerate([("pdu-r01", "rack", 35.2), ("pdu-r01", "rack", 35.4),
                                              ("pdu-r02", "rack", 36.0), ("meter-main", "meter", 290_500.0)]):
        c.handle(f"bms/v1/site-a/{cls}/{device}/power",
                 json.dumps({"value": value, "timestamp": T0_MS + 1000 * i}).encode())
    assert c.take_batch().column("value").to_pylist() == [35.2, 35.4, 36.0, 290_500.0]  # taken as sent
    said = [r.getMessage() for r in caplog.records if "draws kilowatts" in r.getMessage()]
    assert len(said) == 1 and "bms/v1/site-a/rack/pdu-r01/power reads 35.2 W (unit 'W' in its /meta)" in said[0]
    assert c.stats.doubted_units == 2  # each point once; the meter's 290 kW is no doubt


@pytest.mark.parametrize("ts, said", [
    (1_767_225_600, " (it looks like epoch seconds)"), (1_767_225_600_000_000, " (it looks like epoch microseconds)"),
    (1_767_225_600_000_000_000, " (it looks like epoch nanoseconds)"), (5, ""),
])
def test_a_timestamp_in_another_unit_is_refused_saying_which_it_looks_like(ts, said):
    from pipeline.sources.bms_tree import Rejected
    with pytest.raises(Rejected) as e:
        decode_reading(reading(20.0, ts), decode_meta(encode_meta("C", "r01"), "supply_temp_c"))
    assert e.value.detail == f"timestamp {ts} is not epoch milliseconds{said}"
