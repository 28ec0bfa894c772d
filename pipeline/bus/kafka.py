"""Kafka bus: the same three verbs as the in-process bus, over Apache Kafka (aiokafka).

- publish: an idempotent producer (acks=all) sends each batch as one Arrow IPC
  message (bus/codec.py) with schema headers; the message key places it (node for
  GPU data, rack for facility data). Messages wait in a bounded outbox: while the
  broker is unreachable the source keeps publishing into it, the producer retries,
  and it all goes out in order when the broker is back; a full outbox blocks
  the publisher (backpressure) instead of growing or dropping.
- subscribe: a consumer in a consumer group with auto-commit off. `get_batch`
  decodes; a message that does not decode goes to the dead-letter topic with
  headers saying why and where it came from, is counted, and never stops the
  consumer or loses the messages around it.
- commit: commits the offsets of everything `get_batch` returned, to be called
  only once the role's output is durable (at-least-once). A transactional
  subscription (detect) publishes its output in a Kafka transaction together with
  its input offsets and its state checkpoint: exactly once, even across a crash.
- partitions are assigned with the range assignor, so a consumer gets the same
  partition numbers of every topic it reads: a node's telemetry and events (both
  keyed by node) always meet in one process, with that partition's checkpoint.
- end: flushes the producer and snapshots the topics' end offsets; subscriptions
  drain up to them and then raise EndOfStream, as the in-process bus does.
"""

from __future__ import annotations

import asyncio
import contextlib
import collections
import logging
import os
import socket
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, TopicAlreadyExistsError

from pipeline.bus.base import EndOfStream, Message, Topic
from pipeline.bus.codec import DecodeError, Decoder, encode
from pipeline.config import ConfigError

log = logging.getLogger(__name__)

DEAD_LETTER = "fleetwatch.deadletter"
_HOUR_MS = 3_600_000
_FETCH = dict(max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)


@dataclass(frozen=True)
class TopicSpec:
    partitions: int
    retention_hours: float
    compact: bool = False


