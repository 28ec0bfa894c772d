"""Kafka bus: the same three verbs as the in-process bus, over Apache Kafka (aiokafka).

- publish: an idempotent producer (acks=all) sends each batch as one Arrow IPC
  message (bus/codec.py) with schema headers; the message key places it (bus/keys.py:
  a rack's telemetry, events and facility readings by rack). Messages wait in a bounded outbox: while the
  broker is unreachable the source keeps publishing into it, the producer retries,
  and it all goes out in order when the broker is back; a full outbox blocks
  the publisher (backpressure) instead of growing or dropping.
- subscribe: a consumer in a consumer group with auto-commit off. `get_batch`
  decodes; a message that does not decode goes to the dead-letter topic with
  headers saying why and where it came from, is counted, and never stops the
  consumer or loses the messages around it.
- commit: commits the offsets of everything `get_batch` returned, to be called
  only once the role's output is durable (at-least-once). A transactional
  subscription (detect) has a producer per input partition and publishes each
  partition's output in a Kafka transaction together with its input offsets and its
  state checkpoint: exactly once, even across a crash; the next owner of a partition
  fences a previous one that still runs.
- an aligned subscription (detect) releases what it read in event-time order
  (bus/align.py) and commits nothing it holds.
- partitions are assigned with the range assignor, so a consumer gets the same
  partition numbers of every topic it reads: a rack's telemetry, events and facility
  readings always meet in one process, with that partition's checkpoint.
- end: flushes the producer and snapshots the topics' end offsets; subscriptions
  drain up to them and then raise EndOfStream, as the in-process bus does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from typing import Hashable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import (ClusterAuthorizationFailedError, GroupAuthorizationFailedError, KafkaConnectionError,
                            KafkaTimeoutError, TopicAlreadyExistsError, TopicAuthorizationFailedError,
                            TransactionalIdAuthorizationFailed, UnknownTopicOrPartitionError, for_code)
from aiokafka.errors import (CommitFailedError, IllegalOperation, IllegalStateError, InvalidProducerEpoch, KafkaError,
                            ProducerFenced, RebalanceInProgressError)

from pipeline.bus.align import Aligner
from pipeline.bus.base import ALERTS_KEPT_H, EndOfStream, Message, Topic
from pipeline.bus.codec import DecodeError, Decoder, encode
from pipeline.bus.kafka_settings import DEAD_LETTER, GROUP_PREFIX, client_settings, replication
from pipeline.config import ConfigError, KafkaConfig, Unavailable

log = logging.getLogger(__name__)

_FENCED = (ProducerFenced, InvalidProducerEpoch)  # a newer producer of the same transactional id took over
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
        Topic.ALERTS: TopicSpec(max(1, partitions // 2), max(retention_hours, ALERTS_KEPT_H)),
        Topic.HEALTH: TopicSpec(partitions, retention_hours, compact=True),
        Topic.LABELS: TopicSpec(1, max(retention_hours, ALERTS_KEPT_H)),
        Topic.RACKS: TopicSpec(partitions, retention_hours),
        Topic.STATE: TopicSpec(partitions, retention_hours, compact=True),
        # Power: requests in (the grid signal), caps to the agents (by rack: an agent reads
        # its rack's partition), what the agents did; kept a week, as events are.
        Topic.POWER_REQUESTS: TopicSpec(1, max(retention_hours, 24 * 7)),
        Topic.POWER_CAPS: TopicSpec(partitions, retention_hours),
        Topic.POWER_ACTIONS: TopicSpec(partitions, max(retention_hours, 24 * 7)),
        # One row per request, and one writer (the role)'s transitions: kept as alerts are.
        Topic.POWER_REPORTS: TopicSpec(1, max(retention_hours, ALERTS_KEPT_H)),
        Topic.REMEDIATION: TopicSpec(1, max(retention_hours, ALERTS_KEPT_H)),
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


class _FencedLeftovers(logging.Filter):
    """A fenced transactional producer leaves aiokafka's own futures (its batches', its
    sender's) failed with ProducerFenced and never read, and asyncio logs each as an ERROR
    with a traceback when it is collected: four or five after every fence, after the one
    warning that says what happened and what the process does (`KafkaSubscription._lose`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, _FENCED) and str(record.msg).startswith("Future exception was never retrieved"))


logging.getLogger("asyncio").addFilter(_FencedLeftovers())


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


STOP_PRODUCER_S = 5.0  # a producer that moved away gets this long to close its connections
ASK_GROUP_S = 10.0     # held_still(): a group that does not answer within this leaves the partitions held


async def _stop_producer(producer: AIOKafkaProducer) -> None:
    with contextlib.suppress(Exception):  # (a fenced producer may never finish stopping)
        await asyncio.wait_for(producer.stop(), STOP_PRODUCER_S)


# The broker's refusals for want of a right: the process ends saying what to grant, with status 75, which a
# supervisor restarts (rights taken away and given back, an authorizer that was down: it comes back by itself).
_REFUSED = (TopicAuthorizationFailedError, GroupAuthorizationFailedError, TransactionalIdAuthorizationFailed,
            ClusterAuthorizationFailedError)


def refused(bus: "KafkaBus", error: BaseException, what: str) -> Unavailable:
    """A refusal as the error the process ends with."""
    user = bus.client_settings.get("sasl_plain_username")
    return Unavailable(f"Kafka at {bus.bootstrap} refused {f'user {user!r}' if user else 'this process'} {what} "
                       f"({type(error).__name__}): grant its roles' rights, which `fleetwatch topics acls ROLE` "
                       f"prints (docs/kafka.md#users-and-acls)")


def _refusal(error: BaseException) -> BaseException | None:
    """The authorization error in `error` or what it was raised from (a transaction's commit raises its
    failed write's), or None."""
    while error is not None and not isinstance(error, _REFUSED):
        error = error.__cause__ or error.__context__
    return error


def _transaction_error(producer: AIOKafkaProducer | None) -> BaseException | None:
    """The error aiokafka holds for a transaction it put in an error state: a write refused when its
    partition was added to the transaction, after which what the role awaits next (a send, the offsets)
    raises a bare IllegalOperation. aiokafka has no public accessor: its transaction manager's waiter."""
    manager = getattr(producer, "_txn_manager", None)
    waiter = manager.wait_for_transaction_end() if manager is not None else None
    if waiter is not None and waiter.done() and not waiter.cancelled():
        return waiter.exception()
    return None


async def _getmany(bus: "KafkaBus", consumer: AIOKafkaConsumer, timeout_s: float | None, max_messages: int,
                   what: str) -> dict:
    try:
        return await consumer.getmany(timeout_ms=int(1000 * (timeout_s if timeout_s is not None else 1.0)),
                                      max_records=max_messages)
    except _REFUSED as e:
        raise refused(bus, e, what) from None


