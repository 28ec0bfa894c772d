"""The role table, the Source and Sink protocols and the bus's keying (issue 12): a process
builds only what its roles need, a new source plugs in through one table row, a sink's
offsets are committed only after its flush made the output durable, and one module keys
every record type."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys

import pyarrow as pa
import pytest

from pipeline.bus import EndOfStream, MemoryBus, Message, Topic
from pipeline.bus import keys
from pipeline.config import ConfigError
from tests import conftest


def make_config(tmp_path, **sections):
    sections = {"fleet": {"racks": 2, "speed": 20.0}, "archive": {"flush_interval_s": 1.0}, **sections}
    return conftest.make_config(data_dir=str(tmp_path / "data"), **sections)


# ---- the role table ---------------------------------------------------------------

def test_the_table_gives_the_roles_their_inputs_groups_and_what_run_runs(tmp_path):
    from pipeline.roles import DATASET_OF_TOPIC, ROLE_SPECS, ROLES, SOURCE_ROLES, run_roles, whole
    assert set(ROLES) == {"simulate", "agent", "dcgm", "facility", "detect", "power", "remediate", "archive",
                          "notify"}
    assert SOURCE_ROLES == {"simulate": "simulate", "nvml": "agent", "dcgm": "dcgm"}
    assert ROLE_SPECS["detect"].group == "detect" and set(ROLE_SPECS["detect"].inputs) == {
        Topic.GPU, Topic.FACILITY, Topic.EVENTS}
    assert ROLE_SPECS["archive"].group == "archive" and set(ROLE_SPECS["archive"].inputs) == set(DATASET_OF_TOPIC)
    assert ROLE_SPECS["notify"].inputs == (Topic.ALERTS,)
    cfg = make_config(tmp_path)
    assert ROLE_SPECS["power"].group == "power" and set(ROLE_SPECS["power"].inputs) == {
        Topic.GPU, Topic.FACILITY, Topic.POWER_REQUESTS, Topic.POWER_ACTIONS}
    assert ROLE_SPECS["remediate"].group == "remediate" and set(ROLE_SPECS["remediate"].inputs) == {
        Topic.ALERTS, Topic.GPU}
    assert run_roles(cfg) == {"simulate", "detect", "power", "remediate", "archive", "notify"}
    assert run_roles(make_config(tmp_path, daemon={"source": "nvml"}, mqtt={"broker": "bms:1883"})) == {
        "agent", "facility", "detect", "power", "remediate", "archive", "notify"}
    assert whole(run_roles(cfg)) and not whole(frozenset({"notify"})) and not whole(frozenset({"simulate"}))


def test_roles_alone_need_kafka_and_the_facility_role_a_broker(tmp_path):
    import pytest

    from pipeline.daemon import check_roles
    with pytest.raises(ConfigError, match="needs Kafka"):
        check_roles(make_config(tmp_path), frozenset({"notify"}))
    with pytest.raises(ConfigError, match="mqtt.broker"):
        check_roles(make_config(tmp_path, kafka={"bootstrap": "k:9092"}), frozenset({"facility"}))
    check_roles(make_config(tmp_path, kafka={"bootstrap": "k:9092"}), frozenset({"notify"}))


BUILD = """
import asyncio, json, sys
from pathlib import Path
from pipeline.bus import MemoryBus
from pipeline.config import load_config
from pipeline.daemon import build_roles
from pipeline.roles.context import Context
from pipeline.sinks.console import Console

async def main():
    cfg = load_config(None, env={{}}, overrides={{"data_dir": {data!r}, "agent": {{"replay": "h100"}}}})
    ctx = Context(cfg, frozenset({roles!r}), MemoryBus(), asyncio.Event(), Console())
    running = build_roles(ctx)
    print(json.dumps({{"built": [r.name for r in running], "engine": ctx.engine is not None,
                      "writer": ctx.writer is not None, "notifier": ctx.notifier is not None,
                      "staging": (Path(cfg.archive_dir) / ".staging").exists(),
                      "engine_imported": "pipeline.detect.engine" in sys.modules,
                      "numba_imported": "numba" in sys.modules,
                      "sources": ctx.describe_sources()}}))
