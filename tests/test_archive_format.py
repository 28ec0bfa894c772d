"""The archive's format (model.ARCHIVE_SCHEMAS): times on disk in microseconds, which Spark
and Trino read (they refuse Parquet's nanosecond timestamps), each file marked with its
format; files of format 1 (nanoseconds, before 2026-12) are still read by every reader,
and compaction rewrites them as format 2."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.analytics.alerts_table import read_archive
from pipeline.analytics.archive import scan
from pipeline.analytics.query import Archive
from pipeline.model import ARCHIVE_FORMAT, ARCHIVE_SCHEMAS, GPU_SAMPLE, SCHEMAS, alerts_to_batch, archive_format
from pipeline.sinks.compaction import compact
from pipeline.sinks.parquet import ArchiveWriter
from tests.archives import T0, alert, batch, write_file

# A real clock's reading (time.time_ns()): nanoseconds the archive keeps to the microsecond.
NS = [int(T0.timestamp()) * 10**9 + 123_456_789, int(T0.timestamp()) * 10**9 + 10**9 + 999_999_999]
US = [n // 1000 for n in NS]  # truncated, as pyarrow and polars cast


def gpu_table(ts_ns: list[int], node: str) -> pa.Table:
    return pa.Table.from_batches([batch(GPU_SAMPLE, {
        "ts": pa.array(ts_ns, pa.timestamp("ns", "UTC")), "site": ["s1"] * len(ts_ns), "rack": ["r01"] * len(ts_ns),
        "node": [node] * len(ts_ns), "gpu": [0] * len(ts_ns), "gpu_uuid": [f"GPU-{node}"] * len(ts_ns),
        "power_w": [500.0] * len(ts_ns)})])


def epoch_us(values) -> list[int]:
    return [int(v.timestamp() * 10**6) if isinstance(v, datetime) else v // 1000 for v in values]


def test_every_time_is_written_in_microseconds_and_marked(tmp_path: Path) -> None:
    w = ArchiveWriter(tmp_path, writer_id="w")
    w.add("gpu_samples", gpu_table(NS, "n01").to_batches()[0])
    w.add("alerts", alerts_to_batch([(T0, alert("GpuStraggler", "warning", {"node": "n01"}, 0.5, 90.25))]))
    paths = w.flush()
    assert len(paths) == 2
    for path in paths:
        f = pq.ParquetFile(path)
        times = [c for c in f.schema if c.logical_type.type == "TIMESTAMP"]
        assert times, path  # ts; an alert's starts_at and ends_at too
        for column in times:  # what Spark and Trino read: INT64 TIMESTAMP(MICROS, UTC)
            logical = json.loads(column.logical_type.to_json())
            assert column.physical_type == "INT64"
            assert (logical["timeUnit"], logical["isAdjustedToUTC"]) == ("microseconds", True), column.name
        assert archive_format(f.schema_arrow) == ARCHIVE_FORMAT == 2
        dataset = path.parts[-4]
        assert f.schema_arrow.remove_metadata() == ARCHIVE_SCHEMAS[dataset].remove_metadata()
    samples = pq.read_table(tmp_path / "gpu_samples").column("ts").cast(pa.int64()).to_pylist()
    assert samples == US  # truncated to the microsecond, never rounded up into the next one
    [row] = pq.read_table(tmp_path / "alerts").to_pylist()
    assert row["starts_at"] == T0 + timedelta(seconds=0.5) and row["ends_at"] == T0 + timedelta(seconds=90.25)


def test_an_hour_of_both_formats_reads_whole_in_every_reader(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write_file(archive / "gpu_samples", gpu_table(NS, "old"), "part-1-older-000001.parquet")  # format 1, as written
    old_alert = pa.Table.from_batches([alerts_to_batch([(T0, alert("GpuXid", "critical", {"node": "old"}, 0, None))])])
    write_file(archive / "alerts", old_alert, "part-1-older-000001.parquet")
    assert archive_format(pq.read_schema(next((archive / "gpu_samples").rglob("*.parquet")))) == 1
    w = ArchiveWriter(archive, writer_id="w")
    w.add("gpu_samples", gpu_table([n + 5 * 10**9 for n in NS], "new").to_batches()[0])
    w.add("alerts", alerts_to_batch([(T0, alert("GpuStraggler", "warning", {"node": "new"}, 1, None))]))
    w.flush()
    new_us = [n // 1000 + 5 * 10**6 for n in NS]

    # polars, by the archive's scan: one column type, old times truncated.
    frame = scan(archive / "gpu_samples").sort("node", "ts").collect()
    assert str(frame.schema["ts"]) == "Datetime(time_unit='us', time_zone='UTC')"
    assert frame["node"].to_list() == ["new", "new", "old", "old"]
    assert epoch_us(frame["ts"].to_list()) == new_us + US

    # DuckDB, by `fleetwatch query`'s views: the same times.
    rows = Archive(archive).run("select node, ts from gpu_samples order by node, ts").to_pylist()
    assert [r["node"] for r in rows] == ["new", "new", "old", "old"]
    assert epoch_us([r["ts"] for r in rows]) == new_us + US

    # `fleetwatch alerts` off the archive: both alerts.
    assert {a["labels"]["node"] for a in read_archive(archive / "alerts").values()} == {"old", "new"}


def test_compaction_rewrites_format_1_hours_as_format_2(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write_file(archive / "gpu_samples", gpu_table(NS, "old"), "part-1-older-000001.parquet")  # one file, format 1
    before = Archive(archive).run("select node, epoch_ns(ts) // 1000 as us from gpu_samples order by us").to_pylist()
    stats = compact(archive, after_s=0.0, now=T0 + timedelta(days=1))
    assert stats.hours == 1  # one file per partition already, but not as the writer writes them today
    [merged] = sorted((archive / "gpu_samples").rglob("*.parquet"))
    assert archive_format(pq.read_schema(merged)) == ARCHIVE_FORMAT
    assert pq.read_table(merged).column("ts").cast(pa.int64()).to_pylist() == US
    assert Archive(archive).run("select node, epoch_ns(ts) // 1000 as us from gpu_samples order by us").to_pylist() \
        == before == [{"node": "old", "us": u} for u in US]
    assert compact(archive, after_s=0.0, now=T0 + timedelta(days=1)).hours == 0  # current now: left alone


def test_the_bus_keeps_nanoseconds() -> None:
    """Only the archive's files change: every wire schema's times are still nanoseconds."""
    for name, schema in SCHEMAS.items():
        for f in schema:
            if pa.types.is_timestamp(f.type):
                assert f.type == pa.timestamp("ns", "UTC"), (name, f.name)
                assert ARCHIVE_SCHEMAS[name].field(f.name).type == pa.timestamp("us", "UTC")