class _Rebalance(ConsumerRebalanceListener):
    """Before partitions move to another consumer, the role makes its output durable
    and commits, so the new owner starts exactly where this one stopped."""

    def __init__(self, sub: "KafkaSubscription") -> None:
        self.sub = sub

    async def on_partitions_revoked(self, revoked) -> None:
        if revoked:
            partitions = {tp.partition for tp in revoked}
            self.sub.revoking(partitions)
            for hook in self.sub.before_revoke:
                await hook(partitions)
            await self.sub.commit()
            await self.sub.release(partitions)

    async def on_partitions_assigned(self, assigned) -> None:
        self.sub.assignments += 1
        self.sub._committed.clear()  # (positions start again at the group's commits, maybe another member's)
        self.sub._revoking.clear()  # (aiokafka revokes every partition first: none is being revoked now,
                                    # also where a hook failed and release() never ran)
        if assigned:
            partitions = {tp.partition for tp in assigned}
            # aiokafka logs a listener's error and goes on: the partitions would never be ready, and the role
            # would wait for them for ever. It ends instead (get_batch raises it; a supervisor starts it again).
            try:
                await self.sub.claim(partitions)  # fences a previous owner before its state is read
            except Exception as e:
                self.sub.failed = self.sub.set_up_failed(e, f"its transactional ids "
                                                            f"{self.sub.bus.wire_group(self.sub.group)}-p*")
                return
            try:
                for hook in self.sub.on_assigned:
                    await hook(partitions)
            except Exception as e:  # (restoring their state: a checkpoint that cannot be read)
                self.sub.failed = self.sub.set_up_failed(e, "reading what its partitions need")
                return
            self.sub.ready |= partitions


