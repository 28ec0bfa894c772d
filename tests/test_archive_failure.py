"""A failing archive never stops detection or alerting (issue 11, item 3).

A full disk, a blocked `archive/.staging` or a deleted `archive/` while the daemon runs:
the archive holds its data (bounded), retries with backoff and raises
FleetwatchArchiveFailing; detect and notify go on; when it can write again it writes
what it held. In-process it counts what it had to drop; over Kafka nothing is lost.
The full-disk tests mount a small tmpfs, which needs root.

The end-to-end tests (processes, brokers, tmpfs) are in tests/e2e/test_archive_failure.py.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from pipeline.sinks.parquet import ArchiveWriter

from tests.helpers import archived
from tests.test_archive import staged


def gpu_files(data: Path) -> set[Path]:
    return set((data / "archive" / "gpu_samples").rglob("*.parquet"))


def test_a_failed_write_hands_back_exactly_what_is_not_on_disk(tmp_path):
    """A flush whose second hour cannot be written (a file where its folder goes): no hour's
    file is placed, every row comes back for the retry, nothing half-written is left, and
    the retry writes each row once. The first hour's file had stayed: over Kafka, a process
    killed before its retry was read again from after the whole buffer, the rest lost."""
    from datetime import datetime, timezone

    from tests.test_archive import gpu_batches
    w = ArchiveWriter(tmp_path / "archive")
    batches = gpu_batches(60, datetime(2026, 3, 1, 23, 59, 30, tzinfo=timezone.utc))  # crosses an hour
    for b in batches:
        w.add("gpu_samples", b)
    blocker = tmp_path / "archive" / "gpu_samples" / "date=2026-03-02"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")
    taken = w.take()
    with pytest.raises(OSError):
        w.write(taken)
    w.put_back(taken)
    rows = pl.from_arrow(pa.Table.from_batches(batches))
    assert 0 < rows.filter(pl.col("ts") < datetime(2026, 3, 2, tzinfo=timezone.utc)).height < rows.height
    assert w.held_rows() == rows.height  # every row back: ...
    assert not gpu_files(tmp_path)  # ... and none on disk
    assert not staged(tmp_path / "archive")
    blocker.unlink()
    w.flush()
    gpu = archived(tmp_path, "gpu_samples")
    assert gpu.height == sum(b.num_rows for b in batches)
    assert gpu.select(pl.struct("gpu_uuid", "ts").is_unique().all()).item()


def test_a_kafka_buffer_whose_second_hour_fails_is_not_taken_for_archived_by_a_restart(tmp_path):
    """Over Kafka: a flush across an hour whose second hour cannot be written, and the process
    killed before its retry. The restart reads its partition again from the last commit and
    skips what the file names say is archived: nothing of that buffer, so every row is written.
    The first hour's file had named the whole offset range, and the second hour was lost."""
    from datetime import datetime, timezone

    from tests.test_archive import gpu_batches
    batches = gpu_batches(60, datetime(2026, 3, 1, 23, 59, 30, tzinfo=timezone.utc))  # crosses an hour
    w = ArchiveWriter(tmp_path / "archive")
    for offset, b in enumerate(batches):
        w.add("gpu_samples", b, partition=0, offset=offset)
    blocker = tmp_path / "archive" / "gpu_samples" / "date=2026-03-02"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")
    with pytest.raises(OSError):
        w.write(w.take())
    blocker.unlink()  # (killed; restarted with room)
    again = ArchiveWriter(tmp_path / "archive")
    for offset, b in enumerate(batches):
        if offset > again.archived_until("gpu_samples", 0):
            again.add("gpu_samples", b, partition=0, offset=offset)
    again.flush()
    gpu = archived(tmp_path, "gpu_samples")
    assert gpu.height == sum(b.num_rows for b in batches)
    assert gpu.select(pl.struct("gpu_uuid", "ts").is_unique().all()).item()


