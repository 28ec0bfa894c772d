"""The Kafka bus against a real broker (Apache Kafka 4.x, KRaft, from Maven Central)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline.bus import EndOfStream, Message, Topic
from pipeline.bus.codec import encode
from pipeline.bus.kafka import DEAD_LETTER, KafkaBus
from pipeline.model import GPU_SAMPLE, schema_version
from pipeline.sources.simulate import FleetSimulator
from tests.conftest import make_config
from tests.helpers import freeze, stop_in_order
from tests.services import KafkaBroker

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def broker():
    b = KafkaBroker().start()
    yield b
    b.close()


def per_node(batch: pa.RecordBatch) -> list[Message]:
    """One message per node scrape, keyed by node, as a collector sends them."""
    return [Message(Topic.GPU, batch.filter(pc.equal(batch.column("node"), n)), key=n)
            for n in pc.unique(batch.column("node")).to_pylist()]


async def drain(sub) -> list[Message]:
    got = []
    while True:
        try:
            got += await sub.get_batch(timeout_s=0.5)
        except EndOfStream:
            return got


def sim_batches(ticks: int) -> list[pa.RecordBatch]:
    sim = FleetSimulator(make_config(fleet={"racks": 1, "nodes_per_rack": 4}).fleet,
                         start=datetime(2026, 1, 1, tzinfo=timezone.utc))
    return [sim.step().gpu for _ in range(ticks)]


def test_batches_round_trip_exactly_and_in_order_per_node(broker):
    async def go():
        bus = KafkaBus(broker.bootstrap, partitions=3, prefix=f"t{uuid.uuid4().hex[:6]}.")
        await bus.start()
        sent = [m for b in sim_batches(20) for m in per_node(b)]
        for m in sent:
            await bus.publish(m)
        sub = bus.subscribe([Topic.GPU], "detect")
        await bus.end([Topic.GPU])
        got = await drain(sub)
        await sub.commit()
        await bus.close()
        return sent, got
    sent, got = asyncio.run(go())
    assert len(got) == len(sent) == 80
    assert pa.Table.from_batches([m.value for m in got]).sort_by([("node", "ascending"), ("ts", "ascending")]).equals(
        pa.Table.from_batches([m.value for m in sent]).sort_by([("node", "ascending"), ("ts", "ascending")]))
    for node in {m.key for m in sent}:  # a node's scrapes stay in order (one partition per key)
        ts = [m.value.column("ts")[0].as_py() for m in got if m.key == node]
        assert ts == sorted(ts) and len(ts) == 20
    version = str(schema_version(GPU_SAMPLE))
    assert all(m.headers["fw-schema"] == "gpu_sample" and m.headers["fw-version"] == version for m in got)


def test_bad_messages_are_dead_lettered_and_the_rest_flows(broker):
    prefix = f"t{uuid.uuid4().hex[:6]}."

    async def go():
        bus = KafkaBus(broker.bootstrap, partitions=2, prefix=prefix)
        await bus.start()
        raw = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await raw.start()
        good = sim_batches(3)
        value, headers = encode(good[0])
        bad = [
            (b"\x00garbage\xff" * 10, headers, "not a readable Arrow IPC stream"),
            (value[: len(value) // 2], headers, "not a readable Arrow IPC stream"),
            (value, [("fw-schema", b"gpu_sample"), ("fw-version", b"99")], "schema version '99'"),
            (value, [], "missing fw-schema"),
            (value, [("fw-schema", b"facility_sample"), ("fw-version", b"1")], "payload schema differs"),
        ]
        for b in good:
            await bus.publish(Message(Topic.GPU, b, key="n1"))
        for v, h, _ in bad:
            await raw.send_and_wait(bus.wire(Topic.GPU), v, key=b"n1", headers=h)
        for b in good:
            await bus.publish(Message(Topic.GPU, b, key="n1"))
        await raw.stop()
        sub = bus.subscribe([Topic.GPU], "archive")
        await bus.end([Topic.GPU])
        got = await drain(sub)
        await sub.commit()
        dlq = AIOKafkaConsumer(bus.wire(DEAD_LETTER), bootstrap_servers=broker.bootstrap,
                               auto_offset_reset="earliest", group_id="inspect")
        await dlq.start()
        letters = []
        while len(letters) < len(bad):
            for recs in (await dlq.getmany(timeout_ms=2000)).values():
                letters += recs
        await dlq.stop()
        await bus.close()
        return good, bad, got, letters, sub.dead_letters, bus.dead_letters
    good, bad, got, letters, sub_count, bus_count = asyncio.run(go())
    assert len(got) == 2 * len(good)  # every good message around the bad ones arrived
    assert sub_count == bus_count == len(bad)
    headers = [{k: v.decode(errors="replace") for k, v in rec.headers} for rec in letters]
    for (value, _, why) in bad:  # each bad message is there once, with why and where it came from
        [(rec, h)] = [(r, h) for r, h in zip(letters, headers) if why in h["fw-error"] and r.value == value]
        assert h["fw-source-topic"] == f"{prefix}fleetwatch.gpu" and h["fw-consumer-group"] == "archive"
    assert len({h["fw-source-offset"] for h in headers}) == len(bad)


def test_a_consumer_resumes_after_its_last_commit(broker):
    prefix = f"t{uuid.uuid4().hex[:6]}."

    async def go():
        bus = KafkaBus(broker.bootstrap, partitions=1, prefix=prefix)
        await bus.start()
        batches = sim_batches(10)
        for b in batches:
            await bus.publish(Message(Topic.GPU, b, key="all"))
        await bus.producer.flush()
        first = bus.subscribe([Topic.GPU], "archive")
        got = []
        while len(got) < 4:
            got += await first.get_batch(max_messages=4 - len(got), timeout_s=1.0)
        await first.commit()
        extra = []
        while not extra:  # read past the commit, then "crash": never committed
            extra = await first.get_batch(max_messages=2, timeout_s=1.0)
        await first.close()
        second = bus.subscribe([Topic.GPU], "archive")
        await bus.end([Topic.GPU])
        rest = await drain(second)
        await bus.close()
        return batches, got, extra, rest
    batches, got, extra, rest = asyncio.run(go())
    assert len(got) == 4 and len(rest) == 6  # redelivered from the commit: nothing lost
    assert rest[0].value.equals(batches[4]) and extra[0].value.equals(batches[4])


def test_a_partition_being_revoked_hands_out_nothing_more_and_the_next_owner_reads_the_rest(broker):
    """aiokafka runs a rebalance's revoke beside the role's loop. Once it has begun, get_batch
    hands out no message of the partitions it takes (those the aligner held included) and
    commits none of their offsets: the next owner reads them. Handed out, a detect process
    judged them on the state its hand-over had just dropped, and the rebalance's commit
    committed that output and took the messages from the next owner."""
    from pipeline.bus.kafka import _Rebalance
    prefix = f"t{uuid.uuid4().hex[:6]}."
    topics = [Topic.GPU, Topic.FACILITY]

    async def go():
        bus = KafkaBus(broker.bootstrap, partitions=1, prefix=prefix)
        await bus.start()
        sim = FleetSimulator(make_config(fleet={"racks": 1, "nodes_per_rack": 2}).fleet,
                             start=datetime(2026, 1, 1, tzinfo=timezone.utc))
        for _ in range(10):
            tick = sim.step()
            await bus.publish(Message(Topic.GPU, tick.gpu, key="r01"))
            await bus.publish(Message(Topic.FACILITY, tick.facility, key="r01"))
        await bus.producer.flush()
        first = bus.subscribe(topics, "detect", transactional=True, align=True)
        before, during = [], []

        async def hand_over(partitions: set[int]) -> None:  # the role's loop asks for more meanwhile
            during.extend(await asyncio.wait_for(first.get_batch(max_messages=1000, timeout_s=1.0), 30))
        first.before_revoke.append(hand_over)
        while not first.aligner.held:  # some handed out, some held for the other topic
            before += await first.get_batch(max_messages=1, timeout_s=1.0)
        await _Rebalance(first).on_partitions_revoked(first.consumer.assignment())
        await first.close()
        second = bus.subscribe(topics, "detect", transactional=True, align=True)
        await bus.end(topics)
        after = await drain(second)
        await bus.close()
        return before, during, after
    before, during, after = asyncio.run(go())
    assert during == []
    seen = [(m.topic, m.offset) for m in before + after]
    assert len(seen) == len(set(seen)) == 20  # each message handed out once: nothing lost, nothing twice


def test_a_revoke_while_the_archive_dead_letters_commits_only_rows_on_disk(broker, tmp_path):
    """The archive's loop screens a batch before the sink takes it, and the screen awaits the
    dead-letter write of its bad rows. A rebalance's revoke that runs meanwhile flushes the
    archive and commits the batch's offsets (handed out, they are the subscription's): it
    must wait until the batch is in the sink, or it commits rows that are on no disk, and a
    process that dies before its next flush loses them (the next owner starts past them)."""
    import polars as pl
    from aiokafka import TopicPartition

    from pipeline.bus.intake import Gate, KafkaDeadLetters
    from pipeline.bus.kafka import _Rebalance
    from pipeline.sinks.archive_sink import archive_role
    from pipeline.sinks.parquet import ArchiveWriter
    prefix = f"v{uuid.uuid4().hex[:6]}."
    batches = sim_batches(3)
    b, i = batches[1], batches[1].schema.get_field_index("gpu_uuid")
    uuids = b.column(i).to_pylist()
    batches[1] = b.set_column(i, b.schema.field(i), pa.array([""] + uuids[1:], b.column(i).type))  # one bad row
    good = sum(b.num_rows for b in batches) - 1

    async def go():
        bus = KafkaBus(broker.bootstrap, partitions=1, prefix=prefix)
        await bus.start()
        for b in batches:
            await bus.publish(Message(Topic.GPU, b, key="r01"))
        await bus.flush()
        sub = bus.subscribe([Topic.GPU], "archive")
        revokes: list[asyncio.Task] = []

        class RevokeMeanwhile(KafkaDeadLetters):
            async def write(self, group, rejected) -> None:
                if not revokes:  # a rebalance begins while the bad row is being written
                    revokes.append(asyncio.create_task(_Rebalance(sub).on_partitions_revoked(
                        sub.consumer.assignment())))
                    await asyncio.wait(revokes, timeout=3)  # it runs as far as it can meanwhile
                await super().write(group, rejected)
        writer = ArchiveWriter(tmp_path / "archive")
        role = asyncio.create_task(archive_role(writer, sub, flush_interval_s=3600,
                                                gate=Gate("archive", RevokeMeanwhile(sub))))
        for _ in range(1200):  # (a guard: a batch that never reaches the gate fails below, not hangs)
            if revokes and revokes[0].done():
                break
            await asyncio.sleep(0.05)
        assert revokes and revokes[0].done(), "no revoke ran while the archive dead-lettered"
        files = sorted((tmp_path / "archive").rglob("*.parquet"))  # what is on disk once it committed
        on_disk = pl.read_parquet(files).height if files else 0
        tp = TopicPartition(bus.wire(Topic.GPU), 0)
        committed = await sub.consumer.committed(tp)
        role.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await role
        await sub.close()
        await bus.close()
        revokes[0].result()
        return committed, on_disk
    committed, on_disk = asyncio.run(go())
    assert committed == 3  # the three messages, the one with the bad row included
    assert on_disk == good  # ... and every good row of them is on disk


async def two_handed_out(broker, prefix: str):
    """A bus of one partition holding two messages, and the archive's subscription that read both
    (uncommitted)."""
    bus = KafkaBus(broker.bootstrap, partitions=1, prefix=prefix)
    await bus.start()
    for b in sim_batches(2):
        await bus.publish(Message(Topic.GPU, b, key="r01"))
    await bus.flush()
    sub = bus.subscribe([Topic.GPU], "archive")
    got = []
    while len(got) < 2:
        got += await sub.get_batch(timeout_s=1.0)
    return bus, sub


def test_offsets_of_a_partition_no_longer_held_are_dropped_not_committed(broker):
    """A commit after the group moved a partition on (a revoke whose hand-over failed, a member
    that overran the rebalance timeout) commits the partitions still held and drops the rest:
    their next owner reads them again. aiokafka refuses the whole commit for one partition not
    assigned (IllegalStateError), which had ended the role."""
    from aiokafka import TopicPartition
    prefix = f"c{uuid.uuid4().hex[:6]}."

    async def go():
        bus, sub = await two_handed_out(broker, prefix)
        moved = TopicPartition(bus.wire(Topic.GPU), 7)  # (not this consumer's)
        sub._to_commit[moved] = 5
        await sub.commit()
        committed = await sub.consumer.committed(TopicPartition(bus.wire(Topic.GPU), 0))
        await sub.close()
        await bus.close()
        return committed, moved in sub._to_commit
    committed, kept = asyncio.run(go())
    assert committed == 2 and not kept


def test_a_member_frozen_past_its_session_commits_nothing_goes_on_and_its_messages_are_read_again(broker, caplog):
    """A process frozen past its group's session timeout (a GC pause, SIGSTOP, a host swapping):
    the group hands its partition to another member, and when it wakes its commit is refused
    (CommitFailedError). It commits nothing, logs why, and goes on: it rejoins and reads the
    messages again, as their next owner did. The refusal had ended the role."""
    import threading

    from aiokafka import TopicPartition
    from aiokafka.coordinator.assignors.range import RangePartitionAssignor
    prefix = f"f{uuid.uuid4().hex[:6]}."

    async def next_owner(bus: KafkaBus) -> int:
        """Another member of the group: joins once the frozen one is out, and reads the messages."""
        other = AIOKafkaConsumer(bus.wire(Topic.GPU), bootstrap_servers=broker.bootstrap,
                                 group_id=bus.wire_group("archive"), enable_auto_commit=False,
                                 auto_offset_reset="earliest", partition_assignment_strategy=(RangePartitionAssignor,))
        await other.start()
        try:
            read, deadline = 0, time.monotonic() + 120
            while read < 2 and time.monotonic() < deadline:
                read += sum(len(v) for v in (await other.getmany(timeout_ms=1000)).values())
            return read
        finally:
            await other.stop()

    async def go():
        bus, sub = await two_handed_out(broker, prefix)
        # Frozen: this event loop runs nothing (no heartbeat) while the next owner takes the partition.
        read: list = []

        def other_member() -> None:
            try:
                read.append(asyncio.run(next_owner(bus)))
            except Exception as e:  # (raised below, in the test)
                read.append(e)
        owner = threading.Thread(target=other_member, daemon=True)
        owner.start()
        owner.join(180)
        assert read and not isinstance(read[0], Exception), read
        await sub.commit()  # (awake: the group moved on)
        committed = await sub.consumer.committed(TopicPartition(bus.wire(Topic.GPU), 0))
        again, deadline = [], time.monotonic() + 120
        while len(again) < 2 and time.monotonic() < deadline:
            again += await sub.get_batch(timeout_s=1.0)
        await sub.close()
        await bus.close()
        return read[0], committed, len(again)
    with caplog.at_level("WARNING", logger="pipeline.bus.kafka"):
        read, committed, again = asyncio.run(go())
    assert read == 2          # the next owner read both messages ...
    assert committed is None  # ... the frozen member committed none of them ...
    assert "offsets not committed, the group moved the partitions on meanwhile" in caplog.text
    assert again == 2         # ... and it went on, reading them again once it rejoined


def test_a_group_that_does_not_answer_whether_partitions_are_still_held_leaves_them_held(broker, caplog,
                                                                                      monkeypatch):
    """The archive asks the group before each write (held_still). A group coordinator that does
    not answer (its broker stopped, a network partition) within ASK_GROUP_S leaves the partitions
    held, as if never asked, and says so: the archive writes on rather than stopping, and the
    revoke that follows any real loss of them still hands them over."""
    import pipeline.bus.kafka as kafka
    monkeypatch.setattr(kafka, "ASK_GROUP_S", 1.0)
    prefix = f"s{uuid.uuid4().hex[:6]}."

    async def go():
        bus, sub = await two_handed_out(broker, prefix)
        await sub.commit()  # (a commit the group holds: what held_still asks with)
        deadline = time.monotonic() + 60
        while not sub._committed and time.monotonic() < deadline:  # (a rejoin under load dropped it: again)
            await sub.get_batch(timeout_s=0.5)
            await sub.commit()
        assert sub._committed
        asked = (dict(sub._committed), sub.consumer.assignment(), sub._membership())  # (said if it fails)
        try:
            freeze(broker.proc.pid)  # the broker, and with it the group, silent (every thread)
            held = await sub.held_still({0})
        finally:
            os.killpg(broker.proc.pid, signal.SIGCONT)
        await sub.close()
        await bus.close()
        return held, asked
    with caplog.at_level("WARNING", logger="pipeline.bus.kafka"):
        held, asked = asyncio.run(go())
    assert held == {0}
    assert re.search(r"the group did not say whether partitions \[0\] are still this member's \(TimeoutError",
                     caplog.text), (caplog.text, asked)
    assert "given to another member" not in caplog.text


def test_an_archive_frozen_past_its_session_writes_no_row_its_next_owner_wrote(broker, tmp_path, caplog):
    """An archive process frozen past its session timeout while holding message 0 unwritten:
    another archive takes the partition over and writes 0-3, and 4-5 come after it stopped.
    Awake, the first asks the group before it writes, learns the partition was taken, writes
    none of what it held and reads on from the other's commit: every row once. It had flushed
    its buffer in its revoke before it learned, beside the other's files under another offset
    range: 256-320 rows on disk of 192, for good (compaction keeps both)."""
    import threading

    import polars as pl
    from aiokafka import TopicPartition

    from pipeline.sinks.archive_sink import archive_role
    from pipeline.sinks.parquet import ArchiveWriter
    prefix, root = f"z{uuid.uuid4().hex[:6]}.", tmp_path / "archive"
    batches = sim_batches(6)
    total = sum(b.num_rows for b in batches)

    def on_disk() -> pl.DataFrame:
        files = sorted(f for f in root.rglob("*.parquet") if ".staging" not in f.parts)  # (placed files only)
        return pl.read_parquet(files) if files else pl.DataFrame()

    async def publish(bus: KafkaBus, some: list) -> None:
        for b in some:
            await bus.publish(Message(Topic.GPU, b, key="r01"))
        await bus.flush()

    async def next_owner() -> None:
        """Another archive: joins once the frozen one is out, writes 0-2 and 3 (its own cuts, not the
        frozen one's) and leaves; then 4-5 come."""
        bus = KafkaBus(broker.bootstrap, partitions=1, prefix=prefix)
        await bus.start()
        sub = bus.subscribe([Topic.GPU], "archive")
        role = asyncio.create_task(archive_role(ArchiveWriter(root), sub, flush_interval_s=0.5))
        await publish(bus, batches[1:2])
        await asyncio.sleep(1.0)  # (what the frozen one's pending fetch may get: 1, not the 1-2 this one writes first)
        for some, upto in ((batches[2:3], 3), (batches[3:4], 4)):
            await publish(bus, some)
            deadline = time.monotonic() + 120
            while on_disk().height < sum(b.num_rows for b in batches[:upto]) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
        role.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await role
        await sub.close()
        await publish(bus, batches[4:])
        await bus.close()

    async def go():
        bus = KafkaBus(broker.bootstrap, partitions=1, prefix=prefix)
        await bus.start()
        await publish(bus, batches[:1])
        sub = bus.subscribe([Topic.GPU], "archive")
        writer = ArchiveWriter(root, max_buffer_rows=2 * batches[0].num_rows)  # (it writes two messages at a time)
        role = asyncio.create_task(archive_role(writer, sub, flush_interval_s=3600))
        deadline = time.monotonic() + 120
        while writer.held_rows() < batches[0].num_rows and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert writer.held_rows() == batches[0].num_rows
        failed: list = []

        def other() -> None:
            try:
                asyncio.run(next_owner())
            except Exception as e:  # (raised below, in the test)
                failed.append(e)
        owner = threading.Thread(target=other, daemon=True)  # this loop runs nothing meanwhile: frozen
        owner.start()
        owner.join(240)
        assert not owner.is_alive() and not failed, failed
        tp = TopicPartition(bus.wire(Topic.GPU), 0)

        async def committed() -> int | None:
            return await sub.consumer.committed(tp)
        deadline = time.monotonic() + 120  # awake: until what it holds is written and committed
        while ((writer.held_rows() or on_disk().height < total or await committed() != len(batches))
               and time.monotonic() < deadline):
            await asyncio.sleep(0.2)
        role.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await role
        last = await committed()
        await sub.close()
        await bus.close()
        return last
    with caplog.at_level("WARNING", logger="pipeline.bus.kafka"):
        committed = asyncio.run(go())
    assert committed == len(batches)  # (the group's commit never went back to the frozen one's)
    archive = on_disk()
    assert archive.height == total  # every row once
    assert archive.select(pl.struct("gpu_uuid", "ts").n_unique()).item() == total
    assert "were given to another member while this one held them" in caplog.text


def test_the_daemon_runs_every_role_over_kafka(broker, tmp_path, receiver):
    """`fleetwatch run --kafka`: the same roles and code, Kafka between them. Every sample
    produced lands in the archive exactly once; alerts reach alerts.jsonl and the webhook."""
    import json

    import polars as pl

    from tests.conftest import fleetwatch
    from tests.helpers import FAST, archived, reported_samples
    r = fleetwatch("run", "--kafka", broker.bootstrap, "--duration", "12", "--data-dir", "data", "--seed", "5",
                   cwd=tmp_path, timeout=180,
                   env=FAST | {"FLEETWATCH_KAFKA__TOPIC_PREFIX": f"d{uuid.uuid4().hex[:6]}.",
                               "FLEETWATCH_KAFKA__PARTITIONS": "3", "FLEETWATCH_ALERTS__WEBHOOKS": receiver.url,
                               "FLEETWATCH_ALERTS__GROUP_WAIT_S": "0", "FLEETWATCH_ALERTS__GROUP_INTERVAL_S": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bus Kafka at" in r.stderr
    data = tmp_path / "data"
    gpu = archived(data, "gpu_samples")
    assert gpu.height == reported_samples(r.stderr) > 0
    assert gpu.select(pl.struct("gpu_uuid", "ts").n_unique()).item() == gpu.height  # exactly once
    alerts = archived(data, "alerts")
    lines = [json.loads(x) for x in (data / "alerts.jsonl").read_text().splitlines()]
    assert len(lines) == alerts.height >= 1
    # Every firing alert reached the webhook but the inhibited ones (logged as muted).
    delivered = {(a["fingerprint"], a["status"]) for p in receiver.payloads for a in p["alerts"]}
    muted = set(re.findall(r"alert \w+ ([0-9a-f]{16}) muted", r.stderr))
    assert delivered <= {(a["fingerprint"], a["status"]) for a in lines}
    assert {fp for fp, status in delivered if status == "firing"} == \
        {a["fingerprint"] for a in lines if a["status"] == "firing"} - muted
    fired = int(re.search(r"(\d+) alerts raised", r.stderr).group(1))
    labels = archived(data, "fault_labels")
    assert fired <= 3 * labels.height  # no storm: a few alerts per injected fault


@pytest.mark.parametrize("store", ["disk", "s3"])
def test_sigkill_and_restart_archives_every_produced_sample_exactly_once(broker, tmp_path, store):
    """Kill the daemon with SIGKILL mid-stream, start it again: every GPU sample that
    reached Kafka is in the archive exactly once. On disk the files are named by partition
    and offsets; on S3 (a real s3proxy, sinks/delta.py) each Delta commit records them;
    either way offsets already archived are skipped on redelivery."""

    import polars as pl

    from pipeline.sinks.delta import DeltaLocation
    from tests.conftest import fleetwatch
    from tests.helpers import FAST, archived
    from tests.services import S3Proxy
    prefix = f"k{uuid.uuid4().hex[:6]}."
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")} | FAST | {
        "FLEETWATCH_KAFKA__TOPIC_PREFIX": prefix, "FLEETWATCH_KAFKA__PARTITIONS": "3"}
    data = tmp_path / "data"
    s3 = S3Proxy().start() if store == "s3" else None
    if s3 is not None:
        s3.create_bucket("fleet")
        env |= {"FLEETWATCH_ARCHIVE__URL": "s3://fleet/archive", "FLEETWATCH_ARCHIVE__S3_ENDPOINT_URL": s3.endpoint,
                "FLEETWATCH_ARCHIVE__S3_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": s3.access_key,
                "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_REGION": "us-east-1"}
        where = DeltaLocation("s3://fleet/archive", s3.storage_options)

    def in_archive() -> pl.DataFrame:
        if s3 is None:
            return archived(data, "gpu_samples")
        table = where.table("gpu_samples")
        return pl.from_arrow(table.to_pyarrow_table()) if table is not None else pl.DataFrame()

    def commits() -> int:  # what the first run archived: files on disk, commits on S3
        if s3 is None:
            return len(list((data / "archive" / "gpu_samples").rglob("*.parquet")))
        table = where.table("gpu_samples")
        return table.version() + 1 if table is not None else 0

    try:
        first = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--kafka", broker.bootstrap,
                                  "--data-dir", str(data)], cwd=tmp_path, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 90
            while commits() < 3:
                assert time.monotonic() < deadline and first.poll() is None
                time.sleep(0.2)
            time.sleep(0.7)  # mid-flush, mid-commit: wherever it is
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        before = in_archive().height
        r = fleetwatch("run", "--kafka", broker.bootstrap, "--duration", "5", "--data-dir", "data", cwd=tmp_path,
                       env={k: v for k, v in env.items() if k.startswith(("FLEETWATCH_", "AWS_"))}, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        print(*[line for line in r.stderr.splitlines() if "redelivered messages" in line])  # the summary
        assert s3 is None or s3.secret_key not in r.stderr + r.stdout

        async def produced() -> pl.DataFrame:
            bus = KafkaBus(broker.bootstrap, partitions=3, prefix=prefix)
            await bus.start()
            sub = bus.subscribe([Topic.GPU], f"audit-{uuid.uuid4().hex[:6]}")
            await bus.end([Topic.GPU])
            got = await drain(sub)
            await bus.close()
            return pl.from_arrow(pa.Table.from_batches([m.value for m in got]))
        in_kafka = asyncio.run(produced()).select("gpu_uuid", pl.col("ts").dt.cast_time_unit("us"))  # as archived
        archived_rows = in_archive().select("gpu_uuid", "ts")
    finally:
        if s3 is not None:
            s3.close()
    print(f"sigkill ({store}): {before} rows archived before the kill; in Kafka {in_kafka.height}, "
          f"archived {archived_rows.height}, unique {archived_rows.unique().height}")
    assert before > 0 and archived_rows.height > before
    assert archived_rows.height == archived_rows.unique().height, "duplicates in the archive"
    assert archived_rows.height == in_kafka.height
    assert in_kafka.join(archived_rows, on=["gpu_uuid", "ts"], how="anti").height == 0  # nothing lost


@pytest.mark.parametrize("store", ["disk", "s3"])
def test_archive_that_wrote_but_never_committed_skips_the_redelivery(broker, tmp_path, store):
    """The window SIGKILL can hit: files renamed into place (on S3: the Delta commit made),
    offsets not committed. The restarted archive gets every message again and writes none
    of them twice: on disk the file names hold the offsets, on S3 each commit does."""
    import polars as pl

    from pipeline.sinks.archive_sink import archive_role
    from pipeline.sinks.delta import DeltaArchiveWriter, DeltaLocation
    from pipeline.sinks.parquet import ArchiveWriter
    from tests.services import S3Proxy
    prefix = f"w{uuid.uuid4().hex[:6]}."
    s3 = S3Proxy().start() if store == "s3" else None
    if s3 is not None:
        s3.create_bucket("fleet")
        where = DeltaLocation("s3://fleet/archive", s3.storage_options)

    async def run_archive(commit: bool):
        bus = KafkaBus(broker.bootstrap, partitions=2, prefix=prefix)
        await bus.start()
        sub = bus.subscribe([Topic.GPU], "archive")
        if not commit:
            async def crash_before_commit() -> None:
                pass
            sub.commit = crash_before_commit
        await bus.end([Topic.GPU])
        writer = DeltaArchiveWriter(where) if s3 is not None else ArchiveWriter(tmp_path / "archive")
        await archive_role(writer, sub, flush_interval_s=0.5)
        await bus.close()
        return writer

    async def go():
        bus = KafkaBus(broker.bootstrap, partitions=2, prefix=prefix)
        await bus.start()
        for b in sim_batches(10):
            for m in per_node(b):
                await bus.publish(m)
        await bus.flush()
        await bus.close()
        first = await run_archive(commit=False)
        second = await run_archive(commit=True)
        return first, second
    try:
        first, second = asyncio.run(go())
        rows = (pl.scan_delta(where.table_uri("gpu_samples"), storage_options=s3.storage_options) if s3 is not None
                else pl.scan_parquet(tmp_path / "archive" / "gpu_samples", hive_partitioning=True)).collect()
    finally:
        if s3 is not None:
            s3.close()
    assert first.rows_written["gpu_samples"] == 10 * 32
    assert second.redelivered_skipped == 40 and second.rows_written["gpu_samples"] == 0
    assert rows.height == 320 and rows.select(pl.struct("gpu_uuid", "ts").n_unique()).item() == 320


def role_env(kind: str, **extra: str) -> dict[str, str]:
    """The test's environment for role processes: fast fleet, a topic prefix of their own."""
    from tests.helpers import FAST
    return {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")} | FAST | {
        "FLEETWATCH_KAFKA__TOPIC_PREFIX": f"{kind}{uuid.uuid4().hex[:6]}.", **extra}


def start_role(role: str, broker, cwd, env: dict[str, str]) -> subprocess.Popen:
    """A role process; its log goes to a file (`proc.log_path`) that a test can read while it runs."""
    log_path = cwd / f"{role}-{uuid.uuid4().hex[:6]}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", role, "--kafka", broker.bootstrap,
                                 "--data-dir", "data"], cwd=cwd, env=env, text=True,
                                stdout=subprocess.DEVNULL, stderr=log)
    proc.log_path = log_path
    return proc


