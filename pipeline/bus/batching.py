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


def coalesce(messages: list[Message]) -> list[Message]:
    """Consecutive messages of one topic as one batch, as long as no key repeats: two
    scrapes of the same node stay two evaluations, in order."""
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
        if run and (m.topic != run[0].topic or m.key is None or m.key in keys):
            close_run()
        run.append(m)
        if m.key is not None:
            keys.add(m.key)
    close_run()
    return out