@pytest.mark.parametrize("then", ["killed", "retried"])
def test_a_kafka_buffer_killed_between_its_hours_renames_is_placed_whole_by_the_restart(tmp_path, monkeypatch, caplog,
                                                                                        then):
    """Over Kafka: a flush across an hour, its first hour renamed into place, the second's rename
    failing (not a full disk: that fails in staging), and the process killed before its retry. The
    placed file's name covers the whole offset range, so the restart reads none of it again: it
    places the staged hour itself. A staged file that is not whole is not placed. The second hour
    had been lost."""
    import logging
    import os
    from datetime import datetime, timezone

    from pipeline.sinks import parquet
    from tests.test_archive import gpu_batches
    batches = gpu_batches(60, datetime(2026, 3, 1, 23, 59, 30, tzinfo=timezone.utc))  # crosses an hour
    w = ArchiveWriter(tmp_path / "archive")
    for offset, b in enumerate(batches):
        w.add("gpu_samples", b, partition=0, offset=offset)
    placed, replace = [], os.replace

    def second_placement_fails(src, dst):
        if "gpu_samples" in Path(dst).parts:  # (a staged file renamed into its dataset)
            placed.append(dst)
            if len(placed) == 2:
                raise OSError(5, "Input/output error", str(dst))
        replace(src, dst)
    monkeypatch.setattr(parquet.os, "replace", second_placement_fails)
    taken = w.take()
    with pytest.raises(OSError):
        w.write(taken)
    monkeypatch.undo()
    assert len(gpu_files(tmp_path)) == 1 and len(staged(tmp_path / "archive")) == 1
    if then == "retried":  # (the outage path: put back with what came meanwhile, written again)
        more = gpu_batches(20, datetime(2026, 3, 2, 0, 0, 30, tzinfo=timezone.utc))
        for offset, b in enumerate(more, len(batches)):
            w.add("gpu_samples", b, partition=0, offset=offset)
        w.put_back(taken)
        w.flush()  # (the hour under a name of the longer range: the staged one had been placed too at a restart)
        batches += more
        assert not staged(tmp_path / "archive") and len(gpu_files(tmp_path)) == 2
    (w.staging / ("gpu_samples-1-" + Path(placed[0]).name)).write_bytes(b"half a file")
    w.close()  # (killed: its lock goes with it)
    with caplog.at_level(logging.WARNING, "pipeline.sinks.parquet"):
        again = ArchiveWriter(tmp_path / "archive")  # (killed; restarted)
    assert not staged(tmp_path / "archive")
    assert ("archive: placed" in caplog.text) == (then == "killed")
    assert "cannot be placed" in caplog.text  # (the half file: removed)
    assert again.archived_until("gpu_samples", 0) == len(batches) - 1  # the partition's reread skips it all
    gpu = archived(tmp_path, "gpu_samples")
    assert gpu.height == sum(b.num_rows for b in batches)
    assert gpu.select(pl.struct("gpu_uuid", "ts").is_unique().all()).item()