SUMMARY = (r"stopped after [\d.]+ s: (\d+) GPU samples published, (\d+) GPU samples, (\d+) alerts raised, "
           r"(\d+) rows archived")


def test_one_process_per_role(broker, tmp_path):
    """simulate, detect, remediate, archive and notify as five processes with Kafka between them.
    Stopped in data order with SIGTERM, each exits 0, and every sample the simulator
    published is archived exactly once; every alert detect raised reaches alerts.jsonl; every
    remediation step the remediate process planned (dry-run) is archived."""
    import json

    import polars as pl

    from tests.helpers import archived
    env = role_env("r", FLEETWATCH_KAFKA__PARTITIONS="3")
    procs = {role: start_role(role, broker, tmp_path, env)
             for role in ("detect", "remediate", "archive", "notify", "simulate")}
    time.sleep(12)
    logs = stop_in_order(procs, [["simulate"], ["detect"], ["remediate"], ["archive", "notify"]])
    published = int(re.search(SUMMARY, logs["simulate"]).group(1))
    _, detected, raised, _ = map(int, re.search(SUMMARY, logs["detect"]).groups())
    gpu = archived(tmp_path / "data", "gpu_samples")
    print(f"per-role: published {published}, detected {detected}, archived {gpu.height}, alerts {raised}")
    assert published > 0 and detected == published
    assert gpu.height == published and gpu.select(pl.struct("gpu_uuid", "ts").n_unique()).item() == published
    lines = [json.loads(x) for x in (tmp_path / "data" / "alerts.jsonl").read_text().splitlines()]
    # detect's alerts, and its FleetwatchWatchdog (firing while it ran, resolved at its stop: pipeline/ops)
    detected_alerts = [a for a in lines if a["status"] == "firing"
                       and a["labels"]["alertname"] not in ("FleetwatchWatchdog", "RemediationBreakerOpen")]
    assert len(detected_alerts) == raised >= 1
    assert [a["status"] for a in lines if a["labels"]["alertname"] == "FleetwatchWatchdog"] == ["firing", "resolved"]
    assert archived(tmp_path / "data", "alerts").height == len(lines)
    planned = len(re.findall(r"remediation: \S+ \S+ -> \S+ \(dry-run\)", logs["remediate"]))
    assert "remediation: dry-run (plans only)" in logs["remediate"]
    if planned:  # an allowed alert fired within the run: its steps are archived, none applied
        events = archived(tmp_path / "data", "remediation_events")
        assert events.height == planned and events["dry_run"].all() and not events["applied"].any()


