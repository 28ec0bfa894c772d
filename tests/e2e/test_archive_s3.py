"""End-to-end: the archive on a real S3-compatible server (s3proxy, tests/services.py) as
Delta Lake tables (sinks/delta.py): the daemon writes it, `fleetwatch query`, polars and
DuckDB read it back, a redelivered Kafka batch is skipped by the offsets each commit
records (and over a real Kafka: tests/e2e/test_kafka.py), compaction and retention run
there, and the secret key is never shown."""

from __future__ import annotations

import json
from datetime import timedelta

import duckdb
import polars as pl
import pytest
from deltalake import DeltaTable

from pipeline.config import load_config
from pipeline.sinks import delta
from pipeline.sinks.delta import DeltaArchiveWriter, DeltaLocation
from pipeline.sources.simulate import FleetSimulator
from tests.archives import T0
from tests.conftest import fleetwatch, make_config
from tests.helpers import FAST, reported_samples
from tests.services import S3Proxy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3():
    s = S3Proxy().start()
    s.create_bucket("fleet")
    yield s
    s.close()


def env_of(s3: S3Proxy, prefix: str) -> dict[str, str]:
    """The daemon's settings for the archive at s3://fleet/<prefix>; credentials in AWS's variables."""
    return {"FLEETWATCH_ARCHIVE__URL": f"s3://fleet/{prefix}", "FLEETWATCH_ARCHIVE__S3_ENDPOINT_URL": s3.endpoint,
            "FLEETWATCH_ARCHIVE__S3_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_REGION": "us-east-1"}


def test_the_daemon_archives_to_s3_and_every_reader_reads_it(s3, tmp_path):
    env = FAST | env_of(s3, "daemon")
    r = fleetwatch("run", "--duration", "8", "--data-dir", "data", "--seed", "2", cwd=tmp_path, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    samples = reported_samples(r.stderr)
    assert samples > 0
    assert not list((tmp_path / "data").glob("archive/*/date=*")), "nothing on local disk"

    # fleetwatch query: the same views as on disk, read from the Delta tables.
    q = fleetwatch("query", "--data-dir", "data", "--format", "json",
                   "select count(*) as n, count(distinct gpu_uuid) as gpus, min(date) as day from gpu_samples",
                   cwd=tmp_path, env=env)
    assert q.returncode == 0, q.stderr
    [row] = json.loads(q.stdout)
    assert row["n"] == samples and row["gpus"] == 2 * 8 * 8 and row["day"]
    alerts = fleetwatch("query", "--data-dir", "data", "--format", "json",
                        "select count(*) as n from alerts where status = 'firing'", cwd=tmp_path, env=env)
    assert json.loads(alerts.stdout)[0]["n"] > 0  # FAST injects a fault every 4 s

    # polars and DuckDB, as an analyst reads the bucket.
    where = delta.location(load_config(None, env=env).archive)
    where = DeltaLocation(where.url, where.storage_options | {"AWS_ACCESS_KEY_ID": s3.access_key,
                                                             "AWS_SECRET_ACCESS_KEY": s3.secret_key})
    frame = pl.scan_delta(where.table_uri("gpu_samples"), storage_options=where.storage_options)
    assert frame.select(pl.len()).collect().item() == samples
    assert frame.collect_schema()["ts"] == pl.Datetime("us", "UTC")
    dataset = where.table("gpu_samples").to_pyarrow_dataset()
    assert duckdb.connect().from_arrow(dataset).aggregate("count(*)").fetchall() == [(samples,)]

    for out in (r.stdout, r.stderr, q.stdout, q.stderr):
        assert s3.secret_key not in out


def test_a_redelivered_batch_is_skipped_by_the_offsets_in_the_commits(s3):
    where = DeltaLocation("s3://fleet/kafka", s3.storage_options)
    sim = FleetSimulator(make_config(fleet={"racks": 1, "nodes_per_rack": 2, "fault_interval_s": 0}).fleet, start=T0)
    batches = [sim.step().gpu for _ in range(20)]
    first = DeltaArchiveWriter(where, writer_id="a")
    for offset, b in enumerate(batches[:12]):  # partition 3, offsets 0-11
        first.add("gpu_samples", b, 3, offset)
    first.flush()
    # A restart (or the partition's new owner after a rebalance) reads again from the last commit, 8.
    second = DeltaArchiveWriter(where, writer_id="b")
    assert second.archived_until("gpu_samples", 3) == 11 and second.archived_until("gpu_samples", 4) == -1
    for offset, b in list(enumerate(batches))[8:]:
        if offset > second.archived_until("gpu_samples", 3):  # what ArchiveSink.add does
            second.add("gpu_samples", b, 3, offset)
    second.flush()
    table = DeltaTable(where.table_uri("gpu_samples"), storage_options=s3.storage_options)
    assert table.transaction_version("fleetwatch-archive-p0003") == 19
    rows = pl.from_arrow(table.to_pyarrow_table())
    assert rows.height == sum(b.num_rows for b in batches)
    assert rows.select("gpu_uuid", "ts").unique().height == rows.height  # each sample once


def test_compaction_and_retention_on_s3(s3):
    where = DeltaLocation("s3://fleet/upkeep", s3.storage_options)
    sim = FleetSimulator(make_config(fleet={"racks": 1, "nodes_per_rack": 2, "fault_interval_s": 0}).fleet, start=T0)
    w = DeltaArchiveWriter(where)
    for i in range(60):
        w.add("gpu_samples", sim.step().gpu)
        if i % 10 == 9:
            w.flush()  # six commits: six small files in hour 10
    before = DeltaTable(where.table_uri("gpu_samples"), storage_options=s3.storage_options)
    rows, files = before.to_pyarrow_table().num_rows, len(before.file_uris())
    assert files == 6

    done = delta.compact(where, after_s=900.0, now=T0 + timedelta(hours=2))
    assert (done.hours, done.files_in, done.files_out) == (1, 6, 1)
    after = DeltaTable(where.table_uri("gpu_samples"), storage_options=s3.storage_options)
    assert len(after.file_uris()) == 1 and after.to_pyarrow_table().num_rows == rows
    assert delta.compact(where, now=T0 + timedelta(hours=2)).hours == 0  # one file: nothing to do

    cfg = load_config(None, env={"FLEETWATCH_ARCHIVE__RETENTION_DAYS_SAMPLES": "30"}).archive
    assert delta.prune(where, cfg, now=T0 + timedelta(days=29)).hours == 0
    gone = delta.prune(where, cfg, now=T0 + timedelta(days=31))
    assert gone.hours == 1 and gone.rows == rows
    assert DeltaTable(where.table_uri("gpu_samples"), storage_options=s3.storage_options).to_pyarrow_table().num_rows == 0


def test_refused_credentials_fail_the_write_without_showing_the_secret(s3):
    wrong = s3.storage_options | {"AWS_SECRET_ACCESS_KEY": "not-the-secret-at-all-9f3c"}
    w = DeltaArchiveWriter(DeltaLocation("s3://fleet/refused", wrong))
    sim = FleetSimulator(make_config(fleet={"racks": 1, "nodes_per_rack": 1, "fault_interval_s": 0}).fleet, start=T0)
    w.add("gpu_samples", sim.step().gpu)
    taken = w.take()
    with pytest.raises(OSError) as e:
        w.write(taken)
    assert "object storage" in str(e.value) and "not-the-secret-at-all-9f3c" not in str(e.value)
    assert sum(b.rows for b in taken.values()) == 8  # kept for the retry (the archive's outage path)