def test_a_staged_hour_is_placed_by_the_restart_after_compaction_merged_that_hour(tmp_path, monkeypatch):
    """As above, killed before its retry; meanwhile the partition's next owner wrote later offsets into
    that hour and compaction merged it with an earlier file. The merged name's range (the union of its
    inputs') spans the staged hour's offsets, and the restart had taken it for placed and deleted it
    (16 rows of 84 lost). A merged file keeps its inputs' exact ranges, which the restart reads."""
    import os
    from datetime import datetime, timedelta, timezone

    from pipeline.sinks import parquet
    from pipeline.sinks.compaction import compact
    from tests.test_archive import gpu_batches
    hour = datetime(2026, 3, 2, 0, 0, tzinfo=timezone.utc)
    archive = tmp_path / "archive"
    a, b = ArchiveWriter(archive, writer_id="a"), ArchiveWriter(archive, writer_id="b")
    early = gpu_batches(5, hour + timedelta(seconds=5))
    for offset, batch in enumerate(early):
        a.add("gpu_samples", batch, partition=0, offset=offset)
    a.flush()
    across = gpu_batches(60, hour - timedelta(seconds=30))  # offsets 10-69 across the hour
    for offset, batch in enumerate(across, 10):
        a.add("gpu_samples", batch, partition=0, offset=offset)
    placed, replace = [], os.replace

    def second_placement_fails(src, dst):
        if "gpu_samples" in Path(dst).parts:
            placed.append(dst)
            if len(placed) == 2:
                raise OSError(5, "Input/output error", str(dst))
        replace(src, dst)
    monkeypatch.setattr(parquet.os, "replace", second_placement_fails)
    with pytest.raises(OSError):
        a.write(a.take())
    monkeypatch.undo()
    a.close()  # (killed before its retry: its staging stays)
    later = gpu_batches(10, hour + timedelta(minutes=5))
    for offset, batch in enumerate(later, 100):  # the next owner reads on after the placed file's range
        b.add("gpu_samples", batch, partition=0, offset=offset)
    b.flush()
    assert compact(archive, after_s=0, now=hour + timedelta(days=1)).hours == 1  # (the hour of three files)
    ArchiveWriter(archive)  # (restarted: a new process finishes what the killed one left)
    assert not staged(archive)
    assert archived(tmp_path, "gpu_samples").height == sum(x.num_rows for x in early + across + later)


def test_shedding_keeps_the_newest_within_the_bound_and_counts_the_rest(tmp_path):
    from datetime import datetime, timezone

    from tests.test_archive import gpu_batches
    w = ArchiveWriter(tmp_path / "archive")
    batches = gpu_batches(50, datetime(2026, 3, 1, 12, tzinfo=timezone.utc))
    for b in batches:
        w.add("gpu_samples", b)
    bound = 10 * batches[0].nbytes
    dropped = w.shed(bound)
    assert w.held_bytes() <= bound
    assert dropped == {"gpu_samples": 40 * batches[0].num_rows} and w.rows_dropped["gpu_samples"] == 40 * 16
    w.flush()
    kept = archived(tmp_path, "gpu_samples")  # the newest ten scrapes
    assert kept.height == 10 * 16 and kept["ts"].min() == pl.from_arrow(batches[40].column("ts")).min()


def test_the_outage_alert_comes_from_the_catalog_and_resolves_on_the_first_write():
    from pipeline.detect.catalog import ALERTS_BY_NAME
    from pipeline.model import iso_utc
    from pipeline.sinks.archive_outage import ALERTNAME, ArchiveOutage
    outage = ArchiveOutage("site-a", "https://wiki/runbooks/", retry_max_s=60.0)
    outage.instance = "archiver-1"
    fired = outage.failed(OSError(28, "No space left on device"), held_rows=120)
    assert outage.failed(OSError(28, "No space left on device"), held_rows=240) is None  # once per outage
    assert fired.labels == {"alertname": ALERTNAME, "severity": "critical", "site": "site-a", "instance": "archiver-1"}
    since = iso_utc(fired.starts_at, "seconds")
    assert fired.annotations == {
        "summary": f"archive on archiver-1 cannot write since {since}: [Errno 28] No space left on device",
        "description": ALERTS_BY_NAME[ALERTNAME].action + " Evidence (archive): error=[Errno 28] No space left on "
                                                         f"device, held_rows=120, since={iso_utc(fired.starts_at)}.",
        "runbook_url": "https://wiki/runbooks/FleetwatchArchiveFailing.md", "remediation": "none"}
    assert fired.evidence == {"error": "[Errno 28] No space left on device", "held_rows": 120,
                              "since": iso_utc(fired.starts_at)}
    assert (fired.status, fired.detector, fired.score) == ("firing", "archive", 120.0)
    resolved = outage.recovered(held_rows=0)
    assert resolved.status == "resolved" and resolved.fingerprint == fired.fingerprint
    assert outage.recovered(held_rows=0) is None
