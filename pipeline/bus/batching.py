"""Message shaping at the edges of the bus.

Producers send one message per key (a node's scrape, a rack's readings) so that
Kafka keeps each key's messages in order on one partition. Consumers put a run of
such messages back together into one batch, so detectors pay their per-batch cost
once per fleet tick rather than once per node.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.bus.base import Message, Topic


def split_by(topic: Topic, batch: pa.RecordBatch, column: str) -> list[Message]:
    """One message per run of equal values of `column` (rows of one key are contiguous
    in a scrape), keyed by that value; zero-copy slices."""
    if batch.num_rows == 0:
        return []
    runs = pc.run_end_encode(batch.column(column))
    ends = runs.run_ends.to_numpy()
    starts = np.concatenate([[0], ends[:-1]])
    return [Message(topic, batch.slice(int(s), int(e - s)), key=k)
            for s, e, k in zip(starts, ends, runs.values.to_pylist())]


BUNDLE = "fw-keys"  # header of a message that holds several keys' rows (keys.messages with partitions): them all


def message_keys(m: Message) -> list:
    """The keys whose rows a message holds: its key, or every key its BUNDLE header names."""
    bundle = m.headers.get(BUNDLE) if m.headers else None
    return bundle.split(",") if bundle is not None else [m.key]


def coalesce(messages: list[Message]) -> list[Message]:
    """Consecutive messages of one topic as one batch, as long as no key repeats: two
    scrapes of the same node (or rack) stay two evaluations, in order. A bundle
    (header fw-keys) counts as all of its keys."""
    out: list[Message] = []
    run: list[Message] = []
    keys: set[str] = set()

    def close_run() -> None:
        if run:
            value = run[0].value if len(run) == 1 else pa.concat_batches([m.value for m in run])
            out.append(Message(run[0].topic, value))
            run.clear()
            keys.clear()

    for m in messages:
        mine = message_keys(m)
        if run and (m.topic != run[0].topic or m.key is None or not keys.isdisjoint(mine)):
            close_run()
        run.append(m)
        if m.key is not None:
            keys.update(mine)
    close_run()
    return out


def coalesce_by_time(messages: list[Message]) -> list[Message]:
    """Consecutive messages of one topic and one earliest `ts` as one batch: the rack
    summaries of one tick, from several rack-tier partitions, judged together as one
    process judges them (detect/families/rack_vs_site.py)."""
    from pipeline.bus.align import start_time
    out: list[Message] = []
    for m in messages:
        if out and out[-1].topic == m.topic and start_time(out[-1].value) == start_time(m.value):
            out[-1] = Message(m.topic, pa.concat_batches([out[-1].value, m.value]))
        else:
            out.append(Message(m.topic, m.value))
    return out


class PacedBatches:
    """How many messages a consumer asks for next, so that processing one batch takes about
    `budget_s`. Over Kafka a batch is processed without a commit, inside one transaction per
    partition: one that outlasts the transaction timeout (10 s) fences the process, which then
    reads it all again. A process behind a backlog on a busy machine (4,096 messages at a few
    thousand GPU samples a second: 11-15 s) was fenced so, and one that stays that slow never
    gets through it. (The event loop turns between the engine's calls of a batch, so the
    group's heartbeats go on.) After a batch that took longer, the size is what the budget would have
    held at its pace; after a full one that took less than half of it, twice as many."""

    def __init__(self, largest: int = 4096, budget_s: float = 2.0, smallest: int = 16) -> None:
        self.largest, self.budget_s, self.smallest = largest, budget_s, smallest
        self.size = largest

    def took(self, n: int, seconds: float) -> None:
        """A batch of `n` messages took `seconds` to process."""
        if seconds > self.budget_s and n > self.smallest:
            self.size = max(self.smallest, min(self.size, int(n * self.budget_s / seconds)))
        elif seconds < self.budget_s / 2 and n >= self.size:
            self.size = min(self.largest, 2 * self.size)
