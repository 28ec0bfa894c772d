"""Event-time alignment of a consumer's input (bus/align.py): what a detect process reads is
released in the order it happened, whatever order Kafka handed it over in, and nothing held
is ever committed."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.bus import keys
from pipeline.bus.align import ORIGIN, Aligner
from pipeline.bus.base import Message, Topic
from pipeline.bus.batching import coalesce_by_time

TOPICS = [Topic.GPU, Topic.FACILITY, Topic.EVENTS]
TS = pa.timestamp("ns", tz="UTC")


def msg(topic: Topic, t: int, offset: int, partition: int = 0, origin: str | None = None) -> Message:
    batch = pa.RecordBatch.from_pydict({"ts": pa.array([t * 10**9], pa.int64()).cast(TS), "x": [offset]})
    return Message(topic, batch, "k", {ORIGIN: origin} if origin is not None else {}, partition, offset)


def test_topics_read_ahead_of_each_other_are_released_in_time_order_ties_in_topic_order():
    a = Aligner(TOPICS)
    a.add([msg(Topic.GPU, t, t) for t in (1, 2, 3)])  # the GPU topic was fetched first
    assert a.release(lambda t, p: t != Topic.EVENTS) == []  # the events may still hold an earlier one
    a.add([msg(Topic.EVENTS, 1, 0), msg(Topic.FACILITY, 2, 0)])
    out = a.release(lambda t, p: True)
    assert [(m.topic, int(m.value.column("ts").cast(pa.int64())[0].as_py() // 10**9)) for m in out] == [
        (Topic.GPU, 1), (Topic.EVENTS, 1), (Topic.GPU, 2), (Topic.FACILITY, 2), (Topic.GPU, 3)]
    assert a.held == 0


def test_a_held_message_holds_its_offset_back_and_a_moved_partition_is_dropped():
    a = Aligner(TOPICS)
    a.add([msg(Topic.GPU, 5, 40), msg(Topic.GPU, 6, 41), msg(Topic.GPU, 7, 0, partition=1)])
    assert a.release(lambda t, p: t == Topic.FACILITY) == []
    assert a.holding(Topic.GPU, 0) == 40 and a.holding(Topic.EVENTS, 0) is None
    a.drop({0})
    assert a.holding(Topic.GPU, 0) is None and a.held == 1
    assert [m.offset for m in a.drain()] == [0]


def behind(origin: str, partition: int) -> bool:
    """Read to its end? Never: each origin's tier has input it has not got through yet."""
    return False


def test_origins_are_waited_for_until_they_send_or_go_idle():
    """The site tier: summaries of one site from several rack-tier partitions. The end of
    what a reader sees says nothing of another process's open transaction, so an origin
    that sent before is waited for, until it is idle (its process died for good)."""
    now = [0.0]
    a = Aligner([Topic.RACKS], by_origin=True, idle_s=30.0, clock=lambda: now[0])
    a.add([msg(Topic.RACKS, 10, 0, origin="1"), msg(Topic.RACKS, 10, 1, origin="2"),
           msg(Topic.RACKS, 11, 2, origin="2")])
    assert [m.offset for m in a.release(behind)] == [0]  # origin 1 may send more at 10
    a.add([msg(Topic.RACKS, 11, 3, origin="1")])
    assert [m.offset for m in a.release(behind)] == [1, 3]
    assert a.holding(Topic.RACKS, 0) == 2
    now[0] = 29.0
    assert a.release(behind) == []
    now[0] = 31.0  # origin 1 sent nothing for idle_s
    assert [m.offset for m in a.release(behind)] == [2]


