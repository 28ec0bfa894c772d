"""Where the archive lives (archive.url, sinks/delta.py): the URL checked, credentials read
from an AWS credentials file and never shown, and the commands that read local files only
saying so. The Delta tables themselves are tested on a real S3 server (tests/e2e/test_archive_s3.py)."""

from __future__ import annotations

import re

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.sinks.delta import location
from tests.conftest import fleetwatch


def archive(**env: str):
    return load_config(None, env={f"FLEETWATCH_ARCHIVE__{k.upper()}": v for k, v in env.items()}).archive


def test_the_url_is_s3_or_empty_and_a_credential_in_it_is_masked():
    assert archive().url == "" and archive(url="s3://fleet-archive/site-a").url == "s3://fleet-archive/site-a"
    for bad in ("fleet/archive", "s3://", "http://fleet/archive", "s3://AKIAEXAMPLE:hunter22@fleet/x"):
        with pytest.raises(ConfigError) as e:
            archive(url=bad)
        assert "archive.url" in str(e.value) and "s3://bucket/prefix" in str(e.value)
        assert "hunter22" not in str(e.value)


def test_credentials_from_a_file_and_the_options_for_an_s3_compatible_server(tmp_path):
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = s3cr3t-default\n\n"
                     "[archive]\naws_access_key_id = AKIAARCHIVE\naws_secret_access_key = s3cr3t-archive\n"
                     "aws_session_token = t0ken\n")
    where = location(archive(url="s3://fleet/a", s3_endpoint_url="http://minio:9000", s3_allow_http="true",
                             s3_region="eu-west-1", credentials_file=str(creds), credentials_profile="archive"))
    assert where.storage_options == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_ALLOW_HTTP": "true",
                                     "AWS_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": "AKIAARCHIVE",
                                     "AWS_SECRET_ACCESS_KEY": "s3cr3t-archive", "AWS_SESSION_TOKEN": "t0ken"}
    assert "s3cr3t" not in repr(where) and where.table_uri("alerts") == "s3://fleet/a/alerts"
    # Without a file: nothing but the server's options (object storage reads AWS_* from the environment).
    assert location(archive(url="s3://fleet/a")).storage_options == {}
    error = where.error("appending", RuntimeError("signature for s3cr3t-archive and t0ken refused"))
    assert isinstance(error, OSError) and "s3cr3t-archive" not in str(error) and "t0ken" not in str(error)


@pytest.mark.parametrize("content, says", [
    (None, "No such file"),
    ("not an ini file", "is not an AWS credentials file"),
    ("[default]\naws_access_key_id = AKIA\n", "no [default] section with aws_access_key_id and aws_secret_access_key"),
])
def test_a_bad_credentials_file_says_what_is_wrong(tmp_path, content, says):
    creds = tmp_path / "credentials"
    if content is not None:
        creds.write_text(content)
    with pytest.raises(ConfigError) as e:
        location(archive(url="s3://fleet/a", credentials_file=str(creds)))
    assert says in str(e.value) and str(creds) in str(e.value)


def test_every_command_that_reads_the_archive_says_what_to_check_when_its_bucket_cannot_be_read(tmp_path):
    """No data_dir is needed to read an archive on object storage (an analyst's machine); one
    that cannot be reached is an error naming the table and what to check, not a traceback,
    and never shows the secret key. (The commands reading a real bucket: tests/e2e/test_archive_s3.py.)"""
    env = {"FLEETWATCH_ARCHIVE__URL": "s3://fleet/a", "FLEETWATCH_ARCHIVE__S3_ENDPOINT_URL": "http://127.0.0.1:9",
           "FLEETWATCH_ARCHIVE__S3_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
           "AWS_SECRET_ACCESS_KEY": "s3cr3t-never-shown", "AWS_REGION": "us-east-1"}  # (port 9: nothing listens)
    for args in (["report"], ["capacity"], ["archive", "stats"], ["power", "report"], ["query", "select count(*) from alerts"]):
        r = fleetwatch(*args, cwd=tmp_path, env=env)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert re.search(r"^fleetwatch: .*object storage: reading s3://fleet/a/\w+: .*Connection refused", r.stderr,
                         re.M), (args, r.stderr)
        assert "are credentials set: AWS_* or archive.credentials_file?" in r.stderr
        assert "Traceback" not in r.stderr and "s3cr3t" not in r.stderr + r.stdout