def test_a_second_archive_joining_rebalances_without_loss_or_duplicates(broker, tmp_path):
    """Archive A runs alone, archive B joins the group mid-stream: partitions move, A
    flushes and commits before giving them up, and each sample lands exactly once."""
    import polars as pl

    from tests.helpers import archived
    env = role_env("b", FLEETWATCH_KAFKA__PARTITIONS="4", FLEETWATCH_ARCHIVE__FLUSH_INTERVAL_S="2",
                   FLEETWATCH_FLEET__RACKS="4")  # racks r01-r04 on partitions 1-3: both archives get some
    procs = {"simulate": start_role("simulate", broker, tmp_path, env),
             "archive-a": start_role("archive", broker, tmp_path, env)}
    time.sleep(8)
    procs["archive-b"] = start_role("archive", broker, tmp_path, env)
    time.sleep(10)
    logs = stop_in_order(procs, [["simulate"], ["archive-a", "archive-b"]])
    published = int(re.search(SUMMARY, logs["simulate"]).group(1))
    rows_a = int(re.search(SUMMARY, logs["archive-a"]).group(4))
    rows_b = int(re.search(SUMMARY, logs["archive-b"]).group(4))
    assert rows_a > 0 and rows_b > 0, (rows_a, rows_b)  # both took part: the group rebalanced
    gpu = archived(tmp_path / "data", "gpu_samples")
    print(f"rebalance: published {published}, archive A wrote {rows_a} rows, B {rows_b}, archive holds {gpu.height}")
    assert gpu.height == published
    assert gpu.select(pl.struct("gpu_uuid", "ts").n_unique()).item() == published