def test_an_expected_origin_is_waited_for_before_it_sends_and_a_moved_partition_forgets_it(caplog):
    """A site-tier partition taken over mid-run: its checkpoint names the racks, so the
    origins that hold them are waited for from the start; the first messages read (the
    live rack tiers') do not go past one whose rack tier is being taken over and later
    sends what came earlier."""
    now = [0.0]
    a = Aligner([Topic.RACKS], by_origin=True, idle_s=30.0, clock=lambda: now[0])
    a.expect(0, ["1", "2"])
    a.add([msg(Topic.RACKS, t, t, origin="1") for t in (10, 11, 12)])
    assert a.release(behind) == []  # origin 2 has sent nothing yet, and may send 10
    a.add([msg(Topic.RACKS, 10, 20, origin="2")])
    assert [m.offset for m in a.release(behind)] == [10, 20]
    now[0] = 31.0  # origin 2 went idle: the rest goes on, said once
    assert [m.offset for m in a.release(behind)] == [11, 12]
    a.release(behind)
    assert [r.getMessage() for r in caplog.records] == [
        "partition 0: nothing from origin 2 for 30 s; what the others sent goes on without it (no process has got "
        "through its rack-tier partition's input since)"]
    a.drop({0})
    a.add([msg(Topic.RACKS, 13, 13, origin="1")])
    assert [m.offset for m in a.release(behind)] == [13]  # partition 0 moved away and back: not expected


def test_an_origin_whose_tier_got_through_its_input_is_not_waited_for():
    """Origin 2's rack tier has committed all its input (a partition of no data, or the end
    of a finite run) and this partition is read to its end: nothing earlier can come from
    it, so origin 1's go on at once, without the idle bound and without a warning."""
    a = Aligner([Topic.RACKS], by_origin=True, idle_s=30.0, clock=lambda: 0.0)
    a.expect(0, ["1", "2"])
    a.add([msg(Topic.RACKS, t, t, origin="1") for t in (10, 11)])
    assert a.release(behind) == []
    assert a.waiting_on() == {("2", 0)}
    assert [m.offset for m in a.release(lambda origin, p: origin == "2")] == [10, 11]
    assert not a.gone


def test_a_cold_start_waits_for_every_origin_and_gives_up_on_the_silent_ones_quietly(caplog):
    """No checkpoint yet: any rack-tier partition may hold the site's racks. Those that hold
    none of them (another site's, with input to get through) are given up after idle_s
    without a warning; one that sends is an origin like any other from then on."""
    now = [0.0]
    a = Aligner([Topic.RACKS], by_origin=True, idle_s=30.0, clock=lambda: now[0])
    a.expect(0, ["0", "1", "2"], maybe=True)
    now[0] = 25.0
    a.add([msg(Topic.RACKS, 10, 0, origin="1"), msg(Topic.RACKS, 10, 1, origin="2")])
    assert a.release(behind) == []  # origin 0 may still send 10
    now[0] = 31.0  # origin 0 never sent: not this site's
    assert [m.offset for m in a.release(behind)] == [0]  # (origin 1 may send more at 10)
    assert caplog.records == []
    a.add([msg(Topic.RACKS, 11, 2, origin="1")])
    assert [m.offset for m in a.release(behind)] == [1]
    now[0] = 56.0  # origin 2 sent before: giving up on it is news
    assert [m.offset for m in a.release(behind)] == [2]
    assert [r.getMessage().split(";")[0] for r in caplog.records] == ["partition 0: nothing from origin 2 for 30 s"]


def test_a_site_partition_expects_the_rack_tier_partitions_of_its_sites_racks():
    racks = [("site-a", "r01"), ("site-a", "r02"), ("site-a", "r03"), ("site-a", ""), ("east", "r09")]
    a, east = keys.partition_for("site-a", 6), keys.partition_for("east", 6)
    assert a != east
    expected = {keys.partition_for(r or "site-a", 12) for r in ("r01", "r02", "r03", "")}
    assert keys.origins(racks, a, 6, 12) == expected  # the site meter's summaries come from its site's key
    assert keys.origins(racks, east, 6, 12) == {keys.partition_for("r09", 12)}
    assert keys.origins(racks, (a + 1) % 6 if (a + 1) % 6 != east else (a + 2) % 6, 6, 12) == set()


