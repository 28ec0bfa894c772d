"""The Parquet archive: hive layout, zstd, atomic, append-safe, readable by polars and DuckDB."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.model import ARCHIVE_SCHEMAS
from pipeline.sinks.parquet import ArchiveWriter
from pipeline.sources.simulate import FleetSimulator
from tests.conftest import make_config


def gpu_batches(n: int, start: datetime) -> list[pa.RecordBatch]:
    sim = FleetSimulator(make_config(fleet={"racks": 1, "nodes_per_rack": 2, "fault_interval_s": 0}).fleet,
                         start=start)
    return [sim.step().gpu for _ in range(n)]


def test_hive_layout_zstd_and_atomic(tmp_path):
    w = ArchiveWriter(tmp_path, "zstd")
    start = datetime(2026, 3, 1, 23, 59, 30, tzinfo=timezone.utc)  # crosses an hour and a day
    for b in gpu_batches(60, start):
        w.add("gpu_samples", b)
    paths = w.flush()
    rel = sorted(str(p.relative_to(tmp_path).parent) for p in paths)
    assert rel == ["gpu_samples/date=2026-03-01/hour=23", "gpu_samples/date=2026-03-02/hour=00"]
    for p in paths:
        assert p.name.startswith("part-") and p.suffix == ".parquet"
        meta = pq.ParquetFile(p).metadata
        assert meta.row_group(0).column(0).compression == "ZSTD"
    assert staged(tmp_path) == []  # nothing left half-written
    dataset_files = list((tmp_path / "gpu_samples").rglob("*"))
    assert not [f for f in dataset_files if f.name.startswith((".", "_"))]


def test_a_write_returns_once_its_renames_are_durable(tmp_path, monkeypatch):
    """A rename lives in its folder: unsynced, a power loss may lose it after Kafka's offsets were committed
    (the file itself was fsynced, its name was not). Each hour folder written into is synced, and the day and
    dataset folders a new hour or day added an entry to, before the write returns."""
    import os
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    w = ArchiveWriter(tmp_path, "zstd")
    for b in gpu_batches(60, datetime(2026, 3, 1, 23, 59, 30, tzinfo=timezone.utc)):
        w.add("gpu_samples", b)
    monkeypatch.setattr(os, "fsync", fsync)
    paths = w.flush()
    folders = {str(f) for p in paths for f in (p.parent, p.parent.parent, p.parent.parent.parent)}
    assert folders <= set(synced), sorted(folders - set(synced))


def test_appending_never_overwrites_and_both_readers_agree(tmp_path):
    w = ArchiveWriter(tmp_path)
    start = datetime(2026, 3, 1, 10, tzinfo=timezone.utc)
    batches = gpu_batches(30, start)
    for b in batches[:10]:
        w.add("gpu_samples", b)
    w.flush()
    for b in batches[10:]:
        w.add("gpu_samples", b)
    w.flush()
    w2 = ArchiveWriter(tmp_path)  # a second writer (a restart) into the same partition
    w2.add("gpu_samples", batches[0])
    w2.flush()
    expected = sum(b.num_rows for b in batches) + batches[0].num_rows
    lf = pl.scan_parquet(tmp_path / "gpu_samples", hive_partitioning=True)
    df = lf.collect()
    assert df.height == expected
    assert df["hour"].unique().to_list() == [10]
    assert df.select(pl.exclude("date", "hour")).schema == pl.from_arrow(ARCHIVE_SCHEMAS["gpu_samples"].empty_table()).schema
    con = duckdb.connect()
    n_duck = con.execute(f"select count(*) from read_parquet('{tmp_path}/gpu_samples/*/*/*.parquet', "
                         f"hive_partitioning=true)").fetchall()[0][0]
    assert n_duck == expected
    power = con.execute(f"select avg(power_w) from read_parquet('{tmp_path}/gpu_samples/**/*.parquet')").fetchall()[0][0]
    assert abs(power - df["power_w"].mean()) < 1e-6


def staged(archive: Path) -> list[Path]:
    """Files in staging (each writer's folder, and what older versions left in `.staging`)."""
    return [f for f in (archive / ".staging").rglob("*") if f.is_file() and f.name != ".lock"]


def test_staging_leftovers_from_a_crash_are_removed(tmp_path):
    (tmp_path / ".staging").mkdir(parents=True)
    (tmp_path / ".staging" / "part-1-x-000001.parquet").write_bytes(b"half a file")
    ArchiveWriter(tmp_path)
    assert staged(tmp_path) == []


def test_a_writer_starting_beside_a_live_one_leaves_its_staging_alone(tmp_path):
    """Archive processes may share a folder: one starting had removed (and would now place) the
    files another was writing, whose rename then failed as an outage. Each stages in a folder of
    its own, locked while it lives; a start recovers only the folders of writers that are gone."""
    live = ArchiveWriter(tmp_path)
    writing = live.staging / "gpu_samples-493000-part-1-w-000001.parquet.partial"
    writing.write_bytes(b"half a file, being written")
    ArchiveWriter(tmp_path)
    assert writing.exists()
    live.close()  # (or killed: the lock goes with the process)
    ArchiveWriter(tmp_path)
    assert not writing.exists() and not live.staging.exists()


def test_flush_is_signalled_when_the_buffer_is_full(tmp_path):
    w = ArchiveWriter(tmp_path, max_buffer_rows=40)
    b = gpu_batches(2, datetime(2026, 3, 1, tzinfo=timezone.utc))
    assert w.add("gpu_samples", b[0]) is False  # 16 rows
    assert w.add("gpu_samples", b[1]) is False  # 32
    assert w.add("gpu_samples", b[1]) is True   # 48 >= 40


def test_files_from_a_partition_are_named_by_offsets_and_a_restart_knows_them(tmp_path):
    start = datetime(2026, 3, 1, 10, tzinfo=timezone.utc)
    batches = gpu_batches(6, start)
    w = ArchiveWriter(tmp_path)
    for offset, b in enumerate(batches[:4]):
        w.add("gpu_samples", b, partition=2, offset=100 + offset)
    w.add("gpu_samples", batches[4], partition=0, offset=7)
    [p0, p2] = sorted(w.flush(), key=lambda p: p.name)
    assert p2.name == "part-p0002-o0000000000000100-0000000000000103.parquet"
    assert p0.name == "part-p0000-o0000000000000007-0000000000000007.parquet"
    # A restarted writer (a new process) learns from the file names what is archived.
    again = ArchiveWriter(tmp_path)
    assert again.archived_until("gpu_samples", 2) == 103
    assert again.archived_until("gpu_samples", 0) == 7
    assert again.archived_until("gpu_samples", 1) == -1
    assert again.archived_until("facility_samples", 2) == -1
    # Writing the same range again replaces the file: no duplicate rows.
    for offset, b in enumerate(batches[:4]):
        again.add("gpu_samples", b, partition=2, offset=100 + offset)
    again.flush()
    rows = pl.scan_parquet(tmp_path / "gpu_samples", hive_partitioning=True).collect().height
    assert rows == sum(b.num_rows for b in batches[:5])