ASSIGNED = re.compile(r"detect \(rack tier\): assigned partitions \[([\d, ]*)\]; restored the detector state of \[([\d, ]*)\] "
                      r"\((\d+) GPUs, (\d+) nodes, (\d+) racks, (\d+) alerts firing\)")


def numbers(text: str) -> set[int]:
    return {int(p) for p in text.split(", ") if p}


def owned(log: str) -> set[int]:
    """The partitions a detect process holds now, from its log."""
    found = ASSIGNED.findall(log)
    return numbers(found[-1][0]) if found else set()


def test_detect_scales_out_and_a_killed_detector_s_partitions_continue_from_its_checkpoint(broker, tmp_path):
    """Three detect processes share the partitions. One is killed with SIGKILL while an
    alert it raised is firing on a node it owns; the survivors take its partitions over
    with the checkpointed detector state (not cold), so every alert is raised exactly
    once: no second firing for a problem already alerted, none lost."""
    import json

    import polars as pl

    from pipeline.bus.keys import partition_for
    from tests.helpers import archived
    env = role_env("x", FLEETWATCH_KAFKA__PARTITIONS="6")
    procs = {name: start_role(role, broker, tmp_path, env) for name, role in (
        ("archive", "archive"), ("notify", "notify"), ("detect-a", "detect"), ("detect-b", "detect"),
        ("detect-c", "detect"), ("simulate", "simulate"))}
    detects = ["detect-a", "detect-b", "detect-c"]
    alerts_log = tmp_path / "data" / "alerts.jsonl"
    name, survivors = None, detects

    def victim() -> tuple[str, dict] | None:
        """A detect process owning the node of an alert that is firing (and old enough
        to be in its checkpoint)."""
        if not alerts_log.exists():
            return None
        open_alerts: dict[str, dict] = {}
        for a in map(json.loads, alerts_log.read_text().splitlines()):
            if a["status"] == "firing":
                open_alerts[a["fingerprint"]] = a
            else:
                open_alerts.pop(a["fingerprint"], None)
        owners = {name: owned(procs[name].log_path.read_text()) for name in detects}
        if sum(len(o) for o in owners.values()) != 6 or not all(owners.values()):
            return None  # the group has not settled on three members yet
        for a in open_alerts.values():
            if "node" in a["labels"]:  # (its data are keyed by its rack)
                p = partition_for(a["labels"]["rack"], 6)
                return next(name for name, parts in owners.items() if p in parts), a
        return None

    try:
        deadline = time.monotonic() + 120
        while (chosen := victim()) is None:
            assert time.monotonic() < deadline, "no alert firing on a settled group"
            assert all(p.poll() is None for p in procs.values())
            time.sleep(0.5)
        name, alert = chosen
        time.sleep(2)  # the alert is in a committed checkpoint (commit interval 1 s)
        procs[name].send_signal(signal.SIGKILL)
        procs[name].wait()
        lost = owned(procs[name].log_path.read_text())
        survivors = [d for d in detects if d != name]
        deadline = time.monotonic() + 90  # session timeout, then the rebalance
        while not lost <= set().union(*(owned(procs[d].log_path.read_text()) for d in survivors)):
            assert time.monotonic() < deadline, "the killed detector's partitions were not taken over"
            time.sleep(0.5)
        time.sleep(15)  # the survivors keep detecting on the taken-over nodes
    finally:
        logs = stop_in_order({k: v for k, v in procs.items() if k != name},
                             [["simulate"], survivors, ["archive", "notify"]])
    restores = [m for d in survivors for m in ASSIGNED.findall(logs[d]) if numbers(m[1]) & lost]
    restored_alerts = max(int(m[5]) for m in restores)
    print(f"scale-out: killed {name} holding partitions {sorted(lost)} with {alert['labels']['alertname']} "
          f"firing on {alert['labels']['node']}; survivors restored them with up to {restored_alerts} alerts firing")
    assert restores and restored_alerts >= 1
    rows = archived(tmp_path / "data", "alerts").sort("starts_at", "status")
    firing = rows.filter(pl.col("status") == "firing")
    assert firing.height == firing.select("fingerprint", "starts_at").n_unique()  # no firing change twice
    # A fingerprint fires again only after it resolved: a cold survivor would re-raise it.
    for fp, group in firing.group_by("fingerprint"):
        starts = group["starts_at"].sort().to_list()
        ends = rows.filter((pl.col("fingerprint") == fp[0]) & (pl.col("status") == "resolved"))["ends_at"]
        for earlier, later in zip(starts, starts[1:]):
            assert any(earlier < e <= later for e in ends), f"{fp[0]} fired at {later} while firing since {earlier}"
    same = firing.filter(pl.col("fingerprint") == alert["fingerprint"])
    assert same.height == 1, same  # the victim's alert: raised once, across the takeover
    gpu = archived(tmp_path / "data", "gpu_samples")
    published = int(re.search(SUMMARY, logs["simulate"]).group(1))
    assert gpu.height == published == gpu.select(pl.struct("gpu_uuid", "ts").n_unique()).item()