def sim_batches(n: int):
    from pipeline.sources.simulate import FleetSimulator
    from tests.archives import T0
    from tests.conftest import make_config
    sim = FleetSimulator(make_config(fleet={"racks": 1, "nodes_per_rack": 1, "fault_interval_s": 0}).fleet, start=T0)
    return [sim.step().gpu for _ in range(n)]


@pytest.mark.parametrize("partition, app", [(2, "fleetwatch-archive-p0002"), (-1, "fleetwatch-archive-wb1")])
def test_a_commit_whose_reply_was_lost_is_not_written_again(tmp_path, monkeypatch, partition, app):
    """The commit lands, the writer hears an error; meanwhile newer offsets of the partition
    arrive. The retry writes only those (the table's transaction says what it holds). In-process
    (partition -1, no Kafka offsets) the writer numbers its batches itself: the retry had written
    the first six twice."""
    import deltalake
    import polars as pl

    from pipeline.sinks import delta
    where = delta.DeltaLocation(str(tmp_path / "tables"))
    w = delta.DeltaArchiveWriter(where, writer_id="b1")
    batches = sim_batches(10)
    for offset, b in enumerate(batches[:6]):
        w.add("gpu_samples", b, partition, offset if partition >= 0 else -1)
    real = deltalake.write_deltalake

    def lands_then_fails(*args, **kw):
        real(*args, **kw)
        raise OSError("connection reset by peer")
    monkeypatch.setattr(deltalake, "write_deltalake", lands_then_fails)
    taken = w.take()
    with pytest.raises(OSError):
        w.write(taken)
    w.put_back(taken)  # as the archive's outage path does
    for offset, b in list(enumerate(batches))[6:]:
        w.add("gpu_samples", b, partition, offset if partition >= 0 else -1)
    monkeypatch.setattr(deltalake, "write_deltalake", real)
    w.flush()
    rows = pl.read_delta(where.table_uri("gpu_samples"))
    assert rows.height == sum(b.num_rows for b in batches) == rows.select("gpu_uuid", "ts").unique().height
    assert where.table("gpu_samples").transaction_version(app) == 9


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd", "snappy", "gzip"])
def test_every_archive_codec_writes_a_delta_table(tmp_path, codec):
    import polars as pl

    from pipeline.sinks import delta
    where = delta.DeltaLocation(str(tmp_path / "tables"))
    w = delta.DeltaArchiveWriter(where, compression=codec)
    w.add("gpu_samples", sim_batches(1)[0])
    w.flush()
    assert pl.read_delta(where.table_uri("gpu_samples")).height == 8


def delta_copy(tmp_path):
    """The known fleet hour (tests/archives.py) on disk and as Delta tables in a local folder."""
    import pyarrow as pa

    from pipeline.analytics.archive import dataset
    from pipeline.model import SCHEMAS
    from pipeline.sinks.delta import DeltaArchiveWriter, DeltaLocation
    from tests.archives import known_archive
    data = known_archive(tmp_path / "local")
    where = DeltaLocation(str(tmp_path / "tables"))
    copy = DeltaArchiveWriter(where, writer_id="copy")
    for name in SCHEMAS:
        frame = dataset(data / "archive", name)
        if frame is not None:
            for b in frame.drop("date", "hour").collect().to_arrow().to_batches():
                copy.add(name, pa.RecordBatch.from_pydict(b.to_pydict(), schema=SCHEMAS[name]))
    copy.flush()
    return data / "archive", where