def topic_specs(partitions: int, retention_hours: float) -> dict[str, TopicSpec]:
    """Every topic Fleetwatch uses, with its layout. Node health is compacted (the
    latest state per node); alerts, labels and dead letters are kept longer."""
    return {
        Topic.GPU: TopicSpec(partitions, retention_hours),
        Topic.FACILITY: TopicSpec(partitions, retention_hours),
        Topic.EVENTS: TopicSpec(partitions, max(retention_hours, 24 * 7)),
        Topic.ALERTS: TopicSpec(max(1, partitions // 2), max(retention_hours, 24 * 30)),
        Topic.HEALTH: TopicSpec(partitions, retention_hours, compact=True),
        Topic.LABELS: TopicSpec(1, max(retention_hours, 24 * 30)),
        Topic.STATE: TopicSpec(partitions, retention_hours, compact=True),
        DEAD_LETTER: TopicSpec(1, max(retention_hours, 24 * 7)),
    }


class _Repeats(logging.Filter):
    """aiokafka logs every failed reconnect (thousands a second while a broker is
    away): each distinct message passes at most once a minute, with how many were held back."""

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        last, held = self._last.get(key, (-self.every_s, 0))
        if now - last < self.every_s:
            self._last[key] = (last, held + 1)
            return False
        self._last[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like this in the last minute)"
        return True


_REPEATS = _Repeats()
for _name in ("aiokafka", "aiokafka.client", "aiokafka.conn", "aiokafka.consumer.fetcher",
              "aiokafka.consumer.group_coordinator", "aiokafka.producer.sender"):
    logging.getLogger(_name).addFilter(_REPEATS)


def _back_off_metadata(client, backoff_s: float = 0.5) -> None:
    """aiokafka's producer asks for metadata again as soon as a request fails, which
    spins a core while the broker is unreachable; pause after each failed attempt."""
    update = client._metadata_update

    async def with_backoff(*args, **kwargs):
        ok = await update(*args, **kwargs)
        if not ok:
            await asyncio.sleep(backoff_s)
        return ok
    client._metadata_update = with_backoff


def bus_topic(wire_name: str, prefix: str) -> Topic:
    return Topic(wire_name[len(prefix):])


class _Rebalance(ConsumerRebalanceListener):
    """Before partitions move to another consumer, the role makes its output durable
    and commits, so the new owner starts exactly where this one stopped."""

    def __init__(self, sub: "KafkaSubscription") -> None:
        self.sub = sub

    async def on_partitions_revoked(self, revoked) -> None:
        if revoked:
            for hook in self.sub.before_revoke:
                await hook({tp.partition for tp in revoked})
            await self.sub.commit()

    async def on_partitions_assigned(self, assigned) -> None:
        self.sub.assignments += 1
        if assigned:
            for hook in self.sub.on_assigned:
                await hook({tp.partition for tp in assigned})


class KafkaSubscription:
    def __init__(self, bus: "KafkaBus", topics: list[Topic], group: str, transactional: bool = False) -> None:
        self.bus = bus
        self.topics = list(topics)
        self.group = group
        self.on_assigned: list = []    # async callables(partitions): e.g. restore state
        self.before_revoke: list = []  # async callables(partitions): make output durable (then we commit)
        self.assignments = 0           # how many times partitions were (re)assigned
        self.holds_input = True        # what is not committed waits on Kafka: reading can pause
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bus.bootstrap, group_id=bus.wire(group),
            client_id=f"{bus.client_id}-{group}", enable_auto_commit=False, auto_offset_reset="earliest",
            isolation_level="read_committed", partition_assignment_strategy=(RangePartitionAssignor,), **_FETCH)
        # A transactional id per process: a restarted process is a new producer, and
        # the transaction a crashed one left open is aborted by the broker after
        # transaction_timeout_ms (readers of its output partitions wait until then).
        self.producer = AIOKafkaProducer(
            bootstrap_servers=bus.bootstrap, client_id=f"{bus.client_id}-{group}-tx",
            transactional_id=f"{bus.wire(group)}-{socket.gethostname()}-{os.getpid()}-{id(self):x}",
            transaction_timeout_ms=10_000, **bus.producer_settings) if transactional else None
        for client in (self.consumer._client, self.producer.client if self.producer else None):
            if client is not None:
                _back_off_metadata(client)
        self._in_transaction = False
        self._started = False
        self._to_commit: dict[TopicPartition, int] = {}
        self.dead_letters = 0

    async def _start(self) -> None:
        if not self._started:
            if self.producer is not None:
                await self.producer.start()
            self.consumer.subscribe([self.bus.wire(t) for t in self.topics], listener=_Rebalance(self))
            await self.consumer.start()
            self._started = True

    async def publish(self, message: Message, partition: int | None = None) -> None:
        if self.producer is None:
            await self.bus.publish(message, partition)
            return
        if not self._in_transaction:
            await self.producer.begin_transaction()
            self._in_transaction = True
        topic, value, key, headers = self.bus.record(message)
        await self.producer.send(topic, value, key=key, headers=headers, partition=partition)

    async def get_batch(self, max_messages: int = 256, timeout_s: float | None = None) -> list[Message]:
        await self._start()
        records = await self.consumer.getmany(timeout_ms=int(1000 * (timeout_s if timeout_s is not None else 1.0)),
                                              max_records=max_messages)
        out: list[Message] = []
        for tp, batch in records.items():
            for rec in batch:
                self._to_commit[tp] = rec.offset + 1
                try:
                    value = self.bus.decoder.decode(rec.value, rec.headers)
                except DecodeError as e:
                    await self._dead_letter(rec, e.reason)
                    continue
                out.append(Message(bus_topic(rec.topic, self.bus.prefix), value, rec.key.decode() if rec.key else None,
                                   {k: v.decode(errors="replace") for k, v in rec.headers}, rec.partition, rec.offset))
        if not records and await self._drained():
            raise EndOfStream
        return out

    def partition_count(self, topic: Topic) -> int:
        return len(self.consumer.partitions_for_topic(self.bus.wire(topic)) or ())

    async def _drained(self) -> bool:
        """After end(): every partition assigned to us has been read up to its end
        offset. Other consumers of the group drain theirs; a partition that moves to
        us later was drained and committed by its previous owner before it left."""
        names = {self.bus.wire(t) for t in self.topics}
        ends = {tp: off for tp, off in self.bus.end_offsets.items() if tp.topic in names}
        if {tp.topic for tp in ends} != names or self.assignments == 0:
            return False  # end() not called for all our topics, or not yet in the group
        for tp in self.consumer.assignment():
            if await self.consumer.position(tp) < ends.get(tp, 0):
                return False
        return True

    async def _dead_letter(self, rec, reason: str) -> None:
        if self.dead_letters == 0:
            log.warning("%s: message %s[%d]@%d does not decode (%s): dead-lettered to %s; counted, logged once",
                        self.group, rec.topic, rec.partition, rec.offset, reason, self.bus.wire(DEAD_LETTER))
        self.dead_letters += 1
        self.bus.dead_letters += 1
        headers = [(k, v) for k, v in (rec.headers or ())] + [
            ("fw-error", reason.encode()), ("fw-source-topic", rec.topic.encode()),
            ("fw-source-partition", str(rec.partition).encode()), ("fw-source-offset", str(rec.offset).encode()),
            ("fw-consumer-group", self.group.encode())]
        await self.bus.producer.send_and_wait(self.bus.wire(DEAD_LETTER), rec.value, key=rec.key, headers=headers)

    async def dead_letter_rows(self, message: Message, rows, reason: str, detail: str) -> None:
        """Rows of a decoded message that failed the content checks (bus/intake.py): one
        message on the dead-letter topic, the rows as Arrow with their schema headers, plus
        fw-error, fw-reason and where they came from. Acknowledged before it returns."""
        value, headers = encode(rows)
        headers += [("fw-error", f"{reason}: {detail}".encode()), ("fw-reason", reason.encode()),
                    ("fw-source-topic", self.bus.wire(message.topic).encode()),
                    ("fw-source-partition", str(message.partition).encode()),
                    ("fw-source-offset", str(message.offset).encode()), ("fw-consumer-group", self.group.encode())]
        await self.bus.producer.send_and_wait(self.bus.wire(DEAD_LETTER), value,
                                              key=message.key.encode() if message.key else None, headers=headers)

    def pause(self) -> None:
        """Stop fetching every partition assigned now (the caller calls again after a rebalance)."""
        self.consumer.pause(*self.consumer.assignment())

    def resume(self) -> None:
        self.consumer.resume(*self.consumer.assignment())

    def forget(self, partitions: set[int]) -> None:
        """Commit nothing more of these partitions: their next owner reads them again."""
        for tp in [tp for tp in self._to_commit if tp.partition in partitions]:
            del self._to_commit[tp]

    async def commit(self) -> None:
        if self.producer is None:
            if self._to_commit:
                await self.consumer.commit(dict(self._to_commit))
                self._to_commit.clear()
            return
        if not self._to_commit and not self._in_transaction:
            return
        if not self._in_transaction:
            await self.producer.begin_transaction()
        if self._to_commit:
            await self.producer.send_offsets_to_transaction(dict(self._to_commit), self.bus.wire(self.group))
        await self.producer.commit_transaction()
        self._in_transaction = False
        self._to_commit.clear()

    async def close(self) -> None:
        if self._started:
            await self.consumer.stop()
            if self.producer is not None:
                await self.producer.stop()  # an open transaction is aborted: uncommitted input is read again
            self._started = False


class KafkaBus:
    keyed = True  # order holds per partition: producers key messages by node or rack

    def __init__(self, bootstrap: str, partitions: int = 6, retention_hours: float = 24.0,
                 client_id: str = "fleetwatch", prefix: str = "", buffer_mb: float = 256.0,
                 connect_timeout_s: float = 30.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.client_id = client_id
        self.specs = topic_specs(partitions, retention_hours)
        self.producer_settings = dict(acks="all", enable_idempotence=True, compression_type="zstd", linger_ms=5,
                                      max_batch_size=1024 * 1024, max_request_size=8 * 1024 * 1024)
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, client_id=client_id, **self.producer_settings)
        _back_off_metadata(self.producer.client)
        self.subscriptions: list[KafkaSubscription] = []
        self.end_offsets: dict[TopicPartition, int] = {}
        # publish() -> outbox -> _pump() -> producer (which holds one batch per partition).
        self._outbox: collections.deque[tuple] = collections.deque()
        self._outbox_bytes = 0
        self.outbox_limit = int(buffer_mb * 1024 * 1024)
        self.outbox_peak_bytes = 0
        self._queued = asyncio.Event()    # the outbox has messages
        self._room = asyncio.Event()      # the outbox is below its limit
        self._room.set()
        self._pump_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self._sending_since: float | None = None  # the pump waits for the producer to take a message
        self._in_flight: list[asyncio.Future] = []
        self.decoder = Decoder()
        self.dead_letters = 0
        self.delivery_failures = 0

    async def start(self) -> None:
        """Reach the brokers (retrying: they may be starting too), create missing topics."""
        deadline = time.monotonic() + self.connect_timeout_s
        retried = False
        while True:
            try:
                await self.ensure_topics()
                break
            except KafkaConnectionError as e:
                if time.monotonic() >= deadline:
                    raise ConfigError(f"cannot reach Kafka at {self.bootstrap} (tried for {self.connect_timeout_s:g} s: "
                                      f"{e}): is the broker running, and are --kafka / kafka.bootstrap right?") from None
                if not retried:
                    log.warning("Kafka at %s is not reachable yet (%s); retrying for up to %g s", self.bootstrap,
                                e, self.connect_timeout_s)
                retried = True
                await asyncio.sleep(1.0)
        await self.producer.start()
        self._pump_task = asyncio.create_task(self._pump(), name="kafka-producer")
        self._watch_task = asyncio.create_task(self._watch(), name="kafka-producer-watch")

    async def ensure_topics(self) -> None:
        """Create missing topics with explicit partitions, retention and compaction."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=self.client_id)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            # Compacted topics roll segments every 10 minutes: only closed segments are
            # compacted, and a restore reads what compaction has not removed yet.
            new = [NewTopic(self.wire(name), spec.partitions, 1, topic_configs={
                       "retention.ms": str(int(spec.retention_hours * _HOUR_MS)),
                       "cleanup.policy": "compact" if spec.compact else "delete",
                       **({"segment.ms": "600000"} if spec.compact else {}),
                       "compression.type": "producer"})
                   for name, spec in self.specs.items() if self.wire(name) not in existing]
            if new:
                try:
                    await admin.create_topics(new)
                except TopicAlreadyExistsError:
                    pass  # another process created them first
        finally:
            await admin.close()

    def record(self, message: Message) -> tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]:
        """(topic on the cluster, value, key, headers) of a message, as the producers send it."""
        value, headers = encode(message.value)
        headers += [(k, v.encode()) for k, v in message.headers.items()]
        return self.wire(message.topic), value, message.key.encode() if message.key else None, headers

    async def publish(self, message: Message, partition: int | None = None) -> None:
        topic, value, key, headers = self.record(message)
        await self._room.wait()
        self._outbox.append((topic, value, key, headers, partition))
        self._outbox_bytes += len(value)
        self.outbox_peak_bytes = max(self.outbox_peak_bytes, self._outbox_bytes)
        if self._outbox_bytes >= self.outbox_limit:
            self._room.clear()
        self._queued.set()

    async def _pump(self) -> None:
        """Hand the outbox to the producer in order. The producer retries what it has
        (idempotent: no duplicates); while the broker is away it stops taking more
        (send() waits), and the outbox holds the rest."""
        while True:
            if not self._outbox:
                self._queued.clear()
                await self._queued.wait()
                continue
            topic, value, key, headers, partition = self._outbox[0]
            self._sending_since = time.monotonic()
            try:
                delivery = await self.producer.send(topic, value, key=key, headers=headers, partition=partition)
            except KafkaTimeoutError:  # request_timeout_ms without room in the producer: try again
                continue
            finally:
                self._sending_since = None
            self._outbox.popleft()
            self._outbox_bytes -= len(value)
            if self._outbox_bytes < self.outbox_limit:
                self._room.set()
            self._in_flight.append(delivery)
            if len(self._in_flight) >= 10_000:  # keep the list short; failures are counted
                self._check(d for d in self._in_flight if d.done())
                self._in_flight = [d for d in self._in_flight if not d.done()]

    def taking_messages(self, stuck_after_s: float = 5.0) -> bool:
        """False while the producer has waited more than stuck_after_s for the broker to take a
        message (the broker is unreachable or overloaded; health checks)."""
        since = self._sending_since
        return since is None or time.monotonic() - since <= stuck_after_s

    async def reachable(self, timeout_s: float = 1.0) -> bool:
        """A broker answers (the producer's connection, opened again if it dropped) and the
        producer is taking messages (readiness: ops/monitor.py)."""
        if not self.taking_messages():
            return False
        client = self.producer.client
        for broker in client.cluster.brokers():
            with contextlib.suppress(Exception):
                if await asyncio.wait_for(client.ready(broker.nodeId), timeout_s):
                    return True
        return False

    async def lag(self, timeout_s: float = 1.0) -> dict[tuple[str, str, int], int]:
        """(group, topic, partition) -> end offset (last stable) minus position, for every
        partition assigned to this process's consumers that has been fetched (/metrics)."""
        out = {}
        for sub in self.subscriptions:
            consumer = sub.consumer
            for tp in consumer.assignment():
                end = consumer.last_stable_offset(tp)
                if end is None:
                    end = consumer.highwater(tp)
                if end is None:
                    continue
                with contextlib.suppress(Exception):
                    position = await asyncio.wait_for(consumer.position(tp), timeout_s)
                    out[(sub.group, tp.topic, tp.partition)] = max(0, end - position)
        return out

    async def _watch(self, stuck_after_s: float = 5.0) -> None:
        """Say once when the broker stops taking messages, and once when it takes them again."""
        stuck_since = None
        while True:
            await asyncio.sleep(1.0)
            since = self._sending_since
            stuck = since is not None and time.monotonic() - since > stuck_after_s
            if stuck and stuck_since is None:
                stuck_since = since
                log.warning("Kafka at %s is not taking messages: buffering them in order (%d messages, "
                            "%.1f MB of %.0f MB); the producer keeps retrying", self.bootstrap,
                            len(self._outbox), self._outbox_bytes / 2**20, self.outbox_limit / 2**20)
            elif not stuck and stuck_since is not None:
                log.warning("Kafka at %s takes messages again after %.0f s; sending %d buffered messages",
                            self.bootstrap, time.monotonic() - stuck_since, len(self._outbox))
                stuck_since = None

    def _check(self, deliveries) -> list[BaseException]:
        failed = [d.exception() for d in deliveries if d.exception() is not None]
        if failed and self.delivery_failures == 0:
            log.error("Kafka rejected messages (not retriable): %r; counted as delivery failures", failed[0])
        self.delivery_failures += len(failed)
        return failed

    async def flush(self) -> None:
        """Wait until everything published is acknowledged by the broker (acks=all);
        raise if any of it was not, so that the caller does not commit its input."""
        while self._outbox:
            if self._pump_task is None or self._pump_task.done():
                raise RuntimeError("the Kafka producer task is not running")
            await asyncio.sleep(0.01)
        in_flight, self._in_flight = self._in_flight, []
        await asyncio.gather(*in_flight, return_exceptions=True)
        failed = self._check(in_flight)
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(in_flight)} messages were not delivered to Kafka: {failed[0]!r}")

    def subscribe(self, topics: list[Topic], group: str, transactional: bool = False) -> KafkaSubscription:
        sub = KafkaSubscription(self, topics, group, transactional)
        self.subscriptions.append(sub)
        return sub

    async def read_latest(self, topic: Topic, partitions: set[int]) -> dict[int, Message]:
        """The last committed message of each of the topic's `partitions` (a compacted
        topic's latest state), read from the beginning up to the last stable offset."""
        if not partitions:
            return {}
        reader = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, client_id=f"{self.client_id}-restore",
                                  isolation_level="read_committed", enable_auto_commit=False, **_FETCH)
        await reader.start()
        latest: dict[int, Message] = {}
        try:
            tps = [TopicPartition(self.wire(topic), p) for p in sorted(partitions)]
            reader.assign(tps)
            await reader.seek_to_beginning(*tps)
            ends = await reader.end_offsets(tps)
            while any([await reader.position(tp) < ends[tp] for tp in tps]):
                for tp, records in (await reader.getmany(timeout_ms=1000)).items():
                    for rec in records:
                        try:
                            latest[tp.partition] = Message(topic, self.decoder.decode(rec.value, rec.headers),
                                                           partition=tp.partition, offset=rec.offset)
                        except DecodeError as e:
                            log.warning("%s[%d]@%d does not decode (%s): skipped", rec.topic, rec.partition,
                                        rec.offset, e.reason)
        finally:
            await reader.stop()
        return latest

    async def end(self, topics: list[Topic]) -> None:
        await self.flush()
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=self.client_id)
        probe = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, client_id=f"{self.client_id}-end")
        await admin.start()
        await probe.start()
        try:
            described = await admin.describe_topics([self.wire(t) for t in topics])
            tps = [TopicPartition(d["topic"], p["partition"]) for d in described for p in d["partitions"]]
            self.end_offsets.update(await probe.end_offsets(tps))
        finally:
            await probe.stop()
            await admin.close()

    def wire(self, topic: str) -> str:
        """The topic's name on the cluster (a prefix lets several fleets share one)."""
        return f"{self.prefix}{topic}"

    async def close(self) -> None:
        for sub in self.subscriptions:
            await sub.close()
        for task in (self._pump_task, self._watch_task):
            if task is not None:
                task.cancel()
        await self.producer.stop()
