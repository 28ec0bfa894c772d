"""Kafka bus: the same three verbs as the in-process bus, over Apache Kafka (aiokafka).

- publish: an idempotent producer (acks=all) sends each batch as one Arrow IPC
  message (bus/codec.py) with schema headers; the message key places it (node for
  GPU data, rack for facility data).
- subscribe: a consumer in a consumer group with auto-commit off. `get_batch`
  decodes; a message that does not decode goes to the dead-letter topic with
  headers saying why and where it came from, is counted, and never stops the
  consumer or loses the messages around it.
- commit: commits the offsets of everything `get_batch` returned, to be called
  only once the role's output is durable (at-least-once).
- end: flushes the producer and snapshots the topics' end offsets; subscriptions
  drain up to them and then raise EndOfStream, as the in-process bus does.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from pipeline.bus.base import EndOfStream, Message, Topic
from pipeline.bus.codec import DecodeError, decode, encode

log = logging.getLogger(__name__)

DEAD_LETTER = "fleetwatch.deadletter"
_HOUR_MS = 3_600_000


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
        DEAD_LETTER: TopicSpec(1, max(retention_hours, 24 * 7)),
    }


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
                await hook()
            await self.sub.commit()

    async def on_partitions_assigned(self, assigned) -> None:
        self.sub.assignments += 1


class KafkaSubscription:
    def __init__(self, bus: "KafkaBus", topics: list[Topic], group: str) -> None:
        self.bus = bus
        self.topics = list(topics)
        self.group = group
        self.before_revoke: list = []  # async callables: make output durable (then we commit)
        self.assignments = 0           # how many times partitions were (re)assigned
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bus.bootstrap, group_id=bus.wire(group),
            client_id=f"{bus.client_id}-{group}", enable_auto_commit=False, auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)
        self._started = False
        self._to_commit: dict[TopicPartition, int] = {}
        self.dead_letters = 0

    async def _start(self) -> None:
        if not self._started:
            self.consumer.subscribe([self.bus.wire(t) for t in self.topics], listener=_Rebalance(self))
            await self.consumer.start()
            self._started = True

    async def get_batch(self, max_messages: int = 256, timeout_s: float | None = None) -> list[Message]:
        await self._start()
        records = await self.consumer.getmany(timeout_ms=int(1000 * (timeout_s if timeout_s is not None else 1.0)),
                                              max_records=max_messages)
        out: list[Message] = []
        for tp, batch in records.items():
            for rec in batch:
                self._to_commit[tp] = rec.offset + 1
                try:
                    value = decode(rec.value, rec.headers)
                except DecodeError as e:
                    await self._dead_letter(rec, e.reason)
                    continue
                out.append(Message(bus_topic(rec.topic, self.bus.prefix), value, rec.key.decode() if rec.key else None,
                                   {k: v.decode(errors="replace") for k, v in rec.headers}, rec.partition, rec.offset))
        if not records and await self._drained():
            raise EndOfStream
        return out

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

    async def commit(self) -> None:
        if self._to_commit:
            await self.consumer.commit(dict(self._to_commit))
            self._to_commit.clear()

    async def close(self) -> None:
        if self._started:
            await self.consumer.stop()
            self._started = False


class KafkaBus:
    keyed = True  # order holds per partition: producers key messages by node or rack

    def __init__(self, bootstrap: str, partitions: int = 6, retention_hours: float = 24.0,
                 client_id: str = "fleetwatch", prefix: str = "") -> None:
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.client_id = client_id
        self.specs = topic_specs(partitions, retention_hours)
        self.producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, client_id=client_id, acks="all", enable_idempotence=True,
            compression_type="zstd", linger_ms=5, max_batch_size=1024 * 1024, max_request_size=8 * 1024 * 1024)
        self.subscriptions: list[KafkaSubscription] = []
        self.end_offsets: dict[TopicPartition, int] = {}
        self._in_flight: list[asyncio.Future] = []
        self.dead_letters = 0

    async def start(self) -> None:
        await self.ensure_topics()
        await self.producer.start()

    async def ensure_topics(self) -> None:
        """Create missing topics with explicit partitions, retention and compaction."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=self.client_id)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            new = [NewTopic(self.wire(name), spec.partitions, 1, topic_configs={
                       "retention.ms": str(int(spec.retention_hours * _HOUR_MS)),
                       "cleanup.policy": "compact" if spec.compact else "delete",
                       "compression.type": "producer"})
                   for name, spec in self.specs.items() if self.wire(name) not in existing]
            if new:
                try:
                    await admin.create_topics(new)
                except TopicAlreadyExistsError:
                    pass  # another process created them first
        finally:
            await admin.close()

    async def publish(self, message: Message) -> None:
        value, headers = encode(message.value)
        delivery = await self.producer.send(self.wire(message.topic), value,
                                            key=message.key.encode() if message.key else None, headers=headers)
        self._in_flight.append(delivery)
        if len(self._in_flight) >= 10_000:  # bounded: a producer that never commits still checks delivery
            await self.flush()

    async def flush(self) -> None:
        """Wait until everything published is acknowledged by the broker (acks=all);
        raise if any of it was not, so that the caller does not commit its input."""
        in_flight, self._in_flight = self._in_flight, []
        results = await asyncio.gather(*in_flight, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(results)} messages were not delivered to Kafka: {failed[0]!r}")

    def subscribe(self, topics: list[Topic], group: str) -> KafkaSubscription:
        sub = KafkaSubscription(self, topics, group)
        self.subscriptions.append(sub)
        return sub

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
        await self.producer.stop()
