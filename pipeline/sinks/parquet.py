"""The Parquet archive: one hive-partitioned dataset per record type.

    <data_dir>/archive/<dataset>/date=YYYY-MM-DD/hour=HH/part-<first ts>-<writer>-<seq>.parquet

Batches are buffered per dataset (and per source partition, from Kafka) and written
as one file per buffer and hour partition per flush. A file holds one schema version,
the current one (an older batch is upgraded as it is buffered), with its times in
microseconds (`on_disk`: model.ARCHIVE_SCHEMAS, archive format 2); both are in the
file's Arrow schema metadata. Files written before a column was added lack it, and
readers read a dataset by column name with missing columns as null (docs/data.md).
Each file is written into `<data_dir>/archive/.staging/<writer id>/` (same filesystem,
outside every dataset; a folder of its own, locked while the writer lives, so that writers
sharing an archive never touch each other's files) and renamed into place, so a reader
never sees a partial file and no temporary file ever sits inside a dataset. File names never collide
with earlier data, so appending never overwrites it.

A write that fails (disk full, permission error, archive/ deleted) leaves no partial
file behind and hands back what it could not write (`put_back`), so the caller can
hold it and try again; folders are created again on every write. A buffer's files (one
per hour) are all written in staging before any is renamed into place, so a write that
fails leaves none of its hours on disk. Only a rename failing after another can leave some:
over Kafka the hours not placed then stay in staging (a staged name holds only whole files:
each is written as `.partial` first), and a restart places them (`_recover_staged`), since
the placed file's name says its whole offset range is archived.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.model import ARCHIVE_SCHEMAS, SCHEMAS, cast_by_name, upgraded
from pipeline.sinks.files import fsync_dir

log = logging.getLogger(__name__)
_KAFKA_NAME = re.compile(r"part-p(\d{4})-o(\d{16})-(\d{16})\.parquet")  # a Kafka buffer's file: partition, offsets

HOUR_NS = 3_600_000_000_000
# An hour's data files: the writers' and compaction's names. A hidden or underscore name (a copy tool's
# `.part-x.parquet`, Spark's `_SUCCESS`) is not data, as Hive and Spark read a folder: every reader,
# compaction and `archive stats` skip it (read, a hidden copy of a file had counted its rows twice, and a
# stray non-Parquet file had failed polars' scan of the whole dataset).
HOUR_FILES = "[!._]*.parquet"
DATA_FILES = f"date=*/hour=*/{HOUR_FILES}"  # a dataset's, from its folder (a glob for pathlib, polars, DuckDB)
DAY_FILES = f"hour=*/{HOUR_FILES}"           # a day's, from its folder


def files_glob(folder: Path, pattern: str = DATA_FILES) -> str:
    """`pattern` under `folder` as one glob for polars and DuckDB: the folder's own name escaped (a data_dir
    holding `[` had been a character class to them, and found nothing)."""
    return f"{glob.escape(str(folder))}/{pattern}"


# The column that places a row in a partition.
TIME_COLUMN = {name: ("start" if name == "fault_labels" else "ts") for name in SCHEMAS}


def as_current(dataset: str, batch: pa.RecordBatch) -> pa.RecordBatch:
    """`batch` at its dataset's current schema: a batch of an older version (model.UPGRADES)
    upgraded, then its columns by name, cast to the current types."""
    schema = SCHEMAS[dataset]
    if batch.schema == schema:
        return batch
    if b"fleetwatch.version" in (batch.schema.metadata or {}):
        batch = upgraded(batch)
    # A column the batch lacks (an archived file older than UPGRADES reaches, gpu_sample v1): null, as every
    # reader reads it (compaction had raised on such an hour, and merged no later one, ever); one that may not
    # be null is an error, said with the hour it is in.
    lacking = [f for f in schema if f.name not in batch.schema.names]
    if any(not f.nullable for f in lacking):
        raise ValueError(f"a {dataset} batch without {', '.join(f.name for f in lacking if not f.nullable)}")
    for f in lacking:
        batch = batch.append_column(f.name, pa.nulls(batch.num_rows, f.type))
    return cast_by_name(schema, batch)


def on_disk(dataset: str, table: pa.Table) -> pa.Table:
    """A table of the current schema as the archive stores it: times truncated to the microsecond."""
    return table.cast(ARCHIVE_SCHEMAS[dataset], safe=False)


@dataclass
class _Buffer:
    batches: list[pa.RecordBatch] = field(default_factory=list)
    rows: int = 0
    first_offset: int = -1
    last_offset: int = -1
    nbytes: int = 0  # estimated: rows x the dataset's bytes per row (ArchiveWriter.row_bytes)
    offsets: list[int] = field(default_factory=list)  # each batch's source offset (from Kafka; else empty)


class ArchiveBuffers:
    """What every archive writer does before its storage: buffer per dataset and source
    partition (batches upgraded to the current schema), bound what is held, know which
    offsets are stored. A writer adds `write` (the taken buffers to storage, leaving in
    `taken` exactly what is not stored) and `stored_until` (the highest offset of a
    source partition in storage); `upkeep` is what the archive role runs now and then."""

    def __init__(self, max_buffer_rows: int = 500_000, writer_id: str | None = None) -> None:
        self.max_buffer_rows = max_buffer_rows
        self.writer_id = writer_id or uuid.uuid4().hex[:12]
        self._buffers: dict[tuple[str, int], _Buffer] = {}
        self._archived: dict[tuple[str, int], int] = {}
        self._row_bytes: dict[str, float] = {}  # dataset -> bytes per row (row_bytes)
        self.rows_written: dict[str, int] = {name: 0 for name in SCHEMAS}
        self.files_written = 0
        self.files_by_dataset: dict[str, int] = {name: 0 for name in SCHEMAS}
        self.last_durable: float | None = None  # time.monotonic() the archive's data was last all durable
        self.redelivered_skipped = 0  # messages not written again: their offsets were archived
        self.rows_dropped: dict[str, int] = {name: 0 for name in SCHEMAS}  # shed while the archive could not write
        self.outage = None  # the archive role's ArchiveOutage (sinks/archive_outage.py), for status and summary

    def write(self, taken: dict[tuple[str, int], _Buffer]) -> list:
        raise NotImplementedError

    def stored_until(self, dataset: str, partition: int) -> int:
        raise NotImplementedError

    def upkeep(self, cfg, stop) -> list[tuple[str, Callable[[], Any]]]:
        """(what, run) of each upkeep pass; run() returns stats with `hours` and `line()`."""
        return []

    def close(self) -> None:
        """The role stops (what is held is the caller's: flushed or handed back before)."""

    def add(self, dataset: str, batch: pa.RecordBatch, partition: int = -1, offset: int = -1) -> bool:
        """Buffer a batch; True when the dataset's buffers are full and should be flushed.
        A batch of the previous schema version (model.UPGRADES) is upgraded first, so a
        buffer, and every file, holds the current version only."""
        batch = as_current(dataset, batch)
        buf = self._buffers.setdefault((dataset, partition), _Buffer())
        buf.batches.append(batch)
        buf.rows += batch.num_rows
        buf.nbytes += batch.num_rows * self.row_bytes(dataset, batch)
        if offset >= 0:
            buf.offsets.append(offset)
            buf.first_offset = offset if buf.first_offset < 0 else min(buf.first_offset, offset)
            buf.last_offset = max(buf.last_offset, offset)
        return sum(b.rows for (d, _), b in self._buffers.items() if d == dataset) >= self.max_buffer_rows

    def archived_until(self, dataset: str, partition: int) -> int:
        """The highest offset of `partition` already in the archive (-1: none, or storage that
        cannot say now: a writer whose storage can fail here checks again as it writes)."""
        key = (dataset, partition)
        if key not in self._archived:
            try:
                self._archived[key] = self.stored_until(dataset, partition)
            except OSError as e:
                log.warning("archive: which offsets of %s partition %d are stored is unknown for now (%s); what "
                            "comes is checked against storage when it is written", dataset, partition, e)
                return -1
        return self._archived[key]

    def forget_archived(self) -> None:
        """Read the file names again on the next lookup (partitions changed hands)."""
        self._archived.clear()

    def take(self) -> dict[tuple[str, int], _Buffer]:
        """Hand over everything buffered (to be written off the event loop)."""
        taken, self._buffers = self._buffers, {}
        return taken

    def put_back(self, taken: dict[tuple[str, int], _Buffer]) -> None:
        """Buffer again what a failed write() left in `taken`, ahead of anything added since."""
        for key, old in taken.items():
            new = self._buffers.get(key)
            if new is not None:
                old.batches += new.batches
                old.offsets += new.offsets
                old.rows += new.rows
                old.nbytes += new.nbytes
                if new.first_offset >= 0:
                    old.first_offset = new.first_offset if old.first_offset < 0 else min(old.first_offset,
                                                                                         new.first_offset)
                    old.last_offset = max(old.last_offset, new.last_offset)
            self._buffers[key] = old
        taken.clear()

    def row_bytes(self, dataset: str, batch: pa.RecordBatch) -> float:
        """Bytes per row of a dataset, measured on its first rows: the size of what is held
        is an estimate, because `nbytes` of a sliced batch (a Kafka message of one node) costs
        ~50 us, more than the rest of `add`."""
        if dataset not in self._row_bytes and batch.num_rows:
            self._row_bytes[dataset] = batch.nbytes / batch.num_rows
        return self._row_bytes.get(dataset, 0.0)

    def held_bytes(self) -> int:
        return int(sum(b.nbytes for b in self._buffers.values()))

    def held_rows(self) -> int:
        return sum(b.rows for b in self._buffers.values())

    def shed(self, max_bytes: int) -> dict[str, int]:
        """Drop the oldest batches of the largest buffers until at most `max_bytes` are
        held (in-process only: from Kafka, dropping would leave holes in offset ranges).
        Counts the rows in `rows_dropped`; returns this call's drops per dataset."""
        dropped: dict[str, int] = {}
        while self.held_bytes() > max_bytes:
            held = [kv for kv in self._buffers.items() if kv[1].batches]
            if not held:
                break
            (dataset, _), buf = max(held, key=lambda kv: kv[1].nbytes)
            batch = buf.batches.pop(0)
            if buf.offsets:
                buf.offsets.pop(0)
            buf.rows -= batch.num_rows
            buf.nbytes = 0 if not buf.batches else buf.nbytes - batch.num_rows * self.row_bytes(dataset, batch)
            dropped[dataset] = dropped.get(dataset, 0) + batch.num_rows
            self.rows_dropped[dataset] += batch.num_rows
        return dropped

    def partitions(self) -> set[int]:
        """The source partitions something is buffered of (none in-process)."""
        return {p for (_, p), buf in self._buffers.items() if p >= 0 and buf.batches}

    def discard(self, partitions: set[int]) -> int:
        """Forget what is buffered for these source partitions (they moved to another
        consumer, which reads them again from the last commit); returns the rows."""
        rows = 0
        for key in [k for k in self._buffers if k[1] in partitions]:
            rows += self._buffers.pop(key).rows
        return rows

    def flush(self) -> list:
        return self.write(self.take())


class ArchiveWriter(ArchiveBuffers):
    """The archive on local disk: one Parquet file per buffer and hour (module doc).

    From a partitioned bus (Kafka) a file is named after the partition and the offset
    range it holds, `part-p<partition>-o<first>-<last>.parquet`, and `archived_until`
    says which offsets are already on disk, so a consumer that restarts from its last
    commit skips what it had archived: redelivery never duplicates a row. In-process,
    files are named `part-<first ts ns>-<writer>-<seq>.parquet`.
    """

    def __init__(self, root: Path, compression: str = "zstd", max_buffer_rows: int = 500_000,
                 writer_id: str | None = None, min_free_mb: float = 0.0) -> None:
        super().__init__(max_buffer_rows, writer_id)
        self.root = Path(root)
        # Staging of its own, locked while it lives: archive processes that share a folder never
        # touch each other's files, and a restart recovers only those of a process that is gone.
        self.staging = self.root / ".staging" / self.writer_id
        self._lock = None
        self._ensure_staging()
        self.compression = None if compression == "none" else compression
        self._seq = 0
        self._said_sync = False  # a folder fsync refused: said once
        self.min_free_bytes = int(min_free_mb * 2**20)  # below this free space, writing fails as a full disk
        self._recover_staged()

    def stored_until(self, dataset: str, partition: int) -> int:
        last = -1
        for f in (self.root / dataset).glob(f"*/*/part-p{partition:04d}-o*-*.parquet"):
            last = max(last, int(f.stem.rsplit("-", 1)[1]))
        return last

    def upkeep(self, cfg, stop) -> list[tuple[str, Callable[[], Any]]]:
        from pipeline.sinks.compaction import compact
        from pipeline.sinks.retention import prune
        # Retention first: what it deletes need not be merged, and on a disk short of space it makes the room.
        return [("retention", lambda: prune(self.root, cfg)),
                ("compaction", lambda: compact(self.root, cfg.compact_after_s, None, stop,
                                               min_free_mb=self.min_free_bytes / 2**20))]

    def close(self) -> None:
        """Its staging folder goes, unless a failed write left an hour there for the next start."""
        with contextlib.suppress(OSError):
            if not any(f.name != ".lock" for f in self.staging.iterdir()):
                shutil.rmtree(self.staging, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()

    def _ensure_staging(self) -> None:
        """The staging folder and its lock (again after archive/ was deleted under a running writer)."""
        for _ in range(5):
            self.staging.mkdir(parents=True, exist_ok=True)
            if self._lock is not None and (self.staging / ".lock").exists():
                return
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            with contextlib.suppress(FileNotFoundError):  # (a sibling starting removed it as it was made: again)
                self._lock = open(self.staging / ".lock", "w")
                fcntl.flock(self._lock, fcntl.LOCK_EX)
        if self._lock is None or not (self.staging / ".lock").exists():
            raise OSError(errno.EAGAIN, "cannot keep a staging folder of its own", str(self.staging))

    def _recover_staged(self) -> None:
        """What stopped processes left in staging (their folders unlocked; files of versions that
        staged in `.staging` itself). A Kafka buffer's hour that a rename failing after another's,
        then a kill, left there is placed now: the placed files say its offsets are archived, so
        the restart reads none of it again. Anything else (half-written, a buffer none of whose
        hours was placed, which its partition delivers again, an hour already there) goes."""
        for folder in sorted(self.staging.parent.iterdir()):
            if folder == self.staging:
                continue
            if folder.is_dir():
                try:
                    with open(folder / ".lock", "a") as lock:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (held: its process lives)
                        for leftover in sorted(folder.iterdir()):
                            if leftover.name != ".lock":
                                self._recover(leftover)
                        shutil.rmtree(folder, ignore_errors=True)
                except (BlockingIOError, OSError):
                    continue
            else:
                self._recover(folder)

    def _recover(self, leftover: Path) -> None:
        dataset, hour, name = (leftover.name.split("-", 2) + ["", ""])[:3]
        m = _KAFKA_NAME.fullmatch(name)
        try:
            if (leftover.suffix == ".parquet" and m and dataset in SCHEMAS and hour.isdigit()
                    and self.stored_until(dataset, int(m[1])) >= int(m[3])
                    and not self._overlaps(dataset, int(hour), int(m[1]), int(m[2]), int(m[3]))):
                pq.read_metadata(leftover)  # whole (a file from before `.partial` may be half of one)
                final = self._hour_dir(dataset, int(hour)) / name
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(leftover, final)
                log.warning("archive: placed %s, one hour of a write a stopped process had left half done "
                            "(its other hour was in place)", final)
                return
        except (OSError, pa.ArrowException) as e:
            log.warning("archive: %s left in staging cannot be placed (%s): removed; its partition "
                        "delivers it again only if it was not committed", leftover.name, e)
        with contextlib.suppress(OSError):
            leftover.unlink()

    def _overlaps(self, dataset: str, hour: int, partition: int, first: int, last: int) -> bool:
        """The hour holds a file of the partition with offsets in first..last (a retry's, placed): by their
        names, and a merged file by the exact ranges it holds (its name's union may span this one)."""
        from pipeline.sinks.compaction import offset_ranges
        for f in self._hour_dir(dataset, hour).glob(f"part-p{partition:04d}-o*.parquet"):
            m = _KAFKA_NAME.fullmatch(f.name)
            if m and int(m[2]) <= last and first <= int(m[3]) and \
                    any(a <= last and first <= b for a, b in offset_ranges(f)):
                return True
        return False

    def _placed(self, dataset: str, name: str) -> bool:
        """A file of this name (a Kafka buffer's, one per hour) is in one of the dataset's hours."""
        return next((self.root / dataset).glob(f"date=*/hour=*/{name}"), None) is not None

    def _hour_dir(self, dataset: str, hour: int) -> Path:
        start = datetime.fromtimestamp(hour * 3600, timezone.utc)
        return self.root / dataset / f"date={start:%Y-%m-%d}" / f"hour={start:%H}"

    def _check_free(self) -> None:
        if self.min_free_bytes:
            st = os.statvfs(self.root)
            free = st.f_bavail * st.f_frsize
            if free < self.min_free_bytes:
                raise OSError(errno.ENOSPC, f"{free / 2**20:.1f} MB free, under archive.min_free_mb "
                                            f"({self.min_free_bytes / 2**20:g} MB) kept for alerts and outboxes",
                              str(self.root))

    def write(self, taken: dict[tuple[str, int], _Buffer]) -> list[Path]:
        """Write taken buffers: one file per buffer and hour, atomically renamed into place.
        A buffer's hours are all staged before any is renamed, so a full disk or a folder that
        cannot be made leaves none of them on disk (only a rename failing after another, rare,
        leaves some). What is written leaves `taken`; on an error, `taken` keeps exactly what
        is not on disk (for put_back), and no partial file is left anywhere."""
        paths = []
        if taken:
            self._ensure_staging()  # again: archive/ may have been deleted
            self._check_free()
        for key in list(taken):
            (dataset, partition), buf = key, taken[key]
            # One contiguous chunk per column: per-node messages are many small batches.
            table = pa.Table.from_batches(buf.batches, schema=SCHEMAS[dataset]).combine_chunks()
            if table.num_rows == 0:
                del taken[key]
                continue
            ts = table.column(TIME_COLUMN[dataset]).cast(pa.int64()).to_numpy()
            hours = ts // HOUR_NS
            # Every hour staged first: with one hour placed and the next failed, a process killed before its
            # retry had been read again from after the whole buffer (archived_until), the rest lost.
            staged: list[tuple[Path, Path, np.ndarray]] = []
            done = np.zeros(len(hours), dtype=bool)
            try:
                for hour in np.unique(hours):
                    in_hour = hours == hour
                    tmp, final = self._stage(dataset, int(hour), table if in_hour.all()
                                             else table.filter(pa.array(in_hour)), partition, buf)
                    staged.append((tmp, final, in_hour))
                for tmp, final, in_hour in staged:
                    os.replace(tmp, final)
                    paths.append(final)
                    self.rows_written[dataset] += int(in_hour.sum())
                    self.files_written += 1
                    self.files_by_dataset[dataset] += 1
                    done |= in_hour
                self._sync_folders({final.parent for _, final, _ in staged})
            except BaseException:
                for tmp, final, _ in staged:
                    if partition >= 0 and tmp.exists() and self._placed(dataset, final.name):
                        continue  # its sibling hour is placed: kept for the retry, or for a restart to place
                    with contextlib.suppress(OSError):
                        tmp.unlink(missing_ok=True)
                if done.any():  # a rename failed after others (rare): a retry writes only the hours not placed
                    rest = table.filter(pa.array(~done))
                    buf.batches, buf.rows, buf.nbytes = rest.to_batches(), rest.num_rows, rest.nbytes
                    buf.offsets = []  # (rebatched: no batch's offset; files here are named by first/last_offset)
                raise
            del taken[key]
            if partition >= 0:
                self._archived[(dataset, partition)] = max(self.archived_until(dataset, partition), buf.last_offset)
                for kept in self.staging.glob(f"{dataset}-*-part-p{partition:04d}-o*.parquet"):
                    kept.unlink(missing_ok=True)  # an hour a failed write kept: this write placed its rows
        return paths

    def _sync_folders(self, folders: set[Path]) -> None:
        """Each hour folder a file was renamed into, and the folders above it that a new hour or day added an
        entry to, made durable: a rename lives in its folder, which a power loss may lose unsynced, and over
        Kafka the offsets are committed once the write returns (the file fsynced, its name not, had been a
        loss)."""
        for folder in sorted({f for hour in folders for f in (hour, hour.parent, hour.parent.parent)}):
            try:
                fsync_dir(folder)
            except FileNotFoundError:  # (pruned since: nothing of it to keep)
                continue
            except OSError as e:  # (a filesystem that refuses a folder's fsync: the file is there; said once)
                if not self._said_sync:
                    self._said_sync = True
                    log.warning("archive: %s could not be synced (%s): a power loss may lose the latest renames",
                                folder, e)

    def _stage(self, dataset: str, hour: int, table: pa.Table, partition: int, buf: _Buffer) -> tuple[Path, Path]:
        """One hour's file written and fsynced in staging, its folder made: (staged, final path)."""
        if partition >= 0:
            name = f"part-p{partition:04d}-o{buf.first_offset:016d}-{buf.last_offset:016d}.parquet"
        else:
            first_ns = int(table.column(TIME_COLUMN[dataset]).cast(pa.int64()).to_numpy().min())
            self._seq += 1
            name = f"part-{first_ns}-{self.writer_id}-{self._seq:06d}.parquet"
        final_dir = self._hour_dir(dataset, hour)
        final_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.staging / f"{dataset}-{hour}-{name}"  # (a buffer's hours share a Kafka name)
        partial = tmp.with_name(tmp.name + ".partial")  # a staged name holds only whole files (_recover_staged)
        try:
            pq.write_table(on_disk(dataset, table), partial, compression=self.compression)
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
            os.replace(partial, tmp)
        except BaseException:
            with contextlib.suppress(OSError):  # a partial file (full disk) frees its space, never shows
                partial.unlink(missing_ok=True)
            raise
        return tmp, final_dir / name
