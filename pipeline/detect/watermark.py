"""Event time: when the data say it is, per partition of the bus, not when they arrived.

A rack's records travel in one Kafka partition (bus/keys.py), and within it they arrive
in about the order they were taken. A partition's clock is the latest sample time seen
in it; its watermark trails the clock by the lateness bound (`detect.lateness_s`). A node
or GPU is missing only once the watermark has passed its last sample by its reporting
intervals, so data delayed by less than the bound (an agent's slow scrape, a topic read
behind another, an XID sent after the scrapes it explains) arrive before anyone is
judged missing. A row more than the bound older than its own series' newest (a GPU's,
a facility point's) is late: counted, archived by the archive (which reads every row),
and not used for detection, whose state it would move back in time. (Per series, not
per partition: one node whose clock runs ahead must not make its neighbours late.)

One process reads one stream, in order: there every partition's clock is the newest
sample of the whole stream (`one_stream`), which is what each partition's clock is
over Kafka while its racks report, and which still moves on when every rack of a
partition goes silent. Over Kafka a partition whose racks all go silent, facility
readings included, has no clock to judge them by (docs/kafka.md). Clocks are not
checkpointed: a process that takes a partition over starts its clock at the first
sample it reads there, and one that lets a partition go forgets its clocks (it may be
given the partition back after being fenced, to read again what it had read).
"""

from __future__ import annotations

import numpy as np

from pipeline.detect.state import SlotArrays


class Watermarks:
    """Per partition: the newest sample time seen (its clock)."""

    def __init__(self) -> None:
        self.arrays = SlotArrays({"clock": (np.float64, np.nan)})

    def advance(self, partition: np.ndarray, ts: np.ndarray) -> None:
        if partition.size:
            self.arrays.ensure(int(partition.max()) + 1)
            np.fmax.at(self.arrays.clock, partition, ts)

    def newest(self, partition: np.ndarray, one_stream: bool = False) -> np.ndarray:
        """Per entry: its partition's clock (NaN before the partition's first sample); with
        `one_stream`, the whole stream's. The watermark trails it by the lateness bound."""
        self.arrays.ensure(int(partition.max()) + 1 if partition.size else 0)
        clock = self.arrays.clock
        if one_stream and np.isfinite(clock).any():
            return np.full(partition.shape[0], np.nanmax(clock))
        return clock[partition]

    def forget(self, partitions: np.ndarray) -> None:
        """These partitions' clocks start again at the next sample read there."""
        if partitions.size:
            self.arrays.ensure(int(partitions.max()) + 1)
            self.arrays.reset(partitions, self.arrays.fields)


class SeriesClocks:
    """The newest sample time of each series (slot): what makes a row late."""

    def __init__(self, lateness_s: float) -> None:
        self.lateness_s = lateness_s
        self.arrays = SlotArrays({"latest": (np.float64, -np.inf)})

    def late(self, slots: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Per row: more than the lateness bound older than its series' newest before this batch."""
        self.arrays.ensure(int(slots.max()) + 1 if slots.size else 0)
        return ts < self.arrays.latest[slots] - self.lateness_s

    def advance(self, slots: np.ndarray, ts: np.ndarray) -> None:
        np.maximum.at(self.arrays.latest, slots, ts)

    def forget(self, slots: np.ndarray) -> None:
        """These series' clocks start again at their next sample."""
        self.arrays.ensure(int(slots.max()) + 1)
        self.arrays.reset(slots, self.arrays.fields)