class KafkaSubscription:
    def __init__(self, bus: "KafkaBus", topics: list[Topic], group: str, transactional: bool = False,
                 align: bool = False, upstream: tuple[str, list[Topic]] | None = None) -> None:
        self.bus = bus
        # Event-time order (bus/align.py): of the topics read, or of one topic's origins.
        self.aligner = Aligner(topics, by_origin=len(topics) == 1) if align else None
        self.topics = list(topics)
        self.group = group
        self.on_assigned: list = []    # async callables(partitions): e.g. restore state
        self.before_revoke: list = []  # async callables(partitions): make output durable (then we commit)
        self.assignments = 0           # how many times partitions were (re)assigned
        self.holds_input = True        # what is not committed waits on Kafka: reading can pause
        self.failed: Exception | None = None  # the rebalance's set-up or a write failed: the role ends (get_batch)
        self.consumer = AIOKafkaConsumer(
            group_id=bus.wire_group(group), client_id=f"{bus.client_id}-{group}", enable_auto_commit=False,
            auto_offset_reset="earliest", isolation_level="read_committed",
            partition_assignment_strategy=(RangePartitionAssignor,), **_FETCH, **bus.client_settings)
        _back_off_metadata(self.consumer._client)
        # Transactional (detect): a producer per input partition, its transactional id
        # the group's and the partition's. The process that takes a partition over starts
        # that id again, which fences the previous owner (a crashed one's open transaction
        # is aborted; a frozen one that wakes up can commit nothing of it: ProducerFenced)
        # before the new owner reads the partition's checkpoint.
        self.transactional = transactional
        self.producers: dict[int, AIOKafkaProducer] = {}
        self.on_lost: list = []        # callables(partitions): fenced, another process owns them now
        self._in_transaction: set[int] = set()
        self.fenced = 0                # partitions this process lost to a newer owner while it held them
        self._released: dict[TopicPartition, int] = {}  # aligned: past the last message released
        self.ready: set[int] = set()   # partitions assigned whose on_assigned hooks have run
        self._revoking: set[int] = set()  # partitions a rebalance is taking away (revoking)
        self._rejoin = False           # a partition's transaction failed: rejoin the group (_lose)
        self._started = False
        self._ends_probe: AIOKafkaConsumer | None = None  # asks the broker for end offsets (_read_to_end)
        # Aligned by origin: the group and topics of the tier that sends (its input partitions
        # are the origins), whose committed offsets say when an origin can send no more.
        self.upstream = upstream
        self._upstream_admin: AIOKafkaAdminClient | None = None
        self._stopping: set[asyncio.Task] = set()  # producers of partitions that moved away, shutting down
        self._to_commit: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}  # the group's commit of each partition read (held_still)
        self.dead_letters = 0

    def set_up_failed(self, error: Exception, what: str) -> Exception:
        """What the role ends with when its partitions' set-up failed: a refusal says what to grant, another
        Kafka error is a service out of reach now (status 75: a supervisor starts it again), anything else
        (a checkpoint that cannot be decoded) is itself."""
        if (why := _refusal(error)) is not None:
            return refused(self.bus, why, what)
        if isinstance(error, KafkaError):
            return Unavailable(f"Kafka at {self.bus.bootstrap} failed {what} for group {self.group} "
                               f"({type(error).__name__}: {error}); the process ends so that its supervisor "
                               f"starts it again")
        return error

    async def claim(self, partitions: set[int]) -> None:
        """Start the transactional producer of each partition (transactional only)."""
        if not self.transactional:
            return
        for p in sorted(partitions - set(self.producers)):
            producer = AIOKafkaProducer(client_id=f"{self.bus.client_id}-{self.group}-p{p}",
                                        transactional_id=f"{self.bus.wire_group(self.group)}-p{p}",
                                        transaction_timeout_ms=10_000, **self.bus.producer_settings,
                                        **self.bus.client_settings)
            _back_off_metadata(producer.client)
            try:
                await producer.start()
            except BaseException:
                await _stop_producer(producer)
                raise
            await producer.begin_transaction()  # waits for the producer id: the previous owner is fenced now
            self.producers[p] = producer
            self._in_transaction.add(p)

    def revoking(self, partitions: set[int]) -> None:
        """A rebalance takes these partitions away: from now on get_batch hands out none of
        their messages and commits none of their offsets (what the aligner holds of them
        included). The role's hand-over has checkpointed and dropped their state; handed out
        after it (this listener runs beside the role's loop), they would be judged on a
        forgotten state, and the rebalance's commit would commit that output with their
        offsets, taken from the next owner: a cold detector raising again an alert firing
        there (seen on a loaded machine, with a begin_transaction that raced the commit's)."""
        self.ready -= partitions
        self._revoking |= partitions
        if self.aligner is not None:
            self.aligner.drop(partitions)

    async def release(self, partitions: set[int]) -> None:
        """Stop the producers of partitions that moved away (their output is committed);
        what is held of them unread goes to their next owner."""
        self._revoking -= partitions
        if self.aligner is not None:
            self.aligner.drop(partitions)
            self._released = {tp: o for tp, o in self._released.items() if tp.partition not in partitions}
        for p in partitions & set(self.producers):
            producer = self.producers.pop(p)
            self._in_transaction.discard(p)
            # Stopped beside the rebalance, not inside it: a producer's shutdown can outlast the
            # group's rebalance timeout under load, and a member that overruns it is dropped from
            # the group (seen: a detect process that never rejoined). Its output is committed, or
            # is aborted when the partition's next owner starts its transactional id.
            task = asyncio.create_task(_stop_producer(producer), name=f"stop-producer-p{p}")
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def _lose(self, p: int, error: BaseException) -> None:
        """Partition p's transaction failed: it has a newer owner (this process was fenced,
        ProducerFenced), or the broker aborted it (this process was frozen past
        transaction_timeout_ms). Nothing of it is committed here: its state is dropped, it
        is read no more, and the consumer rejoins its group, so that whoever owns it now
        (maybe this process again) starts from its last checkpoint and committed offsets. A write
        the broker refused for want of a right is no lost transaction: rejoining would meet it
        again for ever, so the role ends (get_batch raises it)."""
        why = _refusal(error) or _refusal(_transaction_error(self.producers.get(p)))
        if why is not None:
            if self.failed is None:
                self.failed = refused(self.bus, why, f"a write in its transactions (group {self.group})")
            return
        if isinstance(error, _FENCED):
            self.fenced += 1
        log.warning("%s: partition %d %s (%s): its uncommitted output is discarded and its state dropped here; "
                    "rejoining the group", self.group, p, "was taken over by another process while this one held it"
                    if isinstance(error, _FENCED) else "lost its transaction", f"{type(error).__name__}: {error}")
        self.ready.discard(p)
        self.forget({p})
        for hook in self.on_lost:
            hook({p})
        await self.release({p})
        self._rejoin = True

    async def _start(self) -> None:
        if not self._started:
            self.consumer.subscribe([self.bus.wire(t) for t in self.topics], listener=_Rebalance(self))
            await self.consumer.start()
            self._started = True

    async def publish(self, message: Message, partition: int | None = None, origin: int | None = None) -> None:
        if not self.transactional or origin is None:
            await self.bus.publish(message, partition)
            return
        producer = self.producers.get(origin)
        if producer is None:
            return  # the input partition was lost (fenced or revoked): its output is its new owner's
        try:
            if origin not in self._in_transaction:
                await producer.begin_transaction()
                self._in_transaction.add(origin)
            topic, value, key, headers = self.bus.record(message)
            delivery = await producer.send(topic, value, key=key, headers=headers, partition=partition)
            # Its failure is the transaction's (commit() raises it, or the partition was lost):
            # read here, or asyncio logs each undelivered record's as a traceback.
            delivery.add_done_callback(lambda d: d.cancelled() or d.exception())
        except (KafkaError, IllegalOperation) as e:  # fenced, or the transaction was aborted
            await self._lose(origin, e)

    async def get_batch(self, max_messages: int = 256, timeout_s: float | None = None) -> list[Message]:
        await self._start()
        if self.failed is not None:
            raise self.failed
        if self._rejoin:  # the group assigns the lost partitions anew: their owner restores them
            self._rejoin = False
            self.consumer.unsubscribe()
            self.consumer.subscribe([self.bus.wire(t) for t in self.topics], listener=_Rebalance(self))
        if self.aligner is not None and self.aligner.cut_short:
            timeout_s = 0.0  # what it holds goes on now, with whatever was fetched meanwhile
        records = await _getmany(self.bus, self.consumer, timeout_s, max_messages,
                                 f"reading {', '.join(self.bus.wire(t) for t in self.topics)} in group "
                                 f"{self.bus.wire_group(self.group)}")
        # aiokafka fetches a partition as soon as it is assigned, maybe before the rebalance
        # listener has set it up (its producer, its restored state): wait for that.
        for tp in records:
            while tp.partition not in self.ready | self._revoking and tp in self.consumer.assignment():
                if self.failed is not None:  # its set-up failed: it never becomes ready
                    raise self.failed
                await asyncio.sleep(0.01)
        records = {tp: recs for tp, recs in records.items() if tp.partition in self.ready}
        for tp, batch in records.items():  # (read from the group's commit on: its first record is at it)
            self._committed.setdefault(tp, batch[0].offset)
        out: list[Message] = []
        aligner = self.aligner
        fetched: dict[TopicPartition, int] = {}  # committable once handed out (below: no await after)
        dead: list[tuple[TopicPartition, Topic, int]] = []  # aligned: dead-lettered, past them
        for tp, batch in records.items():
            for rec in batch:
                topic = bus_topic(rec.topic, self.bus.prefix)
                if aligner is None:
                    fetched[tp] = rec.offset + 1
                try:
                    value = self.bus.decoder.decode(rec.value, rec.headers)
                except DecodeError as e:
                    await self._dead_letter(rec, e.reason)
                    if aligner is not None:
                        dead.append((tp, topic, rec.offset + 1))
                    continue
                out.append(received(topic, value, rec))
        if aligner is not None:
            aligner.add([m for m in out if m.partition in self.ready])  # (revoked while dead-lettering)
            drained = not records and await self._drained()
            read = set() if drained else await self._read_to_end()
            out = aligner.drain(max_messages) if drained else aligner.release(lambda t, p: (t, p) in read,
                                                                               limit=max_messages)
            if not drained and len(out) < max_messages and (more := aligner.waiting_on() - read):
                # Sources that ran empty while releasing (the last topic of a tick waits on the
                # first one's end): read to their end too? Then on, not on the next batch.
                read |= await self._read_to_end(more)
                out += aligner.release(lambda t, p: (t, p) in read, limit=max_messages - len(out))
            out = [m for m in out if m.partition in self.ready]  # (revoked while reading to the end)
            # Commit up to what is released, but not past a message still held. Released in
            # time order, a partition's offsets may interleave (origins): one released past a
            # held one is read again after a crash, which the site tier skips (rack_vs_site.py).
            touched = set()
            for m in out:
                tp = TopicPartition(self.bus.wire(m.topic), m.partition)
                self._released[tp] = max(self._released.get(tp, 0), m.offset + 1)
                touched.add(tp)
            for tp in touched:
                held = aligner.holding(bus_topic(tp.topic, self.bus.prefix), tp.partition)
                fetched[tp] = self._released[tp] if held is None else min(held, self._released[tp])
            for tp, topic, past in dead:  # not past a message held (this batch's are held until released)
                if aligner.holding(topic, tp.partition) is None:
                    fetched[tp] = max(fetched.get(tp, 0), past)
            if out:
                return self._hand_out(out, fetched)
        if not records and await self._drained():
            raise EndOfStream
        return self._hand_out(out, fetched)

    def _hand_out(self, out: list[Message], fetched: dict[TopicPartition, int]) -> list[Message]:
        """The batch get_batch returns, and its offsets to commit: of the partitions still held
        only (no await from here to the caller: a revocation that began meanwhile took its
        partitions out of `ready`, and their messages go to the next owner)."""
        self._to_commit.update((tp, o) for tp, o in fetched.items() if tp.partition in self.ready)
        return [m for m in out if m.partition in self.ready]

    async def _read_to_end(self, only: set | None = None) -> set[tuple[Hashable, int]]:
        """Of the (source, partition)s the aligner waits on, those read up to their end now:
        a topic's end offsets asked of the broker (the last fetch's may be behind a producer
        that runs faster than real time, as the eval's does); an origin's, see _origins_done."""
        asked = only or self.aligner.waiting_on()
        origins = {(o, p) for o, p in asked if not isinstance(o, Topic)}
        waiting = {TopicPartition(self.bus.wire(t), p): (t, p) for t, p in asked - origins}
        waiting = {tp: tp_ for tp, tp_ in waiting.items() if tp in self.consumer.assignment()}
        done = await self._origins_done(origins) if origins else set()
        if not waiting:
            return done
        try:
            ends = await (await self._probe()).end_offsets(list(waiting))  # read_committed: the last stable offsets
            return done | {waiting[tp] for tp, end in ends.items()
                           if tp in self.consumer.assignment() and await self.consumer.position(tp) >= end}
        except (KafkaError, IllegalStateError):  # (a rebalance meanwhile: the partition is not ours now)
            return done  # ask again on the next batch

    async def _probe(self) -> AIOKafkaConsumer:
        if self._ends_probe is None:
            # Its own connection: on the consumer's, a ListOffsets request waits behind the fetch
            # in flight, which the broker holds up to fetch_max_wait_ms (500 ms) while nothing is new.
            self._ends_probe = AIOKafkaConsumer(client_id=f"{self.bus.client_id}-{self.group}-ends",
                                                isolation_level="read_committed", enable_auto_commit=False,
                                                **self.bus.client_settings)
            await self._ends_probe.start()
        return self._ends_probe

    async def _origins_done(self, asked: set[tuple[str, int]]) -> set[tuple[str, int]]:
        """Origins (the sending tier's input partitions, `upstream`) that can send nothing
        more now: that tier has committed all its input of the partition (its output commits
        with its offsets, so all it sent for it is visible), and this partition is read to
        its end after that. A partition of no data is done at once; one whose process froze
        is not, until its next owner gets through it."""
        if self.upstream is None:
            return set()
        group, topics = self.upstream
        asked = {(o, p) for o, p in asked if str(o).isdigit()}  # (a summary without its header: no origin to ask)
        origins = {int(o) for o, _ in asked}
        tps = [TopicPartition(self.bus.wire(t), o) for t in topics for o in sorted(origins)]
        try:
            if self._upstream_admin is None:
                self._upstream_admin = AIOKafkaAdminClient(client_id=f"{self.bus.client_id}-{self.group}-upstream",
                                                           **self.bus.client_settings)
                await self._upstream_admin.start()
            committed = await self._upstream_admin.list_consumer_group_offsets(self.bus.wire_group(group),
                                                                               partitions=tps)
            ends = await (await self._probe()).end_offsets(tps)
        except KafkaError:
            return set()  # ask again on the next batch
        behind = {tp.partition for tp in tps
                  if max(getattr(committed.get(tp), "offset", -1), 0) < ends.get(tp, 0)}
        idle = origins - behind
        if not idle:
            return set()
        read = await self._read_to_end({(self.topics[0], p) for o, p in asked if int(o) in idle})
        return {(o, p) for o, p in asked if int(o) in idle and (self.topics[0], p) in read}

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
        try:
            for tp in self.consumer.assignment():
                if await self.consumer.position(tp) < ends.get(tp, 0):
                    return False
        except IllegalStateError:  # a rebalance meanwhile: ask again
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
        await self.bus.dead_letter(rec.value, rec.key, headers)

    async def dead_letter_rows(self, message: Message, rows, reason: str, detail: str) -> None:
        """Rows of a decoded message that failed the content checks (bus/intake.py): one
        message on the dead-letter topic, the rows as Arrow with their schema headers, plus
        fw-error, fw-reason and where they came from. Acknowledged before it returns."""
        value, headers = encode(rows)
        headers += [("fw-error", f"{reason}: {detail}".encode()), ("fw-reason", reason.encode()),
                    ("fw-source-topic", self.bus.wire(message.topic).encode()),
                    ("fw-source-partition", str(message.partition).encode()),
                    ("fw-source-offset", str(message.offset).encode()), ("fw-consumer-group", self.group.encode())]
        await self.bus.dead_letter(value, message.key.encode() if message.key else None, headers)

    def pause(self) -> None:
        """Stop fetching every partition assigned now (the caller calls again after a rebalance)."""
        self.consumer.pause(*self.consumer.assignment())

    def resume(self) -> None:
        self.consumer.resume(*self.consumer.assignment())

    def expect(self, partition: int, origins: set[int], maybe: bool = False) -> None:
        """An aligned partition's messages also come from these origins (bus/align.py)."""
        if self.aligner is not None and self.aligner.by_origin:
            self.aligner.expect(partition, sorted(str(o) for o in origins), maybe)

    def forget(self, partitions: set[int]) -> None:
        """Commit nothing more of these partitions: their next owner reads them again."""
        if self.aligner is not None:
            self.aligner.drop(partitions)
            self._released = {tp: o for tp, o in self._released.items() if tp.partition not in partitions}
        for tp in [tp for tp in self._to_commit if tp.partition in partitions]:
            del self._to_commit[tp]
        for tp in [tp for tp in self._committed if tp.partition in partitions]:
            del self._committed[tp]

    def _membership(self) -> tuple[int, str]:
        """aiokafka's generation and member id of this consumer in its group ((-1, ""): it heard
        it was dropped, a heartbeat's UnknownMemberId, and rejoins)."""
        coordinator = getattr(self.consumer, "_coordinator", None)
        return getattr(coordinator, "generation", 0), getattr(coordinator, "member_id", "")

    async def held_still(self, partitions: set[int]) -> set[int]:
        """Those of `partitions` the group says are still this member's. A member frozen
        past its session timeout (a stalled VM, a process stopped in a debugger) learns that
        the group dropped it only when it next speaks to the group, and its revoke flushes
        before it rejoins: asked before output is written (the archive), a partition the
        group gave another member meanwhile is not written twice. The question is a commit
        of the offsets the group holds (as far as this member knows: it moves nothing of its
        own). A group busy rebalancing still counts this member's (eager: no one reads them
        before its revoke ends); one that does not answer within ASK_GROUP_S leaves them held
        (as if never asked). A member aiokafka knows was dropped is not asked, and one dropped
        while asking is not believed: an empty group takes a commit of no generation as a
        standalone consumer's. Called under the sink's flush lock (consume()), which a revoke
        waits for: no new assignment can come while it asks."""
        if self.transactional:  # a newer owner fences these by their producer
            return set(partitions)
        assigned = {tp for tp in self.consumer.assignment() if tp.partition in partitions}
        held, why = {tp.partition for tp in assigned}, "no longer assigned here"
        member, unanswered = self._membership(), None
        if member[0] < 0:
            held, why = set(), "the group dropped this member"
        elif asked := {tp: self._committed[tp] for tp in assigned if tp in self._committed}:
            try:
                async with asyncio.timeout(ASK_GROUP_S):
                    await self.consumer.commit(asked)
            except CommitFailedError as e:
                if not isinstance(e.__cause__, RebalanceInProgressError):
                    held, why = set(), str(e.__cause__ or e)
            except (TimeoutError, KafkaError) as e:
                unanswered = e
            if self._membership() != member:
                held, why = set(), "the group dropped this member while it asked"
            elif unanswered is not None:
                log.warning("%s: the group did not say whether partitions %s are still this member's (%s: %s); "
                            "taken as held", self.group, sorted(held), type(unanswered).__name__, unanswered)
        if lost := set(partitions) - held:
            log.warning("%s: partitions %s were given to another member while this one held them (%s): what it "
                        "read of them is not written here, and their next owner reads it again",
                        self.group, sorted(lost), why)
            self.revoking(lost)  # (none of them handed out until the group assigns them again)
            self.forget(lost)
        return held

    async def commit(self) -> None:
        if not self.transactional:
            if self._to_commit:
                held = self.consumer.assignment()
                offsets = {tp: o for tp, o in self._to_commit.items() if tp in held}
                self._to_commit.clear()
                try:
                    if offsets:
                        if self._membership()[0] < 0:  # (an empty group would take it: held_still)
                            raise CommitFailedError("this member was dropped from the group")
                        await self.consumer.commit(offsets)
                        self._committed.update(offsets)
                except CommitFailedError as e:
                    # The group moved these partitions on while this process held them: it overran the
                    # rebalance timeout (a flush stuck on a full disk, a frozen process). Nothing of them
                    # is committed; their next owner reads them again from the last commit.
                    log.warning("%s: offsets not committed, the group moved the partitions on meanwhile (%s); "
                                "their next owner reads them again", self.group, e)
            return
        # One transaction per input partition: its output, its checkpoint and its offsets.
        for p in sorted(set(self.producers) & ({tp.partition for tp in self._to_commit} | self._in_transaction)):
            producer, offsets = self.producers[p], {tp: o for tp, o in self._to_commit.items() if tp.partition == p}
            try:
                if p not in self._in_transaction:
                    await producer.begin_transaction()
                self._in_transaction.add(p)
                if offsets:
                    await producer.send_offsets_to_transaction(offsets, self.bus.wire_group(self.group))
                await producer.commit_transaction()
                self._in_transaction.discard(p)
                for tp in offsets:
                    del self._to_commit[tp]
            except (KafkaError, IllegalOperation) as e:  # fenced, or the transaction was aborted
                await self._lose(p, e)

    async def close(self) -> None:
        if self._started:
            await self.consumer.stop()
            await self.release(set(self.producers))  # open transactions are aborted: uncommitted input is read again
            self._started = False
        if self._stopping:
            await asyncio.wait(set(self._stopping), timeout=STOP_PRODUCER_S)
        if self._ends_probe is not None:
            await self._ends_probe.stop()
            self._ends_probe = None
        if self._upstream_admin is not None:
            await self._upstream_admin.close()
            self._upstream_admin = None


