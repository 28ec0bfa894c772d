"""Records no Fleetwatch process wrote: another producer's Kafka records (a binary key, a header without a
value, a version header int() cannot read) and times to the nanosecond (a Go or Java clock). Each reader
takes what it can read and refuses the rest as bad input; none raises out of its consumer, which had
stopped the role and met the same record again at every restart."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.bus import Message, Topic
from pipeline.bus.codec import DecodeError, Decoder, encode
from pipeline.bus.kafka import KafkaBus, received
from pipeline.model import FACILITY_SAMPLE, Alert, alerts_to_batch
from pipeline.power.request import PowerRequest
from pipeline.remediate.cases import AlertChange
from tests.test_power_role import Harness

ONE_NS = pa.scalar(1, pa.duration("ns"))


def with_nanoseconds(batch: pa.RecordBatch, *columns: str) -> pa.RecordBatch:
    """The batch with 123 ns added to each time of `columns`: as a clock of nanoseconds stamps them."""
    for name in columns:
        i = batch.schema.get_field_index(name)
        shifted = pc.add(batch.column(i), pa.scalar(123, pa.duration("ns")))
        batch = batch.set_column(i, batch.schema.field(i), shifted.cast(batch.schema.field(i).type))
    return batch


def facility_record(**changes) -> SimpleNamespace:
    """A consumed record (aiokafka's ConsumerRecord's fields) of one valid facility reading."""
    value, headers = encode(pa.RecordBatch.from_pylist([{
        "ts": 1767225600_000_000_000, "site": "s", "rack": "r01", "device": "cdu-1", "metric": "flow_lpm",
        "value": 10.0, "quality": 1, "device_class": "cdu"}], schema=FACILITY_SAMPLE))
    fields = dict(topic="fleetwatch.facility", partition=0, offset=7, key=b"s/r01", value=value, headers=headers)
    return SimpleNamespace(**(fields | changes))


def test_a_header_without_a_value_is_no_header_and_a_binary_key_is_read_as_text():
    rec = facility_record(key=b"\x9f\xffrack", headers=facility_record().headers + [("traceparent", None)])
    message = received(Topic.FACILITY, Decoder().decode(rec.value, rec.headers), rec)
    assert message.value.num_rows == 1 and message.key == "\ufffd\ufffdrack"
    assert "traceparent" not in message.headers and message.headers["fw-schema"] == "facility_sample"


@pytest.mark.parametrize("headers, reason", [
    ([("fw-schema", None), ("fw-version", b"2")], "unknown or missing fw-schema header ''"),
    ([("fw-schema", b"facility_sample"), ("fw-version", "²".encode())],
     "facility_sample: schema version '²', this consumer reads version 1 or 2"),
])
def test_schema_headers_another_producer_got_wrong_are_refused_as_bad_input(headers, reason):
    with pytest.raises(DecodeError) as e:
        Decoder().decode(facility_record().value, headers)
    assert e.value.reason == reason


def test_a_listener_counts_what_does_not_decode_and_says_it_once(caplog):
    """Every agent listens to its rack's power caps: a foreign producer on that topic had logged a line per
    record on every node, counted nowhere."""
    async def listen():  # (aiokafka's producer is made in a running loop; nothing connects)
        bus = KafkaBus("127.0.0.1:9", partitions=1)
        await bus.producer.stop()
        return bus, bus.listen(Topic.POWER_CAPS, ["s/r01"])
    bus, listener = asyncio.run(listen())
    with caplog.at_level(logging.WARNING, logger="pipeline.bus.kafka"):
        for offset in range(50):
            listener._undecodable(facility_record(topic="fleetwatch.power.caps", offset=offset), "a reason")
    assert listener.dead_letters == 50 and bus.listeners == [listener]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("listen:fleetwatch.power.caps: message fleetwatch.power.caps[0]@0 does not decode "
                           "(a reason)")


def test_a_grid_signal_row_timed_to_the_nanosecond_is_taken_as_any_other(tmp_path):
    h = Harness(tmp_path)
    h.run(30)
    request = PowerRequest(site="site-a", start=h.sim.now, duration_s=60, reduction_pct=5, source="kafka",
                           id="grid-ns", ts=h.sim.now)
    batch = with_nanoseconds(request.to_batch(), "ts", "start")

    class Letters:
        where = "nowhere"
        rows: list = []

        async def write_rows(self, *args):
            self.rows.append(args)
    asyncio.run(h.role.grid_signal(Message(Topic.POWER_REQUESTS, batch), Letters()))
    assert {e.id: e.state for e in h.store.entries()} == {"grid-ns": "accepted"}
    assert Letters.rows == []


def test_remediation_reads_an_alert_timed_to_the_nanosecond():
    alert = Alert(labels={"alertname": "GpuFellOffBus", "severity": "critical", "site": "s", "rack": "r01",
                          "node": "n1", "gpu": "0"}, annotations={"summary": "fell off"},
                  starts_at=pa.scalar(1767225600_000_000_000, pa.timestamp("ns", tz="UTC")).as_py(),
                  detector="xid", score=1.0)
    batch = with_nanoseconds(alerts_to_batch([(alert.starts_at, alert)]), "starts_at")
    (change,) = AlertChange.rows(batch)
    assert change.alertname == "GpuFellOffBus" and change.node == "n1" and change.starts_at == 1767225600.0
