"""What each role of this process has done, counted where the data passes anyway.

The hot path gains O(1) per batch: a source's batches pass its `emitter` (after the bus
took them), a consumer's pass its `reader` (after the intake screening), detect's batch
times go into one histogram. Each adds the rows per dataset, the metric values, the
newest timestamp, and marks the role's loop as turning (a heartbeat on the injected
clock). The detect role also keeps references to the latest GPU batches and the power
readings it read, for the fleet gauges rendered at scrape time (ops/metrics.py).

Everything else the metrics, the health checks and the self-alerts read is what the roles
count already (the archive's writer, the notifier, the gates, the engine): nothing here
copies it. Kafka consumer lag and broker reachability are sampled by the monitor
(ops/monitor.py), which awaits; they land in `lag` and `deps`.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.bus.batching import split_by
from pipeline.bus.base import Message, Topic
from pipeline.model import GPU_METRICS
from pipeline.roles import DATASET_OF_TOPIC

# Metric values a row of a dataset carries (a GPU sample one per metric column, a facility reading one).
VALUES_PER_ROW = {"gpu_samples": len(GPU_METRICS), "facility_samples": 1}
# The datasets whose newest timestamp is an event-time lag (telemetry arrives all the time;
# for events and alerts it would be the time since the last one).
TELEMETRY = ("gpu_samples", "facility_samples")
DETECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FLEET_STALE_S = 300.0  # a GPU or power reading older than this (not seen since) is no longer exposed
FACILITY_KEPT = 256    # facility batches kept between two scrapes (one of a simulated tick holds every point)


@dataclass
class RoleProgress:
    """One role's counters; `beat` and `first` are read by the health checks."""
    name: str
    consumer: bool
    rows: dict[str, int] = field(default_factory=dict)        # dataset -> rows produced or read
    values: int = 0                                            # metric values in those rows
    newest_ns: dict[str, int] = field(default_factory=dict)   # telemetry dataset -> newest timestamp seen (ns)
    beat: float | None = None     # clock() when its loop last turned (a batch emitted, or a read returned)
    emitting: float | None = None  # clock() since a source waits for the bus to take a batch (backpressure)
    first: float | None = None    # clock() of its first successful publish (source) or read (consumer)
    sub: Any = None               # a consumer's subscription (its backlog)

    def took(self, topic: Topic, batch: pa.RecordBatch) -> None:
        dataset = DATASET_OF_TOPIC.get(topic, str(topic))
        n = batch.num_rows
        self.rows[dataset] = self.rows.get(dataset, 0) + n
        self.values += n * VALUES_PER_ROW.get(dataset, 0)
        if n and dataset in TELEMETRY:
            # A batch is one scrape (one time) or readings in arrival order: its newest time is its
            # first or last row's (two scalars, not a pass over the column: the hot path).
            ts = batch.column("ts")
            newest = max(ts[0].value, ts[n - 1].value)
            if newest > self.newest_ns.get(dataset, -1):
                self.newest_ns[dataset] = newest

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


