"""The one place that decides the key of every record a producer puts on the bus.

A key places a message on a Kafka partition (the same partition Kafka's default
partitioner picks: `partition_for`), so everything of one key stays in order, and
records that must meet in one detect process share a key:

  GPU telemetry, events, node health   by node
  facility readings                    by rack (site-level devices, rack "": by site)
  alerts                               by fingerprint (an alert's changes stay in order)
  detector checkpoints                 by partition (the partition they are the state of)
  fault labels                         unkeyed (the simulator's ground truth, one message)

`messages(topic, batch, keyed)` cuts a batch into one message per key on a keyed bus
(Kafka); in-process, where order needs no keys, the batch is one message. The
detector's checkpoint (detect/checkpoint.py) uses `partition_for` to know which
partition owns a node's or a rack's state. No Kafka client is imported here.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.bus.base import Message, Topic
from pipeline.bus.batching import split_by

KEY_COLUMN = {Topic.GPU: "node", Topic.EVENTS: "node", Topic.HEALTH: "node", Topic.ALERTS: "fingerprint"}


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (as the Java client and aiokafka compute it), as an unsigned 32-bit int."""
    length = len(data)
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = (data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24)
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    rest, tail = length % 4, length - length % 4
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as the Java client) gives a key."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def checkpoint_key(partition: int) -> str:
    """The key of a partition's detector checkpoint on the state topic."""
    return str(partition)


def facility_keys(batch: pa.RecordBatch) -> pa.Array:
    """A facility reading's key: its rack, or its site where it has no rack."""
    return pc.if_else(pc.equal(batch.column("rack"), ""), batch.column("site"), batch.column("rack"))


def messages(topic: Topic, batch: pa.RecordBatch, keyed: bool) -> list[Message]:
    """`batch` as the messages a producer publishes: one per run of its key on a keyed
    bus (rows of one key are contiguous in a scrape; zero-copy slices), one unkeyed
    message in-process or for a topic without a key."""
    if not keyed or topic not in KEY_COLUMN and topic != Topic.FACILITY:
        return [Message(topic, batch)]
    if topic != Topic.FACILITY:
        return split_by(topic, batch, KEY_COLUMN[topic])
    keys = facility_keys(batch)
    order = pc.sort_indices(keys)  # stable: each key's readings keep their order
    batch = batch.take(order).append_column("_key", keys.take(order))
    return [Message(m.topic, m.value.drop_columns(["_key"]), m.key) for m in split_by(Topic.FACILITY, batch, "_key")]