def test_the_summaries_of_one_tick_are_judged_together():
    out = coalesce_by_time([msg(Topic.RACKS, 10, 0, origin="1"), msg(Topic.RACKS, 10, 1, origin="2"),
                            msg(Topic.RACKS, 11, 2, origin="1")])
    assert [m.value.num_rows for m in out] == [2, 1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(TOPICS), st.integers(0, 50)), max_size=40), st.randoms())
def test_whatever_the_arrival_order_the_release_is_the_event_time_order(rows, rnd):
    """Each topic's messages are in time order (as a partition's are); they arrive in any
    interleaving and any chunks. Released, they are in (time, topic) order, and a message
    is never released while a topic that is not read to its end could still precede it."""
    per_topic = {t: sorted(ts for topic, ts in rows if topic == t) for t in TOPICS}
    pending = {t: [msg(t, ts, i) for i, ts in enumerate(tss)] for t, tss in per_topic.items()}
    a, out, arrived = Aligner(TOPICS), [], []
    while any(pending.values()):  # each topic in offset order, the topics interleaved in random chunks
        t = rnd.choice([t for t in TOPICS if pending[t]])
        n = rnd.randint(1, 3)
        chunk, pending[t] = pending[t][:n], pending[t][n:]
        arrived += chunk
        a.add(chunk)
        out += a.release(lambda topic, p: not pending[topic])
    out += a.drain()
    key = lambda m: (m.value.column("ts").cast(pa.int64())[0].as_py(), TOPICS.index(m.topic))  # noqa: E731
    assert [key(m) for m in out] == sorted(key(m) for m in arrived)
    assert len(out) == len(rows)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(TOPICS), st.integers(0, 50), st.integers(0, 2)), max_size=40),
       st.randoms())
def test_a_limited_release_gives_at_most_its_limit_in_event_time_order_and_leaves_the_rest_held(rows, rnd):
    """A paced consumer (bus/batching.py) asks for few messages; a backlog held while one topic was
    fetched ahead had been released whole. Limited, each release gives at most its limit, each
    partition's messages in (time, topic) order as an unlimited release does, and none is lost."""
    pending = {(t, p): [msg(t, ts, i, partition=p) for i, ts in enumerate(sorted(
        ts for topic, ts, part in rows if (topic, part) == (t, p)))] for t in TOPICS for p in range(3)}
    arrived = [m for q in pending.values() for m in q]
    a, out = Aligner(TOPICS), []
    while any(pending.values()):
        tp = rnd.choice([tp for tp, q in pending.items() if q])
        n = rnd.randint(1, 3)
        a.add(pending[tp][:n])
        pending[tp] = pending[tp][n:]
        limit = rnd.randint(1, 4)
        got = a.release(lambda topic, p: not pending[(topic, p)], limit=limit)
        assert len(got) <= limit
        out += got
    while got := a.drain(limit := rnd.randint(1, 4)):  # the stream ended: what is held goes, paced too
        assert len(got) <= limit
        out += got
    assert a.held == 0 and len(out) == len(rows)
    key = lambda m: (m.value.column("ts").cast(pa.int64())[0].as_py(), TOPICS.index(m.topic))  # noqa: E731
    for p in range(3):
        assert [key(m) for m in out if m.partition == p] == sorted(key(m) for m in arrived if m.partition == p)


def test_a_limited_release_starts_at_each_partition_in_turn():
    a = Aligner(TOPICS)
    a.add([msg(t, ts, ts, partition=p) for p in (0, 1) for ts in (1, 2, 3) for t in TOPICS])
    firsts = [a.release(lambda t, p: True, limit=2)[0].partition for _ in range(4)]
    assert firsts == [0, 1, 0, 1]
    assert a.cut_short and a.held == 18 - 8