class KafkaBus:
    keyed = True  # order holds per partition: producers key messages by node or rack

    def __init__(self, bootstrap: str, partitions: int = 6, retention_hours: float = 24.0,
                 client_id: str = "fleetwatch", prefix: str = "", buffer_mb: float = 256.0,
                 connect_timeout_s: float = 30.0, *, security: dict | None = None, replication_factor: int = 0,
                 min_insync_replicas: int = 0, create_topics: bool = True, used: set[str] | None = None) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.client_id = client_id
        # Where and how every Kafka client of this bus connects (kafka_settings.client_settings):
        # bootstrap servers, TLS and SASL. Every AIOKafka* client takes **client_settings.
        self.client_settings = {"bootstrap_servers": bootstrap, **(security or {})}
        self.topic_settings = KafkaConfig(bootstrap=bootstrap, replication_factor=replication_factor,
                                          min_insync_replicas=min_insync_replicas, create_topics=create_topics)
        self.specs = topic_specs(partitions, retention_hours)
        self.used = used  # the topics this process uses, created or checked at start (None: all)
        self.producer_settings = dict(acks="all", enable_idempotence=True, compression_type="zstd", linger_ms=5,
                                      max_batch_size=1024 * 1024, max_request_size=8 * 1024 * 1024)
        self.producer = AIOKafkaProducer(client_id=client_id, **self.producer_settings, **self.client_settings)
        _back_off_metadata(self.producer.client)
        self.subscriptions: list[KafkaSubscription] = []
        self.listeners: list[KafkaListener] = []
        self.end_offsets: dict[TopicPartition, int] = {}
        self.failed: Unavailable | None = None  # a write refused for want of a right, or the producer broken
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
        self._counts: dict[Topic, int] = {}  # partitions of each topic on the cluster when the bus started
        self._count_noted: set[Topic] = set()  # topics whose count on the cluster differs from the config's (logged)

    @classmethod
    def from_config(cls, k: KafkaConfig, client_id: str = "fleetwatch", env=None, warn: bool = True,
                    topics: set[str] | None = None) -> "KafkaBus":
        """The bus of the `kafka.*` settings (security from kafka_settings: ConfigError if inconsistent).
        `topics`: the ones this process uses (bus/acls.py topics_used), created or checked at start;
        None: every one."""
        settings = client_settings(k, env, warn)
        return cls(k.bootstrap, k.partitions, k.retention_hours, client_id=client_id, prefix=k.topic_prefix,
                   buffer_mb=k.buffer_mb, connect_timeout_s=k.connect_timeout_s,
                   security={key: v for key, v in settings.items() if key != "bootstrap_servers"},
                   replication_factor=k.replication_factor, min_insync_replicas=k.min_insync_replicas,
                   create_topics=k.create_topics, used=topics)

    async def start(self) -> None:
        """Reach the brokers (retrying: they may be starting too), create missing topics
        (kafka.create_topics) or check that they exist."""
        await self.connect(self.ensure_topics if self.topic_settings.create_topics else self.check_topics)
        try:
            await self.producer.start()
        except _REFUSED as e:  # (an idempotent producer's id: WRITE on at least one topic grants it)
            raise refused(self, e, "a producer id (a user needs WRITE on at least one topic)") from None
        try:  # how many partitions each topic has, for the producer's first messages (partition_count)
            cluster = await self.producer.client.fetch_all_metadata()
            self._counts = {t: len(found) for t in self.specs if (found := cluster.partitions_for_topic(self.wire(t)))}
        except KafkaError as e:
            log.debug("no metadata from Kafka at %s yet (%s): partitions counted as kafka.partitions says until the "
                      "producer has some", self.bootstrap, e)
        self._pump_task = asyncio.create_task(self._pump(), name="kafka-producer")
        self._watch_task = asyncio.create_task(self._watch(), name="kafka-producer-watch")

    async def connect(self, first) -> object:
        """`await first()` (an admin request), retried while the brokers cannot be reached, for
        up to connect_timeout_s; then Unavailable (status 75: a supervisor tries again)."""
        deadline = time.monotonic() + self.connect_timeout_s
        retried = False
        while True:
            try:
                return await first()
            except KafkaConnectionError as e:
                if time.monotonic() >= deadline:
                    protocol = self.client_settings.get("security_protocol", "PLAINTEXT")
                    raise Unavailable(f"cannot reach Kafka at {self.bootstrap} (tried for {self.connect_timeout_s:g} s: "
                                      f"{e}): is the broker running, and are --kafka / kafka.bootstrap right" +
                                      (f", and does it take {protocol} there (kafka.security_protocol; the TLS and "
                                       f"SASL settings: see the log lines above)?" if protocol != "PLAINTEXT" else "?")
                                      ) from None
                if not retried:
                    log.warning("Kafka at %s is not reachable yet (%s); retrying for up to %g s", self.bootstrap,
                                e, self.connect_timeout_s)
                retried = True
                await asyncio.sleep(1.0)

    async def _admin(self) -> AIOKafkaAdminClient:
        admin = AIOKafkaAdminClient(client_id=self.client_id, **self.client_settings)
        try:
            await admin.start()
        except BaseException:
            await admin.close()
            raise
        return admin

    def topic_configs(self, spec: TopicSpec, min_insync: int) -> dict[str, str]:
        # Compacted topics roll segments every 10 minutes: only closed segments are
        # compacted, and a restore reads what compaction has not removed yet.
        return {"retention.ms": str(int(spec.retention_hours * _HOUR_MS)),
                "cleanup.policy": "compact" if spec.compact else "delete",
                **({"segment.ms": "600000"} if spec.compact else {}),
                "compression.type": "producer", "min.insync.replicas": str(min_insync)}

    async def ensure_topics(self, update: bool = False) -> list[str]:
        """Create missing topics with explicit partitions, replicas, retention, compaction and
        min.insync.replicas; with `update`, also set those configs on existing topics (the
        `fleetwatch topics create` command). Returns what it did, a line per topic. A broker
        that refuses for lack of rights (agents and collectors need none) is warned about
        once, and the process goes on: `fleetwatch topics create` creates them."""
        admin = await self._admin()
        try:
            existing = set(await admin.list_topics())
            wanted = {self.wire(name): spec for name, spec in self.specs.items() if update or self._uses(name)}
            if not update and set(wanted) <= existing:
                return []  # (a broker that is down now does not matter)
            factor, insync = replication(self.topic_settings, len((await admin.describe_cluster())["brokers"]))
            new = [NewTopic(topic, spec.partitions, factor, topic_configs=self.topic_configs(spec, insync))
                   for topic, spec in wanted.items() if topic not in existing]
            done: list[str] = []
            refused: list[tuple[str, str]] = []
            if new:
                response = await admin.create_topics(new)
                for topic, code, *message in response.topic_errors:
                    error = for_code(code)
                    if code == 0:
                        spec = wanted[topic]
                        done.append(f"created {topic}: {spec.partitions} partition{'s' * (spec.partitions != 1)}, "
                                    f"replication factor {factor}, "
                                    f"min.insync.replicas {insync}")
                    elif error is TopicAlreadyExistsError:
                        existing.add(topic)  # another process created it first
                    elif error in (TopicAuthorizationFailedError, ClusterAuthorizationFailedError):
                        refused.append((topic, error.message))
                    else:
                        raise ConfigError(f"Kafka at {self.bootstrap} refused to create topic {topic}: {error.message}"
                                          f"{f' ({message[0]})' if message and message[0] else ''}")
            if refused:
                log.warning("not allowed to create the topics %s on Kafka at %s (%s): going on without; create them "
                            "once with `fleetwatch topics create` as a user with the Create right, or set "
                            "kafka.create_topics = false", ", ".join(t for t, _ in refused), self.bootstrap,
                            refused[0][1])
                done += [f"not created {topic}: {why}" for topic, why in refused]
            if update:
                done += await self._update_topics(admin, {t: wanted[t] for t in sorted(existing & set(wanted))},
                                                  factor, insync)
            return done
        finally:
            await admin.close()

    def _uses(self, topic: str) -> bool:
        return self.used is None or topic in self.used

    async def check_topics(self) -> list[str]:
        """kafka.create_topics = false: reach the brokers and warn about missing topics (a
        producer waits for them, a consumer reads nothing of them)."""
        admin = await self._admin()
        try:
            existing = set(await admin.list_topics())
        finally:
            await admin.close()
        missing = [self.wire(name) for name in self.specs if self._uses(name) and self.wire(name) not in existing]
        if missing:
            log.warning("topics %s do not exist on Kafka at %s and kafka.create_topics = false: run `fleetwatch topics "
                        "create` once; until then what goes to them waits", ", ".join(missing), self.bootstrap)
        return missing

    async def _update_topics(self, admin: AIOKafkaAdminClient, topics: dict[str, TopicSpec], factor: int,
                             insync: int) -> list[str]:
        """Set retention, cleanup policy and min.insync.replicas of existing topics to what a
        new one would get (other topic configs stay). Partitions and replicas are only
        reported: adding partitions would move keys, replicas move with kafka-reassign-partitions."""
        if not topics:
            return []
        described = {d["topic"]: d for d in await admin.describe_topics(list(topics))}
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
        current: dict[str, dict[str, str]] = {}
        overrides: dict[str, dict[str, str]] = {}
        for response in responses:
            for code, message, _, name, entries in response.resources:
                if code:
                    raise ConfigError(f"Kafka at {self.bootstrap}: cannot read the configs of topic {name}: "
                                      f"{for_code(code).message} {message or ''}".rstrip())
                current[name] = {e[0]: e[1] for e in entries}
                # v0: is_default; v1+: config_source, 1 = set on the topic
                overrides[name] = {e[0]: e[1] for e in entries
                                   if (not e[3] if response.API_VERSION == 0 else e[3] == 1)}
        out, alter = [], []
        for topic, spec in topics.items():
            partitions = described[topic]["partitions"]
            replicas = min((len(p["replicas"]) for p in partitions), default=0)
            notes = []
            if len(partitions) != spec.partitions:
                notes.append(f"{len(partitions)} partitions, not {spec.partitions} (left as they are: more "
                             f"partitions would move keys)")
            # min.insync.replicas above the topic's replicas would refuse every write
            want = self.topic_configs(spec, min(insync, replicas) if replicas < factor else insync)
            if replicas < factor:
                notes.append(f"replication factor {replicas}, not {factor}: add replicas with "
                             f"kafka-reassign-partitions, then run this again")
            changed = {k: v for k, v in want.items() if current[topic].get(k) != v}
            if changed:
                alter.append(ConfigResource(ConfigResourceType.TOPIC, topic, {**overrides[topic], **want}))
                notes.insert(0, "updated " + ", ".join(f"{k} {current[topic].get(k)} -> {v}"
                                                        for k, v in changed.items()))
            out.append(f"exists {topic}: " + ("; ".join(notes) if notes else "up to date"))
        if alter:
            for response in await admin.alter_configs(alter):
                for code, message, _, name in response.resources:
                    if code:
                        raise ConfigError(f"Kafka at {self.bootstrap} refused to change the configs of topic {name}: "
                                          f"{for_code(code).message} {message or ''}".rstrip())
        return out

    def record(self, message: Message) -> tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]:
        """(topic on the cluster, value, key, headers) of a message, as the producers send it."""
        value, headers = encode(message.value)
        headers += [(k, v.encode()) for k, v in message.headers.items()]
        return self.wire(message.topic), value, message.key.encode() if message.key else None, headers

    async def publish(self, message: Message, partition: int | None = None) -> None:
        if self.failed is not None:
            raise self.failed
        topic, value, key, headers = self.record(message)
        await self._room.wait()
        if self.failed is not None:
            raise self.failed
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
            except UnknownTopicOrPartitionError:  # (not in the metadata yet: a topic being created)
                await asyncio.sleep(1.0)
                continue
            except Exception as e:  # the producer cannot go on: the process ends, and its supervisor starts it again
                self.failed = self.failed or (refused(self, e, f"a write to {topic}") if isinstance(e, _REFUSED) else
                                              Unavailable(f"the Kafka producer to {self.bootstrap} stopped "
                                                          f"({type(e).__name__}: {e}): the process ends, so that "
                                                          f"its supervisor starts it afresh"))
                log.error("%s", self.failed)
                self._room.set()  # a publish waiting for room raises it now
                return
            finally:
                self._sending_since = None
            self._outbox.popleft()
            self._outbox_bytes -= len(value)
            if self._outbox_bytes < self.outbox_limit:
                self._room.set()
            self._in_flight.append(delivery)
            delivery.add_done_callback(functools.partial(self._delivered, topic))
            if len(self._in_flight) >= 10_000:  # keep the list short; failures are counted
                self._check(d for d in self._in_flight if d.done())
                self._in_flight = [d for d in self._in_flight if not d.done()]

    async def dead_letter(self, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        """One message on the dead-letter topic, acknowledged before it returns."""
        try:
            await self.producer.send_and_wait(self.wire(DEAD_LETTER), value, key=key, headers=headers)
        except _REFUSED as e:
            raise refused(self, e, f"a write to {self.wire(DEAD_LETTER)}") from None

    def _delivered(self, topic: str, delivery: asyncio.Future) -> None:
        """A write the broker refused for want of a right: the next publish raises it (a source had
        gone on publishing, every message failing, counted only)."""
        e = None if delivery.cancelled() else delivery.exception()
        if isinstance(e, _REFUSED) and self.failed is None:
            self.failed = refused(self, e, f"a write to {topic}")

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
                with contextlib.suppress(Exception):  # (a partition revoked meanwhile: AssertionError)
                    end = consumer.last_stable_offset(tp)
                    end = consumer.highwater(tp) if end is None else end
                    if end is not None:
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
        failed = [d.exception() for d in deliveries if d.exception() is not None]  # (a refusal: _delivered's)
        if failed and self.delivery_failures == 0:
            log.error("Kafka rejected messages (not retriable): %r; counted as delivery failures", failed[0])
        self.delivery_failures += len(failed)
        return failed

    async def flush(self) -> None:
        """Wait until everything published is acknowledged by the broker (acks=all);
        raise if any of it was not, so that the caller does not commit its input."""
        while self._outbox:
            if self.failed is not None:
                raise self.failed
            if self._pump_task is None or self._pump_task.done():
                raise RuntimeError("the Kafka producer task is not running")
            await asyncio.sleep(0.01)
        in_flight, self._in_flight = self._in_flight, []
        await asyncio.gather(*in_flight, return_exceptions=True)
        failed = self._check(in_flight)
        if self.failed is not None:
            raise self.failed
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(in_flight)} messages were not delivered to Kafka: {failed[0]!r}")

    def subscribe(self, topics: list[Topic], group: str, transactional: bool = False,
                  align: bool = False, upstream: tuple[str, list[Topic]] | None = None) -> KafkaSubscription:
        sub = KafkaSubscription(self, topics, group, transactional, align, upstream)
        self.subscriptions.append(sub)
        return sub

    def listen(self, topic: Topic, keys: list[str], since_s: float = 0.0) -> "KafkaListener":
        """A reader of what is published on `topic` from now on, in the partitions of `keys`
        only (an agent: its rack's power caps; none: every partition), outside any group:
        it commits nothing. With `since_s`, from the first record of that long ago (by the
        records' timestamps: the alerts still firing when the power role starts)."""
        listener = KafkaListener(self, topic, keys, since_s)
        self.listeners.append(listener)
        return listener

    async def read_latest(self, topic: Topic, partitions: set[int], key=None) -> dict[int, Message]:
        """The last committed message of each of the topic's `partitions` (a compacted
        topic's latest state), read from the beginning up to the last stable offset; with
        `key(partition)`, the last one of that key (several states share a partition)."""
        if not partitions:
            return {}
        reader = AIOKafkaConsumer(client_id=f"{self.client_id}-restore", isolation_level="read_committed",
                                  enable_auto_commit=False, **_FETCH, **self.client_settings)
        await reader.start()
        latest: dict[int, Message] = {}
        skipped = 0
        try:
            tps = [TopicPartition(self.wire(topic), p) for p in sorted(partitions)]
            reader.assign(tps)
            await reader.seek_to_beginning(*tps)
            ends = await reader.end_offsets(tps)
            while any([await reader.position(tp) < ends[tp] for tp in tps]):
                for tp, records in (await reader.getmany(timeout_ms=1000)).items():
                    for rec in records:
                        if key is not None and rec.key != key(tp.partition).encode():
                            continue
                        try:
                            latest[tp.partition] = Message(topic, self.decoder.decode(rec.value, rec.headers),
                                                           partition=tp.partition, offset=rec.offset)
                        except DecodeError as e:
                            if not skipped:
                                log.warning("%s[%d]@%d does not decode (%s): skipped (and any more, counted at "
                                            "the end)", rec.topic, rec.partition, rec.offset, e.reason)
                            skipped += 1
        finally:
            await reader.stop()
        if skipped > 1:
            log.warning("%s: %d messages did not decode, skipped", self.wire(topic), skipped)
        return latest

    async def end(self, topics: list[Topic]) -> None:
        await self.flush()
        # Only this process's topics: asking about another's would create it with the broker's defaults
        # where auto-creation is on, or be refused to a user with only its roles' rights.
        self.end_offsets.update(await self.ends([t for t in topics if self._uses(t)]))

    async def partitions(self, topics: list[Topic]) -> list[TopicPartition]:
        """Every partition of `topics`, as the cluster has them now."""
        admin = await self._admin()
        try:
            described = await admin.describe_topics([self.wire(t) for t in topics])
            return [TopicPartition(d["topic"], p["partition"]) for d in described for p in d["partitions"]]
        finally:
            await admin.close()

    async def ends(self, topics: list[Topic]) -> dict[TopicPartition, int]:
        """The end offset of every partition of `topics`: past every record written so far
        (the high watermark; an open transaction's records included)."""
        probe = AIOKafkaConsumer(client_id=f"{self.client_id}-end", **self.client_settings)
        await probe.start()
        try:
            return await probe.end_offsets(await self.partitions(topics))
        finally:
            await probe.stop()

    def partition_count(self, topic: Topic, found: set[int] | None = None) -> int:
        """How many partitions `topic` has on the cluster: a key's partition (bus/keys.py:
        partition_for) is murmur2 modulo it, as the producer's partitioner places it with the
        cluster's metadata. `found`, the partitions a client's metadata has; else the producer's
        metadata; else the count when the bus started; else (no metadata: the topic is not
        there yet) kafka.partitions, what it will be created with. A count that differs from
        kafka.partitions (a topic created with another, or given more partitions) is logged once."""
        configured = self.specs[topic].partitions
        found = found or self.producer.client.cluster.partitions_for_topic(self.wire(topic))
        count = len(found) if found else self._counts.get(topic)
        if count is None:
            return configured
        if count != configured and topic not in self._count_noted:
            self._count_noted.add(topic)
            log.warning("%s has %d partitions on Kafka at %s, kafka.partitions says %d: keys are placed by the "
                        "cluster's count (set kafka.partitions to %d to match)", self.wire(topic), count,
                        self.bootstrap, configured, count)
        return count

    def wire(self, topic: str) -> str:
        """The topic's name on the cluster (a prefix lets several fleets share one)."""
        return f"{self.prefix}{topic}"

    def wire_group(self, group: str) -> str:
        """A consumer group's id on the cluster, and the start of its transactional ids:
        kafka.topic_prefix, then fleetwatch. (like the topics: one prefixed ACL covers all)."""
        return f"{self.prefix}{GROUP_PREFIX}{group}"

    async def close(self) -> None:
        for sub in self.subscriptions:
            await sub.close()
        for task in (self._pump_task, self._watch_task):
            if task is not None:
                task.cancel()
        await self.producer.stop()