def test_a_file_gone_from_the_bucket_while_it_is_read_is_an_error_of_one_line_with_what_to_check(tmp_path):
    """Most of a read happens when the lazy frame is collected (polars) or the query runs (DuckDB),
    after the table was opened: a failure there is said as one at the opening is."""
    import polars as pl

    from pipeline.analytics.archive import dataset, reading
    from pipeline.analytics.query import Archive
    _, where = delta_copy(tmp_path)
    frame = dataset(where, "gpu_samples")
    connection = Archive.at(where).connect()
    for f in (tmp_path / "tables" / "gpu_samples").rglob("*.parquet"):
        f.unlink()  # (a compaction's vacuum under an old reader; a bucket's lifecycle rule)
    for command, read in (("capacity", lambda: frame.select(pl.len()).collect()),
                          ("report", lambda: connection.execute("select count(*) from gpu_samples").fetchall())):
        with pytest.raises(ConfigError) as e:
            with reading(command, where):
                read()
        said = str(e.value)
        assert said.startswith(f"{command}: object storage: reading {where.url}: ") and "\n" not in said, said
        assert "\x1b" not in said and "is the bucket reachable from here" in said


def test_a_defect_while_reading_is_shown_as_one_not_as_the_bucket_s_fault(tmp_path):
    from pipeline.analytics.archive import reading
    _, where = delta_copy(tmp_path)
    with pytest.raises(KeyError):
        with reading("capacity", where):
            {}["date"]


def test_a_table_retention_emptied_is_missing_as_a_folder_without_files_is(tmp_path):
    from deltalake import DeltaTable

    from pipeline.analytics.archive import dataset
    from pipeline.analytics.capacity import report
    local, where = delta_copy(tmp_path)
    assert report(where).to_json() == report(local).to_json()  # (the same answers from both)
    DeltaTable(where.table_uri("alerts")).delete()
    assert dataset(where, "alerts") is None
    assert report(where).missing == ["alerts"]


def test_archive_stats_of_a_delta_table_are_read_from_its_log_not_from_each_file(tmp_path, monkeypatch):
    """A year of hours on object storage is tens of thousands of files: one request for each
    footer took minutes. A table's log holds each file's rows and null counts; only a table
    created before it kept every column's (Delta's default: the first 32, and gpu_samples has
    35) has its files' footers read, and still counts the same."""
    from pipeline.analytics.archive_stats import footer_values, stats
    from pipeline.sinks import delta
    _, where = delta_copy(tmp_path)
    counted = {(d.dataset, d.day): (d.files, d.rows, d.values) for d in stats(where)}
    footers = {}
    for name in {name for name, _ in counted}:
        for f in where.table(name).to_pyarrow_dataset().get_fragments():
            rows, values = footer_values(f.metadata)
            footers[name] = tuple(map(sum, zip(footers.get(name, (0, 0, 0)), (1, rows, values))))
    assert {name: c for (name, _), c in counted.items()} == footers  # (one day in the known hour)
    for f in (tmp_path / "tables").rglob("*.parquet"):
        f.write_bytes(b"no footer here")  # what a read of one would now fail on
    assert {(d.dataset, d.day): (d.files, d.rows, d.values) for d in stats(where)} == counted
    # A table its log knows only the first 32 columns of: the footers, and the same count.
    monkeypatch.setattr(delta, "NEW_TABLE", None)
    older = delta.DeltaLocation(str(tmp_path / "older"))
    writer = delta.DeltaArchiveWriter(older, writer_id="old")
    batches = sim_batches(3)
    for b in batches:
        writer.add("gpu_samples", b)
    writer.flush()
    [day] = stats(older)
    assert (day.rows, day.values) == footer_values(next(iter(
        older.table("gpu_samples").to_pyarrow_dataset().get_fragments())).metadata)
    assert day.rows == sum(b.num_rows for b in batches)
    for f in (tmp_path / "older").rglob("*.parquet"):
        f.write_bytes(b"no footer here")
    with pytest.raises(OSError, match="reading .*gpu_samples"):
        stats(older)
