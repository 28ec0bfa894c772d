"""In-process bus: the embedded default. Batches pass by reference (no copies, no
encoding); bounded queues give backpressure so a slow consumer slows the producer
instead of growing memory. Every consumer sees the same batch object (the content
checks run once for all of them: bus/intake.py ScreenOnce)."""

from __future__ import annotations

import asyncio

from pipeline.bus.base import EndOfStream, Message, Topic

_END = None  # sentinel put on a queue when one of its topics ends


class MemorySubscription:
    def __init__(self, bus: "MemoryBus", topics: list[Topic], maxsize: int) -> None:
        self.bus = bus
        self.topics = set(topics)
        self.queue: asyncio.Queue[Message | None] = asyncio.Queue(maxsize)
        self._open = len(self.topics)
        self.on_assigned: list = []    # one consumer per group: everything is ours from the start
        self.before_revoke: list = []  # and nothing is ever revoked
        self.assignments = 1
        self.holds_input = False  # a batch not taken is gone: nothing to pause on
        self.ready: set[int] = set()  # (no partitions)

    async def get_batch(self, max_messages: int = 256, timeout_s: float | None = None) -> list[Message]:
        if self._open == 0 and self.queue.empty():
            raise EndOfStream
        try:  # (asyncio.timeout, not wait_for: 3.11's wait_for loses a cancel that meets a message)
            async with asyncio.timeout(timeout_s or None):
                first = await self.queue.get()
        except TimeoutError:
            return []
        out: list[Message] = []
        item = first
        while True:
            if item is _END:
                self._open -= 1
            else:
                out.append(item)
            if len(out) >= max_messages or self.queue.empty():
                break
            item = self.queue.get_nowait()
        if not out and self._open == 0:
            raise EndOfStream
        return out

    async def publish(self, message: Message, partition: int | None = None, origin: int | None = None) -> None:
        """(`origin`: over Kafka the input partition whose transaction carries it; in-process none.)"""
        await self.bus.publish(message)

    async def commit(self) -> None:
        """Nothing to do: in-process delivery has no offsets to remember."""

    def pause(self) -> None:
        """Nothing to pause on: the producer waits on the bounded queue instead."""

    def resume(self) -> None:
        """See pause()."""

    def expect(self, partition: int, origins: set[int], maybe: bool = False) -> None:
        """One consumer sees every message in publish order: nothing to wait for."""

    def forget(self, partitions: set[int]) -> None:
        """No partitions, nothing committed."""

    async def held_still(self, partitions: set[int]) -> set[int]:
        """One consumer: nothing is ever taken from it."""
        return set(partitions)

    async def close(self) -> None:
        """Nothing more is delivered to it (a listener whose reader stopped must not fill up and
        hold its publishers)."""
        self.bus.unsubscribe(self)


class MemoryBus:
    keyed = False  # one consumer per group sees every message in publish order: no keys needed
    dead_letters = 0  # batches pass by reference: nothing to decode, nothing undecodable

    def __init__(self, queue_size: int = 8192) -> None:
        self._queue_size = queue_size
        self._subs: dict[tuple[Topic, str], MemorySubscription] = {}
        self._listeners = 0

    async def start(self) -> None:
        """Nothing to connect to."""

    async def flush(self) -> None:
        """Published means delivered: nothing is buffered."""

    async def close(self) -> None:
        """Nothing to release."""

    def subscribe(self, topics: list[Topic], group: str) -> MemorySubscription:
        """One subscription per group: in-process there is one consumer per group."""
        sub = MemorySubscription(self, topics, self._queue_size)
        for t in topics:
            if (t, group) in self._subs:
                raise ValueError(f"group {group!r} already subscribes to {t}")
            self._subs[(t, group)] = sub
        return sub

    def listen(self, topic: Topic, keys: list[str], since_s: float = 0.0) -> MemorySubscription:
        """What is published on `topic` from now on (in-process every key is in reach, and
        nothing was published before the process: `since_s` finds nothing): a subscription of
        its own, ended with the topic."""
        self._listeners += 1
        return self.subscribe([topic], f"listen-{self._listeners}")

    def unsubscribe(self, sub: MemorySubscription) -> None:
        self._subs = {k: s for k, s in self._subs.items() if s is not sub}

    async def publish(self, message: Message) -> None:
        for (topic, _), sub in self._subs.items():
            if topic == message.topic:
                await sub.queue.put(message)

    async def end(self, topics: list[Topic]) -> None:
        for (topic, _), sub in self._subs.items():
            if topic in topics:
                await sub.queue.put(_END)
