"""Event-time alignment of what a consumer reads, per partition.

A rack's GPU telemetry, events and facility readings travel on one partition number of
three topics (bus/keys.py), and Kafka may hand one topic's partition over far ahead of
another's: after a restart, under lag, or when a producer is faster than the consumer.
Detection needs them in the order they happened: an XID before the missing scrapes it
explains, a coolant alert before the GPU temperatures it explains. The site tier has
the same need one level up: a site's rack summaries come from several rack-tier
partitions (header `fw-origin`), each in time order, and a rack is judged against the
others at the same time.

So a consumer holds each partition's messages in a queue per source (a topic, or an
origin) and releases them in timestamp order (a tie in source order, as one process
sees a tick), a message only once every other source of its partition has a later
message waiting, or has been read to its end (its watermark has passed; an origin's
tier has also committed all its own input, bus/kafka.py), or, for origins, has sent
nothing for `idle_s` (the bound for a rack-tier partition whose input no process gets
through). A held message is not committed: a crash reads it again.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable, Hashable, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.bus.base import Message, Topic

log = logging.getLogger("fleetwatch")

HOLD_LIMIT = 100_000  # messages held at most: past it the oldest go on (a source that never catches up)
ORIGIN = "fw-origin"  # header: the rack-tier partition a rack summary comes from


def start_time(batch: pa.RecordBatch) -> int:
    """The batch's earliest `ts`, in its unit (0 for a batch without one)."""
    if "ts" not in batch.schema.names or batch.num_rows == 0:
        return 0
    first = pc.min(batch.column("ts").view(pa.int64())).as_py()
    return 0 if first is None else first


class Aligner:
    """`topics`: the sources where they are the topics read (their order breaks ties);
    with `by_origin`, a single topic whose sources are the `fw-origin` headers, which
    stop being waited for once read to their end, or after `idle_s` (wall clock) without
    a message."""

    def __init__(self, topics: list[Topic], by_origin: bool = False, idle_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.topics = list(topics)
        self.by_origin = by_origin
        self.idle_s, self.clock = idle_s, clock
        self.rank = {t: i for i, t in enumerate(topics)}
        self.queues: dict[int, dict[Hashable, collections.deque]] = {}
        self.last_heard: dict[tuple[int, Hashable], float] = {}  # (partition, origin) -> when
        self.gone: set[tuple[int, Hashable]] = set()  # (partition, origin) idle since it was logged
        self.maybe: set[tuple[int, Hashable]] = set()  # (partition, origin) expected, never heard: maybe not ours
        self.held = 0
        self._turn = 0  # which partition a limited release starts at (each in turn)
        self.cut_short = False  # the last release stopped at its limit: more may be releasable now

    def expect(self, partition: int, sources: Iterable[Hashable], maybe: bool = False) -> None:
        """Sources a partition's messages come from, known before they send (an assigned
        site-tier partition: the origins of the racks its checkpoint holds). Each is waited
        for as one that has sent, from now: else the first messages read after a hand-over
        would go on past an origin that sends nothing yet (one whose rack tier is being
        taken over) and later sends what came earlier. `maybe`: sources that may send
        nothing here at all (a cold start's every origin): given up without a warning."""
        by_source = self.queues.setdefault(partition, {})
        now = self.clock()
        for source in sources:
            by_source.setdefault(source, collections.deque())
            self.last_heard[(partition, source)] = now
            if maybe:
                self.maybe.add((partition, source))

    def _source(self, m: Message) -> Hashable:
        return m.headers.get(ORIGIN, "") if self.by_origin else m.topic

    def add(self, messages: list[Message]) -> None:
        now = self.clock()
        for m in messages:
            by_source = self.queues.setdefault(m.partition, {} if self.by_origin else
                                               {t: collections.deque() for t in self.topics})
            source = self._source(m)
            rank = source if self.by_origin else self.rank[m.topic]
            by_source.setdefault(source, collections.deque()).append((start_time(m.value), str(rank), m))
            if self.by_origin:
                self.last_heard[(m.partition, source)] = now
                self.gone.discard((m.partition, source))
                self.maybe.discard((m.partition, source))
            self.held += 1

    def waiting_on(self) -> set[tuple[Hashable, int]]:
        """(source, partition) with a source that holds nothing while another source of the
        partition holds messages: whether it is read to its end decides what can go (an
        origin: its own tier has committed all its input, so that everything it will send
        for it is visible, and the partition is read to its end after that)."""
        return {(source, p) for p, by_source in self.queues.items() if any(by_source.values())
                for source, q in by_source.items() if not q}

    def _blocks(self, p: int, source: Hashable, now: float, read_to_end: Callable[[Hashable, int], bool]) -> bool:
        """An empty source that may still send something earlier than what the others hold."""
        if read_to_end(source, p):
            return False
        if not self.by_origin:
            return True
        if now - self.last_heard.get((p, source), -1e18) < self.idle_s:
            return True
        if (p, source) not in self.gone:
            self.gone.add((p, source))
            if (p, source) in self.maybe:
                return False
            log.warning("partition %d: nothing from origin %s for %.0f s; what the others sent goes on without it "
                        "(no process has got through its rack-tier partition's input since)", p, source, self.idle_s)
        return False

    def release(self, read_to_end: Callable[[Hashable, int], bool], everything: bool = False,
                limit: int | None = None) -> list[Message]:
        """Every message that no other source of its partition can still precede, in
        order per partition. `read_to_end(source, partition)`: nothing more to read there now.
        With `limit`, at most that many (the consumer's paced batch: a backlog held while one
        topic was fetched ahead goes in batches of that size too), starting at each partition
        in turn; the rest stay held."""
        out: list[Message] = []
        now = self.clock()
        parts = list(self.queues.items())
        if limit is not None and parts:
            start, self._turn = self._turn % len(parts), self._turn + 1
            parts = parts[start:] + parts[:start]
        for p, by_source in parts:
            while limit is None or len(out) < limit:
                heads = [q[0] for q in by_source.values() if q]
                if not heads:
                    break
                head = min(heads, key=lambda h: (h[0], h[1]))
                waiting = [s for s, q in by_source.items() if not q and self._blocks(p, s, now, read_to_end)]
                if waiting and self.held <= HOLD_LIMIT and not everything:
                    break
                by_source[self._source(head[2])].popleft()
                self.held -= 1
                out.append(head[2])
        self.cut_short = limit is not None and len(out) >= limit
        return out

    def drain(self, limit: int | None = None) -> list[Message]:
        """Everything held (or the first `limit` of it), in order: the stream ended."""
        return self.release(lambda t, p: True, everything=True, limit=limit)

    def holding(self, topic: Topic, partition: int) -> int | None:
        """Offset of the first message held of a topic's partition (None: none held)."""
        offsets = [q[0][2].offset for q in self.queues.get(partition, {}).values()
                   if q and q[0][2].topic == topic]
        return min(offsets) if offsets else None

    def drop(self, partitions: set[int]) -> None:
        """Forget what is held of these partitions (they moved: the next owner reads them)."""
        for p in partitions:
            for q in self.queues.pop(p, {}).values():
                self.held -= len(q)
        self.last_heard = {k: t for k, t in self.last_heard.items() if k[0] not in partitions}
        self.gone = {k for k in self.gone if k[0] not in partitions}
        self.maybe = {k for k in self.maybe if k[0] not in partitions}