def test_a_broker_outage_of_30_s_loses_nothing(tmp_path):
    """The broker stops for 30 s while simulate, detect and archive keep running. The
    simulator keeps publishing into its bounded outbox; when the broker is back it all
    goes out in order, and every published sample is archived exactly once."""
    import polars as pl

    from tests.helpers import archived, wait_for
    broker = KafkaBroker().start()  # a broker of its own: this test stops it
    try:
        env = role_env("o", FLEETWATCH_KAFKA__PARTITIONS="3", FLEETWATCH_FLEET__SPEED="5")
        procs = {role: start_role(role, broker, tmp_path, env) for role in ("detect", "archive", "simulate")}
        time.sleep(10)
        broker.stop()
        down = time.monotonic()
        time.sleep(30)
        assert all(p.poll() is None for p in procs.values()), "a role died while the broker was down"
        broker.start()
        print(f"broker down for {time.monotonic() - down:.0f} s")
        wait_for(lambda: "takes messages again" in procs["simulate"].log_path.read_text(), timeout=120)
        time.sleep(10)  # (the backlog read by detect and archive before they stop: a stopped consumer reads no more)
        logs = stop_in_order(procs, [["simulate"], ["detect"], ["archive"]])
    finally:
        broker.close()
    published = int(re.search(SUMMARY, logs["simulate"]).group(1))
    peak = float(re.search(r"producer outbox peak ([\d.]+) MB", logs["simulate"]).group(1))
    gpu = archived(tmp_path / "data", "gpu_samples")
    print(f"outage: published {published}, archived {gpu.height}, unique "
          f"{gpu.select(pl.struct('gpu_uuid', 'ts').n_unique()).item()}, producer outbox peak {peak} MB")
    assert "buffering them in order" in logs["simulate"]  # it noticed, and kept going
    assert peak > 0.1  # the outage was buffered, not blocked at the first message
    assert gpu.height == published == gpu.select(pl.struct("gpu_uuid", "ts").n_unique()).item()