def received(topic: Topic, value, rec) -> Message:
    """A consumed record as a Message: its key and headers as text whatever another producer sent (a
    binary key, a header whose value is null, which Kafka allows, had raised out of the consumer)."""
    return Message(topic, value, rec.key.decode(errors="replace") if rec.key else None,
                   {k: v.decode(errors="replace") for k, v in rec.headers or () if v is not None},
                   rec.partition, rec.offset)


class KafkaListener:
    """`KafkaBus.listen`: the partitions of some keys of one topic, from their end when it
    starts, read by a consumer of no group (commands: what was sent before it listened is
    stale, the sender repeats what still holds)."""

    holds_input = False

    def __init__(self, bus: KafkaBus, topic: Topic, keys: list[str], since_s: float = 0.0) -> None:
        self.bus, self.topic, self.keys, self.since_s = bus, topic, keys, since_s
        self.consumer: AIOKafkaConsumer | None = None
        self.count = 0  # the topic's partitions, as its keys were placed on them (bus/keys.py)
        self.group = f"listen:{topic.value}"  # (no consumer group: the name its counts go by)
        self.dead_letters = 0

    async def _start(self) -> None:
        consumer = AIOKafkaConsumer(client_id=f"{self.bus.client_id}-listen", isolation_level="read_committed",
                                    enable_auto_commit=False, **_FETCH, **self.bus.client_settings)
        _back_off_metadata(consumer._client)
        await consumer.start()
        wire = self.bus.wire(self.topic)
        try:
            await consumer._client.set_topics([wire])  # the topic's metadata, fetched now
            await self._assign(consumer, self.bus.partition_count(self.topic, consumer.partitions_for_topic(wire)),
                               self.since_s)
        except BaseException as e:
            await consumer.stop()
            if isinstance(e, _REFUSED):
                raise refused(self.bus, e, f"reading {wire}") from None
            raise
        self.consumer = consumer

    async def _assign(self, consumer: AIOKafkaConsumer, count: int, since_s: float = 0.0) -> None:
        """Listen to the partitions of the keys over `count` partitions (the producers place a
        key by the cluster's count: KafkaBus.partition_count), from their end (or from
        `since_s` ago: once, when the listener starts)."""
        from pipeline.bus.keys import partition_for
        self.count = count
        tps = sorted({TopicPartition(self.bus.wire(self.topic), p) for p in
                      ({partition_for(k, count) for k in self.keys} if self.keys else range(count))})
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        if since_s > 0 and tps:
            found = await consumer.offsets_for_times({tp: int((time.time() - since_s) * 1000) for tp in tps})
            for tp, at in found.items():
                if at is not None:  # (none: nothing that recent there, the end stands)
                    consumer.seek(tp, at.offset)
        for tp in tps:  # resolved now: what is sent from here on is read
            await consumer.position(tp)

    async def get_batch(self, max_messages: int = 256, timeout_s: float | None = None) -> list[Message]:
        if self.consumer is None:
            await self._start()
        found = self.consumer.partitions_for_topic(self.bus.wire(self.topic))  # refreshed every few minutes
        if found and len(found) != self.count:  # partitions added (or the topic was not there): keys moved
            log.warning("%s has %d partitions now, not %d: listening to the partitions of %s again",
                        self.bus.wire(self.topic), len(found), self.count, ", ".join(self.keys) or "every key")
            await self._assign(self.consumer, self.bus.partition_count(self.topic, found))
        records = await _getmany(self.bus, self.consumer, timeout_s, max_messages,
                                 f"reading {self.bus.wire(self.topic)}")
        out = []
        for tp, batch in records.items():
            for rec in batch:
                try:
                    value = self.bus.decoder.decode(rec.value, rec.headers)
                except DecodeError as e:
                    self._undecodable(rec, e.reason)
                    continue
                out.append(received(self.topic, value, rec))
        return out

    def _undecodable(self, rec, reason: str) -> None:
        """Skipped, counted (fleetwatch_dead_letters_total, group `listen:<topic>`) and logged once: a
        foreign producer's records had logged a line each, on every agent. A listener writes no dead
        letters (a node's Kafka user may not)."""
        if self.dead_letters == 0:
            log.warning("%s: message %s[%d]@%d does not decode (%s): skipped; further ones are counted "
                        "(fleetwatch_dead_letters_total), not logged", self.group, rec.topic, rec.partition,
                        rec.offset, reason)
        self.dead_letters += 1
        self.bus.dead_letters += 1

    async def close(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None
