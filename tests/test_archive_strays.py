"""What a real archive holds besides its writers' files, read by every reader alike: stray files
(a copy tool's hidden copy, Spark's `_SUCCESS`, notes, a temporary file) are no data for any of
them; a damaged file (zero bytes, cut short) is named, with what to do, and the rest still reads."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.analytics.archive import reading, scan
from pipeline.analytics.archive_stats import stats, text
from pipeline.analytics.capacity import report
from pipeline.analytics.query import Archive, QueryError
from pipeline.config import ConfigError
from pipeline.model import GPU_SAMPLE_V2, _schema
from pipeline.sinks.compaction import compact
from tests.archives import T0, batch, known_archive, write_file


def answers(archive: Path) -> tuple:
    """What each reader says the archive holds: DuckDB's rows, polars', the footers', the capacity's hours."""
    duck = Archive(archive).run("select count(*) as n from gpu_samples").column("n")[0].as_py()
    polars = scan(archive / "gpu_samples").collect().height
    footers = sum(d.rows for d in stats(archive) if d.dataset == "gpu_samples")
    return duck, polars, footers, round(report(archive).total, 6)


def test_stray_and_hidden_files_are_no_data_for_any_reader(tmp_path: Path) -> None:
    """A hidden copy of a file had been read by DuckDB and polars and merged by compaction for good (its
    rows counted twice), and a stray non-Parquet file had failed polars' scan of the whole dataset
    (capacity, report, power report: a traceback)."""
    archive = known_archive(tmp_path) / "archive"
    before = answers(archive)
    hour = next((archive / "gpu_samples").glob("date=*/hour=*"))
    a_file = next(hour.glob("part-*.parquet"))
    shutil.copy(a_file, hour / f".{a_file.name}")  # (rsync's and editors' hidden copies)
    for stray in (archive / "gpu_samples" / "_SUCCESS", archive / "gpu_samples" / ".DS_Store", hour / "notes.txt",
                  hour / "part-x.parquet.tmp", hour / "_committed_123"):
        stray.write_bytes(b"not data")
    assert answers(archive) == before
    assert compact(archive, after_s=0, now=T0 + timedelta(days=1)).failed == []
    assert answers(archive) == before and (hour / f".{a_file.name}").exists()  # (left as it is: not ours)
    # Retention takes the whole hour, strays and all, and says so (its count had been the data files only)
    from pipeline.config import ArchiveConfig
    from pipeline.sinks.retention import prune
    files = sum(1 for f in hour.iterdir() if f.is_file())
    said = prune(archive, ArchiveConfig(retention_days_samples=1), now=T0 + timedelta(days=3), dry_run=True)
    assert said.files >= files and said.bytes >= sum(f.stat().st_size for f in hour.iterdir() if f.is_file())


def test_a_damaged_file_is_named_with_what_to_do_and_the_rest_still_reads(tmp_path: Path) -> None:
    archive = known_archive(tmp_path) / "archive"
    hour = next((archive / "gpu_samples").glob("date=*/hour=*"))
    zero, cut = hour / "part-zero-000001.parquet", hour / "part-cut-000002.parquet"
    zero.write_bytes(b"")
    cut.write_bytes(next(hour.glob("part-*-test-*.parquet")).read_bytes()[:300])
    days = stats(archive)
    assert sorted(f for d in days for f in d.unreadable) == sorted([str(cut), str(zero)])
    assert "2 files are not readable Parquet" in text(days) and str(zero) in text(days)
    assert Archive(archive).run("select count(*) as n from alerts").column("n")[0].as_py() == 6  # (another view)
    assert Archive(archive).run("select 1 as one").column("one")[0].as_py() == 1  # (no view)
    assert "gpu_samples" in Archive(archive).run("show tables").column("name").to_pylist()  # (every view listed)
    with pytest.raises(QueryError, match=r"part-(zero|cut)-00000\d.parquet is not readable Parquet.*move it out"):
        Archive(archive).run("select count(*) from gpu_samples")
    with pytest.raises(ConfigError, match=r"capacity: a file of the archive is not readable Parquet.*archive stats"):
        with reading("capacity", archive):
            report(archive)
    done = compact(archive, after_s=0, now=T0 + timedelta(days=1))
    assert len(done.failed) == 1 and done.failed[0].startswith("gpu_samples/") and done.hours >= 1  # the others


def test_an_hour_of_files_older_than_the_upgrades_reach_is_compacted_as_the_readers_read_it(tmp_path: Path) -> None:
    """gpu_sample v1 (before slowdown_temp_c; UPGRADES no longer lists it): the readers read its rows, null
    there, but compaction raised on the hour at every pass and merged no later hour, ever."""
    v1 = _schema("gpu_sample", 1, [f for f in GPU_SAMPLE_V2 if f.name != "slowdown_temp_c"], "v1")
    archive = tmp_path / "archive"
    for i in range(2):
        rows = {"ts": [T0 + timedelta(seconds=10 * k + i) for k in range(5)], "site": ["s1"] * 5, "rack": ["r01"] * 5,
                "node": ["n01"] * 5, "gpu": [0] * 5, "gpu_uuid": ["GPU-a"] * 5, "power_w": [500.0] * 5}
        write_file(archive / "gpu_samples", pa.Table.from_batches([batch(v1, rows)]), f"part-{i}-v1-00000{i}.parquet")
    sql = "select count(*) as n, count(slowdown_temp_c) as t, sum(power_w) as w from gpu_samples"
    before = Archive(archive).run(sql).to_pylist()
    done = compact(archive, after_s=0, now=T0 + timedelta(days=1))
    assert done.failed == [] and (done.hours, done.files_in, done.files_out) == (1, 2, 1)
    assert Archive(archive).run(sql).to_pylist() == before == [{"n": 10, "t": 0, "w": 5000.0}]


def test_an_archive_whose_path_holds_a_glob_character_is_read_by_every_reader(tmp_path: Path) -> None:
    """A data_dir such as /data/fleet[a]: the readers' globs had taken `[a]` for a character class and found
    no file (capacity: no GPU samples; query: empty views)."""
    plain = answers(known_archive(tmp_path / "plain") / "archive")
    assert answers(known_archive(tmp_path / "fleet[a]") / "archive") == plain and plain[0] > 0
