"""Compaction (sinks/compaction.py): an hour of small files becomes one per source partition,
with exactly the same rows (DuckDB's answers before and after), Kafka's offsets still on
disk, older files upgraded, readers reading throughout, and a run killed at any step
finished by the next."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.analytics.query import Archive
from pipeline.model import ARCHIVE_SCHEMAS, SCHEMAS
from pipeline.sinks.compaction import WORK, compact
from pipeline.sinks.parquet import ArchiveWriter
from pipeline.sources.simulate import FleetSimulator
from tests.archives import known_archive
from tests.conftest import make_config

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc)
LATER = T0 + timedelta(days=1)  # "now" for the tests: every hour of the archive is closed
FLUSH_S = 10  # a file per dataset every 10 s, as the daemon writes them
HOUR_S = 3600


def write_fleet(archive: Path, seconds: int, partitions: int = 0) -> None:
    """A 16-GPU fleet from T0, flushed every FLUSH_S seconds (partitions > 0: as from Kafka,
    GPU batches spread over that many partitions with increasing offsets)."""
    cfg = make_config(fleet={"racks": 1, "nodes_per_rack": 2, "fault_interval_s": 120.0, "gpu_reset_interval_s": 0.0})
    sim = FleetSimulator(cfg.fleet, start=T0)
    w = ArchiveWriter(archive, writer_id="w")
    offsets = [0] * max(partitions, 1)
    for i in range(seconds):
        tick = sim.step()
        p = i % partitions if partitions else -1
        w.add("gpu_samples", tick.gpu, p, offsets[p] if partitions else -1)
        if partitions:
            offsets[p] += 1
        w.add("facility_samples", tick.facility)
        if tick.events is not None:
            w.add("events", tick.events)
        if (i + 1) % FLUSH_S == 0:
            w.flush()
    w.flush()


def answers(archive: Path) -> dict[str, tuple]:
    """Per dataset: rows, and a hash of every row (order-free) as DuckDB reads the archive;
    times as microseconds since the epoch, truncated (a format-1 file's nanoseconds read as
    the format-2 file compaction makes of it holds them)."""
    out = {}
    for name in SCHEMAS:
        cols = ", ".join(f"\"{f.name}\" := epoch_ns(\"{f.name}\") // 1000" if pa.types.is_timestamp(f.type)
                         else f"\"{f.name}\"" for f in SCHEMAS[name])
        t = Archive(archive).run(f"select count(*) as n, sum(hash(struct_pack({cols}))) as h from {name}")
        out[name] = tuple(t.to_pylist()[0].values())
    return out


def files(archive: Path, dataset: str) -> list[Path]:
    return sorted((archive / dataset).glob("*/*/*.parquet"))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Path:
    """An hour and five minutes of archive: hour 10 closed, hour 11 still being written."""
    archive = tmp_path_factory.mktemp("compaction") / "archive"
    write_fleet(archive, HOUR_S + 300)
    return archive


@pytest.fixture
def copy(fleet: Path, tmp_path: Path) -> Path:
    shutil.copytree(fleet, tmp_path / "archive")
    return tmp_path / "archive"


def test_an_hour_of_small_files_becomes_one_with_the_same_rows(copy: Path) -> None:
    before = answers(copy)
    n_before = len(files(copy, "gpu_samples"))
    open_hour = sorted((copy / "gpu_samples").glob("*/hour=11/*.parquet"))
    stats = compact(copy, after_s=900.0, now=T0 + timedelta(hours=1, minutes=20))  # hour 11 is still open
    after = answers(copy)
    assert after == before and 15 * (HOUR_S + 300) < before["gpu_samples"][0] <= 16 * (HOUR_S + 300)
    hour10 = sorted((copy / "gpu_samples").glob("*/hour=10/*.parquet"))
    assert len(hour10) == 1 and hour10[0].name.startswith("part-") and "-compacted-" in hour10[0].name
    assert sorted((copy / "gpu_samples").glob("*/hour=11/*.parquet")) == open_hour  # open: as written
    assert n_before - len(open_hour) >= 360 and stats.files_in >= 360 and stats.rows > 0
    table = pq.read_table(hour10[0])
    keys = list(zip(*(table.column(c).to_pylist() for c in ("node", "gpu", "ts"))))
    assert keys == sorted(keys)  # by entity, then time
    assert not any((copy / WORK).glob("*-*"))  # nothing left behind
    # Closed later: the whole archive, ~390 files -> 2; a second run changes nothing.
    compact(copy, after_s=900.0, now=LATER)
    assert len(files(copy, "gpu_samples")) == 2 and answers(copy) == before
    assert compact(copy, after_s=900.0, now=LATER).hours == 0


def test_an_hour_larger_than_a_pass_is_merged_in_passes_sorted_all_the_same(tmp_path: Path, monkeypatch) -> None:
    """Memory stays bounded: ROWS_PER_PASS rows at a time, over ranges of nodes."""
    from pipeline.sinks import compaction
    archive = tmp_path / "archive"
    write_fleet(archive, 300)  # 5 minutes of 2 nodes: 2,400 GPU rows each
    before = answers(archive)
    monkeypatch.setattr(compaction, "ROWS_PER_PASS", 2_000)
    assert compaction._passes("gpu_samples", files(archive, "gpu_samples"), 4_800) == [
        ("r01-n01", "r01-n01"), ("r01-n02", "r01-n02")]  # a pass per node (no smaller unit: a node's rows sort)
    compact(archive, now=LATER)
    assert answers(archive) == before and len(files(archive, "gpu_samples")) == 1
    table = pq.read_table(files(archive, "gpu_samples")[0])
    keys = list(zip(*(table.column(c).to_pylist() for c in ("node", "gpu", "ts"))))
    assert keys == sorted(keys) and len(keys) == 4_800


def test_a_late_file_is_merged_with_the_hour_already_compacted(copy: Path) -> None:
    before = answers(copy)
    compact(copy, now=LATER)
    merged = files(copy, "gpu_samples")[0]
    late = merged.parent / "part-1-late-000001.parquet"
    pq.write_table(pq.read_table(merged).slice(0, 5), late)  # five rows more, come in late
    compact(copy, now=LATER)
    hour10 = sorted(merged.parent.glob("*.parquet"))
    assert len(hour10) == 1 and hour10[0].name.endswith("-compacted-000002.parquet")
    assert answers(copy)["gpu_samples"][0] == before["gpu_samples"][0] + 5


def test_kafka_files_keep_their_offsets(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write_fleet(archive, 1200, partitions=3)
    before = answers(archive)
    until = [ArchiveWriter(archive, writer_id="a").archived_until("gpu_samples", p) for p in range(3)]
    compact(archive, now=LATER)
    assert answers(archive) == before
    names = [f.name for f in files(archive, "gpu_samples")]
    assert names == [f"part-p{p:04d}-o{0:016d}-{until[p]:016d}.parquet" for p in range(3)]
    assert [ArchiveWriter(archive, writer_id="b").archived_until("gpu_samples", p) for p in range(3)] == until


def test_older_files_are_upgraded_in_the_merge(tmp_path: Path) -> None:
    """gpu_sample v3 files (no power_limit_w) and facility_sample v1 (no device_class, derived)."""
    archive = known_archive(tmp_path) / "archive"
    before = answers(archive)
    compact(archive, now=LATER)
    assert answers(archive) == before
    for dataset in ("gpu_samples", "facility_samples"):
        [merged] = files(archive, dataset)
        assert pq.read_schema(merged).remove_metadata() == ARCHIVE_SCHEMAS[dataset].remove_metadata()
    meter = pq.read_table(files(archive, "facility_samples")[0]).to_pylist()
    assert {r["device_class"] for r in meter if r["device"] == "meter-main"} == {"meter"}


def test_readers_read_every_row_once_while_it_runs(copy: Path) -> None:
    expected = answers(copy)["gpu_samples"][0]
    done = threading.Event()
    counts, retried = [], 0

    def run() -> None:
        try:
            compact(copy, now=LATER)
        finally:
            done.set()
    t = threading.Thread(target=run)
    t.start()
    while not done.is_set() or not counts:
        try:
            counts.append(Archive(copy).run("select count(*) as n from gpu_samples").column("n")[0].as_py())
        except Exception as e:  # listed the hour just before its swap, opened a file after: read again
            assert "No such file" in str(e) or "not found" in str(e).lower(), e
            retried += 1
    t.join()
    assert counts and set(counts) == {expected}, (set(counts), retried)
    assert len(files(copy, "gpu_samples")) == 2


KILLER = textwrap.dedent("""
    import os, signal, sys
    from datetime import datetime, timezone
    import pyarrow.parquet as pq
    from pipeline.sinks import compaction as c
    step, archive = sys.argv[1], sys.argv[2]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    merge, exchange, move = c._merge, c._exchange, c._move_late
    def merge_some(dataset, files, rows_in, out, held=None):
        if step == "mid-write":
            open(out, "wb").write(b"PAR1 half a file")
            die()
        return merge(dataset, files, rows_in, out, held)
    def swap(a, b):
        if step == "before-swap":
            die()
        late = b / "part-2-late-000001.parquet"  # the writer's file, come in while the hour was rebuilt
        pq.write_table(pq.read_table(next(b.glob("*.parquet"))).slice(0, 3), late)
        exchange(a, b)
        if step == "after-swap":
            die()
    c._merge, c._exchange = merge_some, swap
    c.compact(archive, now=datetime(2026, 3, 2, tzinfo=timezone.utc), datasets=("gpu_samples",))