class FleetView:
    """The latest GPU and facility batches detect read, as references; rendered at scrape time.
    GPU batches cut per node, the latest of each (a message's key is its rack over Kafka, which every
    node of the rack shares: keyed by it, one node of a rack showed; a DCGM batch holds the targets
    that answered, a different set each time); facility
    batches as they came (the last FACILITY_KEPT), whose power readings (`power_w` of a rack's
    PDU or the site's meter) are taken per device when /metrics asks."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.gpu: dict[str, tuple[float, pa.RecordBatch]] = {}
        self.facility: collections.deque[tuple[float, pa.RecordBatch]] = collections.deque(maxlen=FACILITY_KEPT)
        self.power: dict[str, tuple[float, str, str, str, float]] = {}  # device -> (t, site, rack, class, W)

    def seen(self, message: Message) -> None:
        batch = message.value
        if not batch.num_rows:
            return
        if message.topic == Topic.GPU:
            now = self.clock()
            for part in split_by(Topic.GPU, batch, "node"):  # (zero-copy slices)
                self.gpu[part.key] = (now, part.value)
        elif message.topic == Topic.FACILITY:
            self.facility.append((self.clock(), batch))

    def gpu_batches(self) -> list[pa.RecordBatch]:
        """The live GPU batches, newest first (a GPU in two of them: the first one is its latest)."""
        now = self.clock()
        for key in [k for k, (t, _) in self.gpu.items() if now - t > FLEET_STALE_S]:
            del self.gpu[key]
        return [b for _, b in sorted(self.gpu.values(), key=lambda tb: -tb[0])]

    def power_readings(self) -> list[tuple[str, str, str, float]]:
        """(site, rack, device class, W) of each device's latest live power reading."""
        while self.facility:  # oldest first: a later reading of a device replaces an earlier one
            t, batch = self.facility.popleft()
            power = batch.filter(pc.equal(batch.column("metric"), "power_w"))
            if not power.num_rows:
                continue
            for site, rack, device, cls, value in zip(*(power.column(c).to_pylist() for c in (
                    "site", "rack", "device", "device_class", "value"))):
                if value is not None:
                    self.power[device] = (t, site, rack, cls, value)
        now = self.clock()
        return [(site, rack, cls, w) for t, site, rack, cls, w in self.power.values() if now - t <= FLEET_STALE_S]


class CountedReader:
    """A consumer's intake gate, counting what passes it (and for detect, keeping the fleet view)."""

    def __init__(self, gate, role: RoleProgress, clock: Callable[[], float], fleet: FleetView | None) -> None:
        self.gate, self.role, self.clock, self.fleet = gate, role, clock, fleet

    async def screen(self, messages: list[Message]) -> list[Message]:
        out = await self.gate.screen(messages)
        role, now = self.role, self.clock()
        for m in out:
            role.took(m.topic, m.value)
            if self.fleet is not None:
                self.fleet.seen(m)
        role.beat = now
        if role.first is None:
            role.first = now
        return out

    def __getattr__(self, name: str):
        return getattr(self.gate, name)


class Progress:
    """Every role's progress in this process (the Context holds one; see the module doc)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.roles: dict[str, RoleProgress] = {}
        self.fleet = FleetView(clock)
        self.detect_seconds: Any = None  # the detect batch histogram, made on first use
        self.lag: dict[tuple[str, str, int], int] = {}  # (group, topic, partition) -> messages (Kafka, sampled)
        self.deps: dict[str, bool] = {}                  # "kafka", "mqtt" -> reachable (sampled)

    def role(self, name: str, consumer: bool) -> RoleProgress:
        if name not in self.roles:
            self.roles[name] = RoleProgress(name, consumer)
        return self.roles[name]

    def emitter(self, name: str, emit: Callable[[Topic, pa.RecordBatch], Awaitable[None]]):
        """`emit` for the source `name`: counts each batch once the bus took it."""
        role, clock = self.role(name, consumer=False), self.clock

        async def counted(topic: Topic, batch: pa.RecordBatch) -> None:
            role.emitting = clock()
            try:
                await emit(topic, batch)
            finally:
                role.emitting = None
            role.took(topic, batch)
            role.beat = clock()
            if role.first is None:
                role.first = role.beat
        return counted

    def reader(self, name: str, gate, sub) -> CountedReader:
        """The intake gate of the consumer `name`, counting what it lets through."""
        role = self.role(name, consumer=True)
        role.sub = sub
        return CountedReader(gate, role, self.clock, self.fleet if name == "detect" else None)

    def detected(self, topic: str, seconds: float) -> None:
        """One batch through the detector took `seconds`."""
        if self.detect_seconds is None:
            from prometheus_client import Histogram
            self.detect_seconds = Histogram("fleetwatch_detect_batch_duration_seconds",
                                            "time to detect over one batch", ["topic"], registry=None,
                                            buckets=DETECT_BUCKETS)
        self.detect_seconds.labels(str(topic)).observe(seconds)