def test_the_watchdog_of_a_detect_process_killed_outright_ends_at_notify(broker, tmp_path):
    """The dead-man's switch: detect's FleetwatchWatchdog beats every second while it
    fires; killed with SIGKILL, detect cannot resolve it, and notify resolves it once three
    heartbeats are missed, instead of re-sending it for ever. The beats before that leave
    no line in alerts.jsonl."""
    import json

    from tests.helpers import wait_for
    env = role_env("w", FLEETWATCH_KAFKA__PARTITIONS="3", FLEETWATCH_DAEMON__WATCHDOG_HEARTBEAT_S="1")
    procs = {role: start_role(role, broker, tmp_path, env) for role in ("detect", "notify", "simulate")}
    log = tmp_path / "data" / "alerts.jsonl"

    def watchdog() -> list[str]:
        lines = log.read_text().splitlines() if log.exists() else []
        return [a["status"] for a in map(json.loads, lines) if a["labels"]["alertname"] == "FleetwatchWatchdog"]
    try:
        wait_for(lambda: watchdog() == ["firing"] or procs["detect"].poll() is not None, timeout=180)
        assert watchdog() == ["firing"], procs["detect"].log_path.read_text()[-2000:]
        time.sleep(5)  # a few heartbeats (one a second): they are no state changes
        assert watchdog() == ["firing"] and procs["detect"].poll() is None
        procs["detect"].kill()
        procs["detect"].wait()
        wait_for(lambda: watchdog() == ["firing", "resolved"], timeout=60)
        assert "no heartbeat for" in procs["notify"].log_path.read_text()
    finally:
        procs["detect"].kill()
        stop_in_order({k: v for k, v in procs.items() if k != "detect"}, [["simulate"], ["notify"]])