asyncio.run(main())
"""


def build_in_a_fresh_process(tmp_path, roles: list[str]) -> dict:
    code = BUILD.format(data=str(tmp_path / "data"), roles=roles)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_notify_only_process_builds_no_detector_and_no_archive(tmp_path):
    got = build_in_a_fresh_process(tmp_path, ["notify"])
    assert got["built"] == ["notify"] and got["notifier"]
    assert not got["engine"] and not got["writer"] and not got["staging"]
    assert not got["engine_imported"] and not got["numba_imported"]  # no kernels compiled
    assert got["sources"] == "no source"


def test_an_agent_only_process_builds_the_agent_and_nothing_else(tmp_path):
    got = build_in_a_fresh_process(tmp_path, ["agent"])
    assert got["built"] == ["agent"] and got["sources"].startswith("NVML agent on ")
    assert "(replaying h100)" in got["sources"]
    assert not got["engine"] and not got["writer"] and not got["notifier"] and not got["staging"]
    assert not got["engine_imported"]


def test_an_archive_only_process_builds_the_writer_and_no_detector(tmp_path):
    got = build_in_a_fresh_process(tmp_path, ["archive"])
    assert got["built"] == ["archive"] and got["writer"] and got["staging"]
    assert not got["engine"] and not got["notifier"] and not got["engine_imported"]


def test_the_checkpoint_does_not_import_the_kafka_client():
    code = "import sys, pipeline.detect.checkpoint; print('pipeline.bus.kafka' in sys.modules, 'aiokafka' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---- a new source: one module (here, this test) and one row ------------------------

class CountingSource:
    """A source of two GPU scrapes of one node, as a new collector would be written."""

    def __init__(self, batch: pa.RecordBatch) -> None:
        self.batch, self.sent = batch, 0

    async def run(self, emit, stop) -> None:
        for _ in range(2):
            await emit(Topic.GPU, self.batch)
            self.sent += self.batch.num_rows
        await stop.wait()

    def stats(self) -> dict[str, int]:
        return {"gpu_samples": self.sent}

    def describe(self) -> str:
        return "a counting test source"


SOURCE_BATCH: pa.RecordBatch | None = None


def build_counting_source(ctx, spec):
    return CountingSource(SOURCE_BATCH)


def test_a_new_source_is_a_row_in_the_table_and_the_daemon_runs_it(tmp_path, monkeypatch):
    global SOURCE_BATCH
    import pipeline.roles as registry
    from pipeline.daemon import run_daemon
    from pipeline.sources.simulate import FleetSimulator
    cfg = make_config(tmp_path)
    SOURCE_BATCH = FleetSimulator(cfg.fleet).step().gpu
    row = registry.RoleSpec("counting", registry.SOURCE, f"{__name__}:build_counting_source", "a test source",
                            in_run=lambda cfg: True, outputs=(Topic.GPU,))
    table = tuple(s for s in registry.ROLE_TABLE if s.stage != registry.SOURCE) + (row,)
    monkeypatch.setattr(registry, "ROLE_TABLE", table)
    assert registry.run_roles(cfg) == {"counting", "detect", "power", "remediate", "archive", "notify"}
    summary = asyncio.run(run_daemon(cfg, duration_s=3))
    assert summary.gpu_samples_published == 2 * SOURCE_BATCH.num_rows
    assert summary.gpu_samples == 2 * SOURCE_BATCH.num_rows  # detect got both scrapes
    assert summary.rows_archived.get("gpu_samples") == 2 * SOURCE_BATCH.num_rows


# ---- the sink loop ------------------------------------------------------------------

class FlakySink:
    """Fails its first `failures` flushes."""

    def __init__(self, failures: int) -> None:
        self.failures, self.held, self.durable, self.log = failures, [], [], []

    async def start(self) -> None:
        self.log.append("start")

    def add(self, messages):
        self.held += messages
        return True

    async def flush(self) -> bool:
        if self.failures:
            self.failures -= 1
            self.log.append("flush failed")
            return False
        self.durable += self.held
        self.held = []
        self.log.append("flushed")
        return True

    def flushed(self, durable: bool) -> None:
        pass

    def wait_s(self):
        return 0.05

    stalled = False

    def abandon(self) -> None:
        self.log.append("abandoned")

    async def close(self) -> None:
        self.log.append("closed")


def test_consume_commits_only_after_the_sink_made_the_output_durable():
    from pipeline.sinks.base import consume

    async def go(failures: int) -> FlakySink:
        bus = MemoryBus()
        await bus.start()
        sub = bus.subscribe([Topic.ALERTS], "test")
        real_commit = sub.commit

        async def commit() -> None:
            sink.log.append(f"commit {len(sink.durable)}")
            await real_commit()
        sub.commit = commit
        sink = FlakySink(failures)
        await bus.publish(Message(Topic.ALERTS, pa.RecordBatch.from_pydict({"x": [1]})))
        await bus.end([Topic.ALERTS])
        await consume(sub, sink)
        return sink

    ok = asyncio.run(go(0))
    assert ok.log[:3] == ["start", "flushed", "commit 1"] and ok.log[-1] == "closed"
    flaky = asyncio.run(go(5))
    assert "commit" not in " ".join(flaky.log) and "abandoned" in flaky.log and flaky.log[-1] == "closed"


def test_a_hand_over_that_cannot_make_the_output_durable_commits_none_of_its_partitions():
    """Before partitions move on, the sink makes what it took durable (SinkBase.before_revoke:
    a flush). Where it cannot, the hook raises, so the rebalance commits nothing, and the
    partitions' offsets are forgotten, so no later commit takes them either: their next owner
    reads them again."""
    from pipeline.sinks.base import SinkBase, consume

    class Stuck(SinkBase):
        def add(self, messages):
            return False

        async def flush(self) -> bool:
            return False

    async def go():
        bus = MemoryBus()
        await bus.start()
        sub = bus.subscribe([Topic.ALERTS], "test")
        forgotten = []
        sub.forget = forgotten.append
        role = asyncio.create_task(consume(sub, Stuck()))
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match=r"partitions \[3\] handed over uncommitted"):
            await sub.before_revoke[0]({3})
        await bus.end([Topic.ALERTS])
        await role
        return forgotten
    assert asyncio.run(go()) == [{3}]


# ---- keying -------------------------------------------------------------------------

def test_murmur2_is_kafkas():
    from aiokafka.partitioner import murmur2
    rng = random.Random(1)
    for _ in range(2000):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 24)))
        assert keys.murmur2(data) == murmur2(data)


def test_every_record_type_has_its_key(tmp_path):
    from pipeline.sources.simulate import FleetSimulator
    cfg = make_config(tmp_path)
    tick = FleetSimulator(cfg.fleet).step()
    gpu = keys.messages(Topic.GPU, tick.gpu, keyed=True)  # by rack: a rack's GPUs meet its coolant
    assert [m.key for m in gpu] == list(dict.fromkeys(tick.gpu.column("rack").to_pylist()))
    assert all(set(m.value.column("rack").to_pylist()) == {m.key} for m in gpu)
    assert sum(m.value.num_rows for m in gpu) == tick.gpu.num_rows
    facility = keys.messages(Topic.FACILITY, tick.facility, keyed=True)
    for m in facility:  # by rack, site-level devices by site
        racks, sites = set(m.value.column("rack").to_pylist()), set(m.value.column("site").to_pylist())
        assert racks == {m.key} or (racks == {""} and sites == {m.key})
    assert sum(m.value.num_rows for m in facility) == tick.facility.num_rows
    assert [m.key for m in keys.messages(Topic.LABELS, tick.gpu, keyed=True)] == [None]
    assert [(m.key, m.value.num_rows) for m in keys.messages(Topic.GPU, tick.gpu, keyed=False)] == [
        (None, tick.gpu.num_rows)]
    assert keys.checkpoint_key(3) == "3" and keys.checkpoint_key(3, "site") == "site-3"


def test_memory_subscription_end_raises_end_of_stream():  # the loop's contract, in one line
    async def go():
        bus = MemoryBus()
        await bus.start()
        sub = bus.subscribe([Topic.GPU], "g")
        await bus.end([Topic.GPU])
        try:
            await sub.get_batch()
        except EndOfStream:
            return True
    assert asyncio.run(go())


def test_the_command_line_has_one_subcommand_per_role():
    from pipeline.cli import _parser
    from pipeline.roles import ROLES
    text = _parser().format_help()
    for name in ROLES:
        assert name in text


def test_the_power_subcommand_runs_the_role_and_has_its_request_actions():
    """`fleetwatch power` runs the role (like every role's subcommand); its actions manage requests."""
    from pipeline.cli import _overrides, _parser
    args = _parser().parse_args(["power", "--kafka", "k:9092", "--dry-run"])
    assert args.command == "power" and args.power_command is None
    assert _overrides(args)["power"] == {"dry_run": True}
    args = _parser().parse_args(["power", "request", "--reduction-kw", "40", "--duration", "10m", "--data-dir", "d"])
    assert args.power_command == "request" and args.data_dir == "d" and args.reduction_kw == 40
    assert _parser().parse_args(["power", "--data-dir", "d", "status"]).data_dir == "d"  # either side of the action
    assert _parser().parse_args(["run", "--dry-run"]).dry_run  # `run` takes every role's options


def test_a_new_source_brings_its_own_option_and_checks_in_its_row(tmp_path, monkeypatch):
    """A collector's flag and its preflight come with its row: the command line grows
    `--widget-hosts` on the role and on `run`, it sets the source's config key (and with
    `run` makes it the source), and its preflight refuses a bad value before anything starts."""
    import pipeline.roles as registry
    from pipeline.cli import _overrides, _parser
    from pipeline.config import ConfigError
    from pipeline.preflight import validate
    opt = registry.RoleOption("--widget-hosts", "H[,H...]", "widget hosts", "dcgm.targets", split=True,
                              implies_source="dcgm")
    row = registry.RoleSpec("widgets", registry.SOURCE, f"{__name__}:build_counting_source", "widget source",
                            in_run=lambda cfg: cfg.daemon.source == "dcgm", outputs=(Topic.GPU,), options=(opt,),
                            preflight=f"{__name__}:refuse_bad_widgets")
    monkeypatch.setattr(registry, "ROLE_TABLE", registry.ROLE_TABLE + (row,))
    for command in ("widgets", "run"):
        args = _parser().parse_args([command, "--widget-hosts", "a:1, b:2"])
        o = _overrides(args)
        assert o["dcgm"]["targets"] == ["a:1", "b:2"]
        assert o.get("daemon", {}).get("source") == ("dcgm" if command == "run" else None)
    cfg = make_config(tmp_path, dcgm={"targets": ["bad:1"]}, kafka={"bootstrap": "kafka:9092"})
    with pytest.raises(ConfigError, match="widget bad:1"):
        validate(cfg, frozenset({"widgets"}))


def refuse_bad_widgets(cfg, env=None, warn=True) -> None:
    from pipeline.config import ConfigError
    if any(t.startswith("bad") for t in cfg.dcgm.targets):
        raise ConfigError(f"config error: widget {cfg.dcgm.targets[0]}")


# ---- the rack tier over Kafka: one engine call per scrape of all partitions held ----

def _scrape(topic: Topic, ts: int, racks: list[str], partition: int) -> Message:
    batch = pa.RecordBatch.from_pydict({"ts": pa.array([ts] * len(racks), pa.timestamp("ms")),
                                        "site": ["s"] * len(racks), "rack": racks})
    return Message(topic, batch, racks[0], {"fw-keys": ",".join(racks)}, partition)


def test_partitions_merge_in_event_time_and_only_one_scrape_joins():
    from pipeline.roles.detect import coalesce_by_tick, in_time_order
    p0 = [_scrape(Topic.GPU, 1000, ["r1"], 0), _scrape(Topic.FACILITY, 1000, ["r1"], 0),
          _scrape(Topic.GPU, 2000, ["r1"], 0)]
    p1 = [_scrape(Topic.GPU, 1000, ["r2"], 1), _scrape(Topic.GPU, 2000, ["r2"], 1),
          _scrape(Topic.FACILITY, 2000, ["r2"], 1)]
    merged = in_time_order(p0 + p1)
    # Each partition's own order is kept, and a tick's GPU rows come before its facility rows.
    assert [m for m in merged if m.partition == 0] == p0 and [m for m in merged if m.partition == 1] == p1
    assert [(m.topic, m.value.column("ts")[0].value) for m in merged] == [
        (Topic.GPU, 1000), (Topic.GPU, 1000), (Topic.FACILITY, 1000),
        (Topic.GPU, 2000), (Topic.GPU, 2000), (Topic.FACILITY, 2000)]
    # One engine call per topic and scrape, with both partitions' racks in it.
    calls = coalesce_by_tick(merged)
    assert [(m.topic, m.value.num_rows, m.value.column("ts")[0].value) for m in calls] == [
        (Topic.GPU, 2, 1000), (Topic.FACILITY, 1, 1000), (Topic.GPU, 2, 2000), (Topic.FACILITY, 1, 2000)]


def test_each_output_row_commits_with_the_partition_its_rack_came_in():
    from pipeline.roles.detect import Owners
    partitions = 6
    racks = [f"r{i:02d}" for i in range(12)]
    held = {keys.partition_for(r, partitions) for r in racks[:4]}
    owners = Owners(partitions, held)
    rows = [{"site": "s", "rack": r, "node": f"{r}-n1"} for r in racks[:4]] + [{"site": "s", "rack": "", "node": None}]
    grouped = owners.group(rows)
    for p, of_p in grouped:
        assert p in held
        for row in of_p:  # a rack's row goes with its own partition; one of no rack held, with the first held
            own = keys.partition_for(keys.rack_key(row["site"], row["rack"]), partitions)
            assert p == (own if own in held else min(held))
    assert sorted(r["node"] or "" for _, of_p in grouped for r in of_p) == sorted(r["node"] or "" for r in rows)
    summaries = pa.RecordBatch.from_pylist(rows[:4])
    split = owners.split(summaries)
    assert sum(b.num_rows for _, b in split) == 4
    assert all(keys.partition_for(r, partitions) == p for p, b in split for r in b.column("rack").to_pylist())
