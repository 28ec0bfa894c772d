"""Message shaping at the edges of the bus, without a broker: producers cut a batch into
one message per key (pipeline/bus/batching.py split_by, pipeline/bus/keys.py), consumers
put runs of messages back together (coalesce)."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.bus import Message, Topic
from pipeline.bus import keys
from pipeline.bus.batching import coalesce, split_by
from pipeline.model import (ALERT, CHECKPOINT, EVENT, FACILITY_SAMPLE, FAULT_LABEL, GPU_SAMPLE, NODE_HEALTH,
                            POWER_ACTION, POWER_CAP, POWER_REQUEST, POWER_REQUEST_REPORT, RACK_SUMMARY, REMEDIATION_EVENT,
                            WIRE_SCHEMAS)

ROWS = pa.schema([("node", pa.string()), ("i", pa.int64())])
SCHEMA_OF = {Topic.GPU: GPU_SAMPLE, Topic.FACILITY: FACILITY_SAMPLE, Topic.EVENTS: EVENT, Topic.ALERTS: ALERT,
             Topic.HEALTH: NODE_HEALTH, Topic.LABELS: FAULT_LABEL, Topic.STATE: CHECKPOINT, Topic.RACKS: RACK_SUMMARY,
             Topic.POWER_CAPS: POWER_CAP, Topic.POWER_ACTIONS: POWER_ACTION,
             Topic.POWER_REQUESTS: POWER_REQUEST, Topic.POWER_REPORTS: POWER_REQUEST_REPORT,
             Topic.REMEDIATION: REMEDIATION_EVENT}
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def rows(nodes: list[str], first: int = 0) -> pa.RecordBatch:
    """A batch with a key column and a row number, to see where each row went."""
    return pa.RecordBatch.from_pydict({"node": nodes, "i": list(range(first, first + len(nodes)))}, schema=ROWS)


def of_schema(schema: pa.Schema, **columns: list) -> pa.RecordBatch:
    """A batch of `schema` with the given columns and a neutral value in the others."""
    n = len(next(iter(columns.values())))

    def neutral(t: pa.DataType):
        if pa.types.is_boolean(t):
            return False
        if pa.types.is_string(t):
            return "x"
        if pa.types.is_timestamp(t):
            return T0
        return 0
    arrays = [pa.array(columns[f.name] if f.name in columns else [neutral(f.type)] * n, type=f.type) for f in schema]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def concat(messages: list[Message]) -> pa.Table:
    return pa.Table.from_batches([m.value for m in messages], schema=ROWS)


# split_by

def test_split_by_gives_one_message_per_run_keyed_by_its_value():
    batch = rows(["a", "a", "b", "c", "c", "c"])
    out = split_by(Topic.GPU, batch, "node")
    assert [(m.topic, m.key, m.value.column("i").to_pylist()) for m in out] == [
        (Topic.GPU, "a", [0, 1]), (Topic.GPU, "b", [2]), (Topic.GPU, "c", [3, 4, 5])]


def test_split_by_keeps_a_key_that_comes_back_as_a_second_message_in_order():
    out = split_by(Topic.GPU, rows(["a", "b", "a"]), "node")
    assert [(m.key, m.value.column("i").to_pylist()) for m in out] == [("a", [0]), ("b", [1]), ("a", [2])]


def test_split_by_of_an_empty_batch_is_no_message():
    assert split_by(Topic.GPU, rows([]), "node") == []


def test_split_by_slices_without_copying():
    batch = rows(["a", "a", "b"])
    out = split_by(Topic.GPU, batch, "node")
    assert out[1].value.column("i").buffers()[1].address == batch.column("i").buffers()[1].address
    assert [m.value.schema for m in out] == [batch.schema] * 2


# coalesce

def test_coalesce_joins_a_run_of_distinct_keys_into_one_unkeyed_batch():
    out = coalesce([Message(Topic.GPU, rows(["a"], 0), key="a"), Message(Topic.GPU, rows(["b"], 1), key="b")])
    assert len(out) == 1
    assert out[0].topic == Topic.GPU and out[0].key is None
    assert out[0].value.column("i").to_pylist() == [0, 1]


def test_coalesce_keeps_two_scrapes_of_one_key_as_two_batches_in_order():
    out = coalesce([Message(Topic.GPU, rows(["a"], 0), key="a"), Message(Topic.GPU, rows(["b"], 1), key="b"),
                    Message(Topic.GPU, rows(["a"], 2), key="a"), Message(Topic.GPU, rows(["c"], 3), key="c")])
    assert [m.value.column("i").to_pylist() for m in out] == [[0, 1], [2, 3]]


def test_coalesce_never_joins_two_topics_or_after_an_unkeyed_message():
    out = coalesce([Message(Topic.GPU, rows(["a"], 0), key="a"), Message(Topic.EVENTS, rows(["b"], 1), key="b"),
                    Message(Topic.EVENTS, rows(["c"], 2)), Message(Topic.EVENTS, rows(["d"], 3), key="d")])
    assert [(m.topic, m.value.column("i").to_pylist()) for m in out] == [
        (Topic.GPU, [0]), (Topic.EVENTS, [1]), (Topic.EVENTS, [2, 3])]


def test_coalesce_of_nothing_is_nothing_and_of_one_message_is_its_batch():
    assert coalesce([]) == []
    batch = rows(["a", "b"])
    (out,) = coalesce([Message(Topic.ALERTS, batch, key="k")])
    assert out.value is batch and out.topic == Topic.ALERTS and out.key is None


# keys: the key of every record type

def test_the_keyed_record_types_and_their_key_columns():
    assert keys.KEY_COLUMN == {Topic.HEALTH: "node", Topic.ALERTS: "fingerprint", Topic.RACKS: "site",
                               Topic.POWER_REQUESTS: "site", Topic.POWER_REPORTS: "site", Topic.REMEDIATION: "node"}
    assert set(keys.BY_RACK) == {Topic.GPU, Topic.EVENTS, Topic.FACILITY, Topic.POWER_CAPS, Topic.POWER_ACTIONS}
    assert set(SCHEMA_OF.values()) == set(WIRE_SCHEMAS)


@pytest.mark.parametrize("topic", [Topic.GPU, Topic.EVENTS])
def test_gpu_samples_and_events_are_keyed_by_rack_so_a_rack_meets_its_coolant(topic):
    batch = of_schema(SCHEMA_OF[topic], node=["r01-n01", "r01-n01", "r01-n02", "r02-n01"],
                      rack=["r01", "r01", "r01", "r02"])
    out = keys.messages(topic, batch, keyed=True)
    assert [(m.topic, m.key, m.value.column("node").to_pylist()) for m in out] == [
        (topic, "r01", ["r01-n01", "r01-n01", "r01-n02"]), (topic, "r02", ["r02-n01"])]


def test_node_health_is_keyed_by_node():
    batch = of_schema(NODE_HEALTH, node=["r01-n01", "r01-n01", "r01-n02"])
    out = keys.messages(Topic.HEALTH, batch, keyed=True)
    assert [(m.key, m.value.num_rows) for m in out] == [("r01-n01", 2), ("r01-n02", 1)]


def test_rack_summaries_are_keyed_by_site():
    batch = of_schema(RACK_SUMMARY, site=["s1", "s1", "s2"], rack=["r01", "r02", "r01"])
    assert [(m.key, m.value.num_rows) for m in keys.messages(Topic.RACKS, batch, keyed=True)] == [("s1", 2), ("s2", 1)]


def test_alerts_are_keyed_by_fingerprint():
    batch = of_schema(ALERT, fingerprint=["f1", "f1", "f2"], node=["n1", "n2", "n1"])
    assert [(m.key, m.value.num_rows) for m in keys.messages(Topic.ALERTS, batch, keyed=True)] == [("f1", 2), ("f2", 1)]


def test_facility_readings_are_keyed_by_rack_and_site_level_devices_by_site_each_key_once_in_order():
    batch = of_schema(FACILITY_SAMPLE, site=["s1", "s1", "s1", "s1", "s2", "s1"],
                      rack=["r02", "", "r01", "r02", "", "r01"], device=["a", "b", "c", "d", "e", "f"])
    out = keys.messages(Topic.FACILITY, batch, keyed=True)
    got = {m.key: m.value.column("device").to_pylist() for m in out}
    assert len(got) == len(out)  # each key is one message: a rack's readings stay on one partition
    assert got == {"r01": ["c", "f"], "r02": ["a", "d"], "s1": ["b"], "s2": ["e"]}
    assert all(m.value.schema.equals(FACILITY_SAMPLE, check_metadata=True) for m in out)  # no helper column left


@pytest.mark.parametrize("partitions", [1, 3, 6])
def test_with_partitions_a_scrape_is_one_message_per_partition_each_rack_where_its_key_puts_it(partitions):
    racks = [f"r{i:02d}" for i in range(12)]
    batch = of_schema(FACILITY_SAMPLE, site=["s1"] * 26, rack=[racks[i % 12] for i in range(24)] + ["", ""],
                      device=[f"d{i}" for i in range(26)])
    out = keys.messages(Topic.FACILITY, batch, keyed=True, partitions=partitions)
    per_key = {m.key: m.value for m in keys.messages(Topic.FACILITY, batch, keyed=True)}
    assert len(out) == len({keys.partition_for(k, partitions) for k in per_key}) <= partitions
    seen = set()
    for m in out:
        named = m.headers["fw-keys"].split(",")
        assert m.key == named[0] and named == sorted(named)
        assert {keys.partition_for(k, partitions) for k in named} == {keys.partition_for(m.key, partitions)}
        for k in named:  # each key's rows, in their order, as its own message would hold them
            assert m.value.filter(pc.equal(keys.rack_keys(m.value), k)).equals(per_key[k])
        seen.update(named)
        assert m.value.schema.equals(FACILITY_SAMPLE, check_metadata=True)
    assert seen == set(per_key) and sum(m.value.num_rows for m in out) == batch.num_rows


def test_coalesce_never_joins_two_scrapes_of_one_rack_in_bundles_of_other_first_keys():
    def bundle(names, first):
        return Message(Topic.GPU, rows(names, first), key=names[0], headers={"fw-keys": ",".join(names)})
    tick1, tick2 = bundle(["r01", "r02"], 0), bundle(["r02", "r03"], 2)  # r02 in both, under other keys
    assert [m.value.column("i").to_pylist() for m in coalesce([tick1, tick2])] == [[0, 1], [2, 3]]
    other = bundle(["r04"], 4)  # another partition's rack of the same tick: joined
    assert [m.value.column("i").to_pylist() for m in coalesce([tick1, other, tick2])] == [[0, 1, 4], [2, 3]]


@pytest.mark.parametrize("topic", [Topic.LABELS, Topic.STATE])
def test_fault_labels_and_checkpoints_are_one_unkeyed_message(topic):
    batch = of_schema(SCHEMA_OF[topic], site=["s1", "s2"])
    (m,) = keys.messages(topic, batch, keyed=True)
    assert (m.topic, m.key, m.value) == (topic, None, batch)


@pytest.mark.parametrize("topic", list(Topic))
def test_in_process_every_record_type_is_one_unkeyed_message(topic):
    batch = of_schema(SCHEMA_OF[topic], site=["s1", "s2"])
    (m,) = keys.messages(topic, batch, keyed=False)
    assert (m.topic, m.key, m.value) == (topic, None, batch)


def test_a_checkpoint_is_keyed_by_its_partition_and_partitions_are_kafkas():
    assert [keys.checkpoint_key(p) for p in (0, 3, 11)] == ["0", "3", "11"]
    for key in ("r01-n01", "r01", "site-a", "", "fingerprint-0123456789abcdef"):
        p = keys.partition_for(key, 12)
        assert 0 <= p < 12
        assert p == (keys.murmur2(key.encode()) & 0x7FFFFFFF) % 12
        assert keys.partition_for(key, 1) == 0


def test_rack_keys_are_the_rack_or_the_site():
    batch = of_schema(FACILITY_SAMPLE, site=["s1", "s2"], rack=["r07", ""])
    assert keys.rack_keys(batch).to_pylist() == ["r07", "s2"]


# properties

node_lists = st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=40)


@settings(max_examples=200, deadline=None)
@given(node_lists)
def test_split_by_partitions_the_rows_into_maximal_runs_in_order_and_coalesce_puts_them_back(nodes):
    batch = rows(nodes)
    out = split_by(Topic.GPU, batch, "node")
    assert concat(out).equals(pa.Table.from_batches([batch]))  # every row once, in order
    for m in out:
        assert m.value.num_rows > 0 and set(m.value.column("node").to_pylist()) == {m.key}
    assert all(a.key != b.key for a, b in zip(out, out[1:]))  # runs are maximal
    assert len(out) == sum(1 for i, n in enumerate(nodes) if i == 0 or nodes[i - 1] != n)
    back = coalesce(out)
    assert concat(back).equals(pa.Table.from_batches([batch]))
    assert len(back) <= len(out)


@settings(max_examples=200, deadline=None)
@given(node_lists)
def test_a_keyed_producer_puts_each_facility_key_in_one_message_in_its_original_order(racks):
    batch = of_schema(FACILITY_SAMPLE, rack=racks, site=["s"] * len(racks), value=[float(i) for i in range(len(racks))])
    out = keys.messages(Topic.FACILITY, batch, keyed=True) if racks else []
    assert sorted(m.key for m in out) == sorted(set(racks))
    for m in out:
        assert m.value.column("value").to_pylist() == [float(i) for i, r in enumerate(racks) if r == m.key]


messages_strategy = st.lists(
    st.tuples(st.sampled_from([Topic.GPU, Topic.EVENTS]), st.one_of(st.none(), st.sampled_from(["a", "b", "c"])),
              st.integers(1, 3)),
    max_size=20)


@settings(max_examples=200, deadline=None)
@given(messages_strategy)
def test_coalesce_concatenates_in_order_and_joins_only_what_may_be_joined(spec):
    inputs, first = [], 0
    for topic, key, n in spec:
        inputs.append(Message(topic, rows([key or "-"] * n, first), key=key))
        first += n
    out = coalesce(inputs)
    assert concat(out).equals(concat(inputs))  # nothing lost, nothing reordered
    # which inputs each output joined, by row numbers
    groups, at = [], 0
    for m in out:
        ids = set(m.value.column("i").to_pylist())
        group = []
        while at < len(inputs) and set(inputs[at].value.column("i").to_pylist()) <= ids:
            group.append(inputs[at])
            at += 1
        assert sum(g.value.num_rows for g in group) == m.value.num_rows
        groups.append(group)
    assert at == len(inputs)
    for m, group in zip(out, groups):
        assert m.key is None and {g.topic for g in group} == {m.topic}
        keyed = [g.key for g in group if g.key is not None]
        assert len(keyed) == len(set(keyed))  # two scrapes of one key are never one evaluation
        assert all(g.key is not None for g in group[1:])  # an unkeyed message only starts a run
    for a, b in zip(groups, groups[1:]):  # runs are as long as they may be
        head = b[0]
        assert head.topic != a[0].topic or head.key is None or head.key in {g.key for g in a}
