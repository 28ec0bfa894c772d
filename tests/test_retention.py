"""Retention (sinks/retention.py) and `fleetwatch archive prune|stats|compact`: hours past
their dataset's retention go, by the clock, whole; the rest stays as it was."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from pipeline.analytics.archive_stats import stats
from pipeline.analytics.query import Archive
from pipeline.cli import main
from pipeline.sinks.retention import prune
from tests.conftest import make_config
from tests.test_compaction import T0, files, write_fleet


def count(archive: Path, dataset: str) -> int:
    return Archive(archive).run(f"select count(*) as n from {dataset}").column("n")[0].as_py()


def test_hours_past_their_retention_go_whole_and_nothing_else(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write_fleet(archive, 2 * 3600)  # hours 10 and 11 of T0's day, and the flush at 12:00
    settings = make_config().archive  # samples 30 days, records 400
    events = count(archive, "events")
    hour11 = len(list((archive / "gpu_samples").glob("*/hour=11/*.parquet")))
    rows11 = Archive(archive).run("select count(*) as n from gpu_samples where hour = 11").column("n")[0].as_py()
    now = T0 + timedelta(days=30, hours=1, minutes=30)  # hour 10 ended 30 days and 30 minutes ago
    dry = prune(archive, settings, now=now, dry_run=True)
    assert (dry.hours, dry.by_dataset) == (2, {"gpu_samples": 1, "facility_samples": 1}) and dry.files >= 2 * 360
    assert len(list((archive / "gpu_samples").glob("*/hour=10"))) == 1  # (a dry run deletes nothing)
    done = prune(archive, settings, now=now)
    assert (done.hours, done.files) == (dry.hours, dry.files)
    assert not list((archive / "gpu_samples").glob("*/hour=10")) and not list((archive / "facility_samples").glob("*/hour=10"))
    assert len(list((archive / "gpu_samples").glob("*/hour=11/*.parquet"))) == hour11
    assert count(archive, "gpu_samples") == rows11 + Archive(archive).run(
        "select count(*) as n from gpu_samples where hour = 12").column("n")[0].as_py()
    assert count(archive, "events") == events  # 400 days
    # Everything past: the day's folder goes too; a retention of 0 keeps forever.
    prune(archive, make_config(archive={"retention_days_records": 0}).archive, now=T0 + timedelta(days=3650))
    assert not list((archive / "gpu_samples").glob("date=*")) and count(archive, "gpu_samples") == 0
    assert count(archive, "events") == events


def test_archive_commands(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    write_fleet(data / "archive", 1200)
    assert main(["archive", "stats", "--data-dir", str(data), "--json"]) == 0
    days = json.loads(capsys.readouterr().out)
    gpu = next(d for d in days if d["dataset"] == "gpu_samples")
    assert gpu["day"] == "2026-03-01" and gpu["files"] == len(files(data / "archive", "gpu_samples"))
    assert gpu["rows"] == count(data / "archive", "gpu_samples") and 0 < gpu["bytes_per_value"] < 10
    assert main(["archive", "stats", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["DATASET", "DAY", "FILES", "ROWS", "MB", "BYTES/VALUE"]

    assert main(["archive", "compact", "--data-dir", str(data), "--after", "0"]) == 0
    assert "hours compacted: " in capsys.readouterr().out
    assert len(files(data / "archive", "gpu_samples")) == 1
    assert stats(data / "archive")[0].files == 1

    rows = count(data / "archive", "gpu_samples")
    assert main(["archive", "prune", "--data-dir", str(data), "--dry-run"]) == 0  # March: past 30 days by the clock
    assert "would delete 2 hours" in capsys.readouterr().out and count(data / "archive", "gpu_samples") == rows
    assert main(["archive", "prune", "--data-dir", str(data)]) == 0
    assert "deleted 2 hours" in capsys.readouterr().out and count(data / "archive", "gpu_samples") == 0

    assert main(["archive", "stats", "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
