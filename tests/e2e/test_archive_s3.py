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
from pipeline.sinks.parquet import ArchiveWriter
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



def test_capacity_power_report_stats_and_report_read_the_bucket_as_they_read_local_disk(s3, tmp_path):
    """The same archive on local disk and as Delta tables on S3 (a known fleet hour, files of older
    versions among them, and one power request): `fleetwatch capacity --json` and `power report
    --json` give the same answers from both, `archive stats` counts the same rows, and `report`
    writes its page from the bucket, with no data_dir on the reading machine. All four had
    refused object storage."""
    import pyarrow as pa

    from pipeline.analytics.archive import dataset
    from pipeline.model import POWER_REQUEST_REPORT, SCHEMAS
    from tests.archives import batch, known_archive
    data = known_archive(tmp_path / "local")
    w = ArchiveWriter(data / "archive", writer_id="test")
    w.add("power_requests", batch(POWER_REQUEST_REPORT, {
        "ts": [T0 + timedelta(minutes=40)], "id": ["dr-1"], "site": ["s1"], "source": ["cli"],
        "start": [T0 + timedelta(minutes=20)], "end": [T0 + timedelta(minutes=35)], "ramp_s": [30.0],
        "requested_kw": [50.0], "baseline_kw": [200.0], "reached_s": [12.5], "reduction_p50_kw": [52.0],
        "reduction_min_kw": [50.5], "energy_curtailed_kwh": [13.0], "gpus_capped": [96],
        "throughput_lost_gpu_h": [1.5], "uniform_lost_gpu_h": [2.0], "met": [True], "state": ["done"],
        "dry_run": [False]}))
    w.flush()
    where = DeltaLocation("s3://fleet/readers", s3.storage_options)
    copy = DeltaArchiveWriter(where, writer_id="copy")
    for name in SCHEMAS:  # every dataset as the reader sees it locally, older files upgraded
        frame = dataset(data / "archive", name)
        if frame is not None:
            for b in frame.drop("date", "hour").collect().to_arrow().to_batches():
                copy.add(name, pa.RecordBatch.from_pydict(b.to_pydict(), schema=SCHEMAS[name]))
    copy.flush()

    env, away = env_of(s3, "readers"), tmp_path / "analyst"  # (no data_dir there)
    away.mkdir()
    answers = {}
    for args in (["capacity", "--json"], ["power", "report", "--json"]):
        local = fleetwatch(*args, "--data-dir", str(data), cwd=tmp_path)
        remote = fleetwatch(*args, cwd=away, env=env)
        assert local.returncode == 0 and remote.returncode == 0, (local.stderr[-2000:], remote.stderr[-2000:])
        answers[args[0]] = json.loads(remote.stdout)
        assert answers[args[0]] == json.loads(local.stdout), args
    assert answers["capacity"]["gpu_hours"]["capped_lost"] > 0 and answers["capacity"]["gpu_hours"]["faulted"] > 0
    assert [r["id"] for r in answers["power"]] == ["dr-1"]

    def rows(out: str) -> dict:
        return {(d["dataset"], d["day"]): d["rows"] for d in json.loads(out)}
    local = fleetwatch("archive", "stats", "--json", "--data-dir", str(data), cwd=tmp_path)
    remote = fleetwatch("archive", "stats", "--json", cwd=away, env=env)
    assert remote.returncode == 0, remote.stderr[-2000:]
    assert rows(remote.stdout) == rows(local.stdout) and len(rows(local.stdout)) >= 5
    assert all(d["bytes"] > 0 and d["values"] > 0 for d in json.loads(remote.stdout))

    page = fleetwatch("report", "--out", "report.html", cwd=away, env=env, timeout=300)
    assert page.returncode == 0, page.stderr[-2000:]
    html = (away / "report.html").read_text()
    assert "s3://fleet/readers" in html and "GpuUncorrectableEcc" in html
    for out in (remote.stdout, remote.stderr, page.stdout, page.stderr, html):
        assert s3.secret_key not in out
