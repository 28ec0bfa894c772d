"""The one place that decides the key of every record a producer puts on the bus.

A key places a message on a Kafka partition (the same partition Kafka's default
partitioner picks: `partition_for`), so everything of one key stays in order, and
records that must meet in one detect process share a key. Every detector's inputs
are one rack's (its nodes' GPUs and events, its CDU and PDU) or one site's (the
racks against each other, the site meter), so:

  GPU telemetry, events, facility      by rack (site-level devices, rack "": by site)
  power caps and the agents' actions   by rack (an agent reads its rack's partition)
  rack summaries (the site tier)       by site
  power requests (the grid signal)     by site
  power request reports                by site
  node health                          by node (compacted to a node's latest state)
  alerts                               by fingerprint (an alert's changes stay in order)
  detector checkpoints                 by tier and partition (the partition they are the state of)
  fault labels                         unkeyed (the simulator's ground truth, one message)

`messages(topic, batch, keyed)` cuts a batch into one message per key on a keyed bus
(Kafka); in-process, where order needs no keys, the batch is one message. With
`partitions` (kafka.partitions: what sources pass), a rack-keyed batch becomes one message
per partition instead, holding every rack that lands there: the same placement and order
per rack, for a few messages per scrape instead of one per rack (a consumer's cost is
mostly per message). Its key is its first rack's; header `fw-keys` names them all, so
that batching.coalesce never joins two scrapes of one rack. The
detector's checkpoint (detect/checkpoint.py) uses `partition_for` to know which
partition owns a node's or a rack's state. No Kafka client is imported here.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.bus.base import Message, Topic
from pipeline.bus.batching import BUNDLE, split_by

KEY_COLUMN = {Topic.HEALTH: "node", Topic.ALERTS: "fingerprint", Topic.RACKS: "site", Topic.POWER_REQUESTS: "site",
              Topic.POWER_REPORTS: "site", Topic.REMEDIATION: "node"}
BY_RACK = (Topic.GPU, Topic.EVENTS, Topic.FACILITY, Topic.POWER_CAPS, Topic.POWER_ACTIONS)  # keyed by rack_keys


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


@functools.lru_cache(maxsize=1 << 20)  # a fleet's racks, sites and nodes: hashed once per process
def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as the Java client) gives a key."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def rack_key(site: str | None, rack: str | None) -> str:
    """One record's rack_keys: its rack, or its site where it has no rack."""
    return rack or site or ""


def origins(racks: list[tuple[str, str]], partition: int, site_partitions: int, rack_partitions: int) -> set[int]:
    """The rack-tier partitions whose summaries a site-tier `partition` reads (header
    `fw-origin`, bus/align.py): those holding the `racks` ((site, rack)) of its sites."""
    return {partition_for(rack_key(site, rack), rack_partitions) for site, rack in racks
            if partition_for(site, site_partitions) == partition}


def checkpoint_key(partition: int, tier: str = "rack") -> str:
    """The key of a partition's detector checkpoint on the state topic: the partition of
    the rack tier's input ("3"), or of the site tier's ("site-3"); both in that partition."""
    return str(partition) if tier == "rack" else f"{tier}-{partition}"


def rack_keys(batch: pa.RecordBatch) -> pa.Array:
    """The key of a rack's records: its rack, or its site where it has no rack (a site meter)."""
    return pc.if_else(pc.equal(batch.column("rack"), ""), batch.column("site"), batch.column("rack"))


def messages(topic: Topic, batch: pa.RecordBatch, keyed: bool, partitions: int = 0) -> list[Message]:
    """`batch` as the messages a producer publishes: one per run of its key on a keyed
    bus (rows of one key are contiguous in a scrape; zero-copy slices), one unkeyed
    message in-process or for a topic without a key. With `partitions`, a rack-keyed
    topic's rows go as one message per partition (see the module doc: `by_partition`)."""
    if not keyed or topic not in KEY_COLUMN and topic not in BY_RACK:
        return [Message(topic, batch)]
    if topic not in BY_RACK:
        return split_by(topic, batch, KEY_COLUMN[topic])
    keys = rack_keys(batch)
    if partitions:
        return by_partition(topic, batch, keys, partitions)
    order = pc.sort_indices(keys)  # stable: each key's rows keep their order
    batch = batch.take(order).append_column("_key", keys.take(order))
    return [Message(m.topic, m.value.drop_columns(["_key"]), m.key) for m in split_by(topic, batch, "_key")]


def by_partition(topic: Topic, batch: pa.RecordBatch, keys: pa.Array, partitions: int) -> list[Message]:
    """One message per partition of the rows' keys: its rows ordered by key (each key's rows
    in their order), keyed by its first key (which lands on that partition), header
    BUNDLE naming its keys."""
    if batch.num_rows == 0:
        return []
    names = sorted(pc.unique(keys).to_pylist())
    rank = pc.index_in(keys, pa.array(names, keys.type)).to_numpy()  # each row's key, as its place in `names`
    part = np.array([partition_for(k, partitions) for k in names], np.int64)[rank]
    order = np.lexsort((rank, part))  # by partition, then key; stable: a key's rows keep their order
    batch, rank, part = batch.take(pa.array(order)), rank[order], part[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(part)) + 1, [len(part)]])
    out = []
    for s, e in zip(starts[:-1], starts[1:]):
        mine = [names[i] for i in np.unique(rank[s:e])]
        out.append(Message(topic, batch.slice(int(s), int(e - s)), mine[0], {BUNDLE: ",".join(mine)}))
    return out