""")


@pytest.mark.parametrize("step", ["mid-write", "before-swap", "after-swap"])
def test_a_run_killed_at_any_step_is_finished_by_the_next(copy: Path, step: str) -> None:
    before = answers(copy)
    child = subprocess.run([sys.executable, "-c", KILLER, step, str(copy)], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONPATH": "."})
    assert child.returncode == -signal.SIGKILL, child.stderr
    late = 3 if step == "after-swap" else 0
    if step == "after-swap":  # the late file sits in the work folder: out of sight until recovered
        assert answers(copy)["gpu_samples"][0] == before["gpu_samples"][0]
    else:
        assert answers(copy) == before  # the hour as it was
    stats = compact(copy, now=LATER)
    assert stats.recovered == 1 and not any((copy / WORK).glob("*-*"))
    after = answers(copy)
    assert after["gpu_samples"][0] == before["gpu_samples"][0] + late
    assert {k: v for k, v in after.items() if k != "gpu_samples"} == \
        {k: v for k, v in before.items() if k != "gpu_samples"}
    assert len(files(copy, "gpu_samples")) == 2


def test_the_archive_role_compacts_closed_hours_as_it_runs(copy: Path) -> None:
    """The role's own pass (archive.upkeep_interval_s) after its first write: hour 10 of the
    archive is merged while new data is archived beside it (retention off: the archive is of March)."""
    import asyncio
    from pipeline.bus import MemoryBus, Message, Topic
    from pipeline.roles import DATASET_OF_TOPIC
    from pipeline.sinks.archive_sink import archive_role
    before = answers(copy)["gpu_samples"][0]
    cfg = make_config(fleet={"racks": 1, "nodes_per_rack": 2, "fault_interval_s": 0.0, "gpu_reset_interval_s": 0.0})
    sim = FleetSimulator(cfg.fleet, start=T0 + timedelta(hours=3))
    ticks = [sim.step().gpu for _ in range(20)]

    async def run() -> None:
        bus = MemoryBus()
        sub = bus.subscribe(list(DATASET_OF_TOPIC), "archive")
        upkeep = make_config(archive={"upkeep_interval_s": 3600.0, "retention_days_samples": 0}).archive
        role = asyncio.create_task(archive_role(ArchiveWriter(copy), sub, 0.1, upkeep=upkeep))
        for batch in ticks:
            await bus.publish(Message(Topic.GPU, batch))
        for _ in range(1200):  # (a role that stops stops its compaction after the hour in progress)
            if len(files(copy, "gpu_samples")) == 3:
                break
            await asyncio.sleep(0.1)
        await bus.end(list(DATASET_OF_TOPIC))
        await asyncio.wait_for(role, 120)
    asyncio.run(run())
    assert len(list((copy / "gpu_samples").glob("*/hour=10/*.parquet"))) == 1
    assert len(list((copy / "gpu_samples").glob("*/hour=11/*.parquet"))) == 1  # (closed too, by the clock)
    assert answers(copy)["gpu_samples"][0] == before + 16 * 20



def test_an_hour_that_cannot_be_read_is_left_as_it_is_and_the_others_are_merged(copy: Path, capsys) -> None:
    """One truncated file in the oldest hour had stopped every pass there: no later hour, no later
    dataset merged again, and `archive compact` a pyarrow traceback naming no file."""
    from pipeline.cli import main
    hour10 = sorted((copy / "gpu_samples").glob("*/hour=10/*.parquet"))
    hour10[3].write_bytes(hour10[3].read_bytes()[:100])  # a file cut short (a copy, a disk)
    stats = compact(copy, now=LATER)
    assert sorted((copy / "gpu_samples").glob("*/hour=10/*.parquet")) == hour10  # left as it is
    assert len(list((copy / "gpu_samples").glob("*/hour=11/*.parquet"))) == 1
    assert len(files(copy, "facility_samples")) == 2 and len(files(copy, "events")) <= 2
    assert len(stats.failed) == 1 and stats.failed[0].startswith("gpu_samples/date=2026-03-01/hour=10: ")
    assert not any((copy / WORK).glob("*-*"))  # its partial copy went at once
    assert main(["archive", "compact", "--data-dir", str(copy.parent), "--after", "0"]) == 1
    out, err = capsys.readouterr()
    assert "1 hours failed and were left as they are (first: gpu_samples/date=2026-03-01/hour=10: " in out
    assert "Traceback" not in err


def test_an_hour_whose_copy_would_leave_too_little_free_is_left_for_later(copy: Path) -> None:
    """The archive's floor (archive.min_free_mb) is for alerts and outboxes: a merge had filled the
    disk to 0 bytes and left its partial copy behind."""
    before, listing = answers(copy), files(copy, "gpu_samples")
    free_mb = shutil.disk_usage(copy).free / 2**20
    stats = compact(copy, now=LATER, min_free_mb=free_mb)
    assert stats.hours == 0 and stats.short_of_space >= 2 and "left for want of free space" in stats.line()
    assert files(copy, "gpu_samples") == listing and answers(copy) == before
    assert compact(copy, now=LATER, min_free_mb=1).hours >= 2  # room enough: merged


def test_one_file_of_an_older_schema_version_is_rewritten(tmp_path: Path) -> None:
    """A one-file hour of facility_sample v1 in the current archive format: its derived device_class is
    in the file only once its hour is rewritten through the upgrade (readers other than `fleetwatch
    query` read it null: an alert v1's remediation too); one file had passed for compacted."""
    from pipeline.model import _on_disk
    archive = known_archive(tmp_path) / "archive"
    hour = next((archive / "facility_samples").glob("*/hour=10"))
    old = [f for f in hour.glob("*.parquet") if pq.read_schema(f).metadata[b"fleetwatch.version"] == b"1"]
    for f in hour.glob("*.parquet"):
        if f not in old:
            f.unlink()
    table = pq.read_table(old[0])
    schema = _on_disk(table.schema)
    pq.write_table(table.cast(schema), old[0])  # one v1 file, format 2
    assert "device_class" not in pq.read_schema(old[0]).names
    assert compact(archive, now=LATER).hours >= 1
    [merged] = files(archive, "facility_samples")
    assert pq.read_schema(merged).metadata[b"fleetwatch.version"] == b"2"
    assert {r["device_class"] for r in pq.read_table(merged).to_pylist()} == {"meter"}


def test_retention_frees_a_full_disk_while_every_write_fails(copy: Path) -> None:
    """Upkeep had run only after a write that succeeded: on a disk under archive.min_free_mb, where every
    write fails, the hours past their retention that would free it were never deleted."""
    import asyncio
    from pipeline.bus import MemoryBus, Message, Topic
    from pipeline.roles import DATASET_OF_TOPIC
    from pipeline.sinks.archive_sink import archive_role
    cfg = make_config(fleet={"racks": 1, "nodes_per_rack": 2, "fault_interval_s": 0.0, "gpu_reset_interval_s": 0.0})
    batch = FleetSimulator(cfg.fleet).step().gpu
    full = ArchiveWriter(copy, min_free_mb=shutil.disk_usage(copy).free / 2**20 * 4)  # never room to write

    async def run() -> None:
        bus = MemoryBus()
        sub = bus.subscribe(list(DATASET_OF_TOPIC), "archive")
        upkeep = make_config(archive={"upkeep_interval_s": 3600.0}).archive  # March's hours: past 30 days
        role = asyncio.create_task(archive_role(full, sub, 0.1, upkeep=upkeep))
        await bus.publish(Message(Topic.GPU, batch))
        for _ in range(600):
            if not list((copy / "gpu_samples").glob("date=*")):
                break
            await asyncio.sleep(0.1)
        role.cancel()
        await asyncio.gather(role, return_exceptions=True)
    asyncio.run(run())
    # (nothing written either: the new sample's hour is not there)
    assert not list((copy / "gpu_samples").glob("date=*")) and not list((copy / "facility_samples").glob("date=*"))
