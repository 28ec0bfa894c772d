"""Retention: hour partitions older than their dataset's retention are deleted.

`archive.retention_days_samples` covers the readings (`gpu_samples`, `facility_samples`:
nearly all of the archive's bytes), `archive.retention_days_records` what operators look
back on for a year (`events`, `alerts`, `node_health`, `power_*`, `fault_labels`); 0 keeps
a dataset forever. An hour goes once it ended that many days before the clock: never by
the data's own time, so a sample stamped a year ahead cannot make the archive delete
everything else. An hour leaves in one rename (out of sight of readers at once), then is
deleted; a day folder left empty goes too. The archive role prunes on its compaction
schedule (sinks/archive_sink.py); `fleetwatch archive prune [--dry-run]` does it by hand.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pipeline.config import ArchiveConfig
from pipeline.sinks.compaction import WORK, hours, locked

SAMPLES = ("gpu_samples", "facility_samples")


def retention_days(settings: ArchiveConfig, dataset: str) -> float:
    return settings.retention_days_samples if dataset in SAMPLES else settings.retention_days_records


@dataclass
class PruneStats:
    hours: int = 0
    files: int = 0
    bytes: int = 0
    by_dataset: dict[str, int] = field(default_factory=dict)  # hours per dataset

    def line(self, dry_run: bool = False) -> str:
        verb = "would delete" if dry_run else "deleted"
        return (f"{verb} {self.hours} hours ({self.files} files, {self.bytes / 2**20:.1f} MB)"
                + (": " + ", ".join(f"{d} {n}" for d, n in self.by_dataset.items()) if self.by_dataset else ""))


def prune(archive: Path, settings: ArchiveConfig, now: datetime | None = None, dry_run: bool = False) -> PruneStats:
    """Delete (or with `dry_run` only count) every hour older than its dataset's retention."""
    from pipeline.model import SCHEMAS
    archive = Path(archive)
    now = now or datetime.now(timezone.utc)
    out = PruneStats()
    if not archive.is_dir():
        return out
    # Never under a compaction of the same hour (one lock for both); a dry run only reads.
    with contextlib.nullcontext() if dry_run else locked(archive):
        for dataset in SCHEMAS:
            days = retention_days(settings, dataset)
            if days <= 0:
                continue
            cutoff = now - timedelta(days=days)
            for start, folder in hours(archive / dataset):
                if start + timedelta(hours=1) > cutoff:
                    break
                files = [f for f in folder.iterdir() if f.is_file()]  # (what goes: the hour, strays and all)
                out.hours += 1
                out.files += len(files)
                out.bytes += sum(f.stat().st_size for f in files)
                out.by_dataset[dataset] = out.by_dataset.get(dataset, 0) + 1
                if not dry_run:
                    gone = archive / WORK / f"pruned-{uuid.uuid4().hex[:12]}"
                    os.rename(folder, gone)  # out of sight in one step
                    shutil.rmtree(gone, ignore_errors=True)
                    day = folder.parent
                    if not any(day.iterdir()):
                        day.rmdir()
    return out
