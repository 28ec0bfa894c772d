"""Compaction: each closed hour of a dataset merged into one file per source partition.

The archive writes a file per dataset at every flush (sinks/parquet.py: about 360 an hour
at the default 10 s, more over Kafka, one per partition), and a reader pays per file.
Once an hour partition has ended `after_s` ago (late data has come in), its files are
merged: per source partition one file, rows in the current schema (an older file's rows
upgraded as the bus upgrades them), sorted by entity and time (`SORT_KEYS`: a node's rows
are together, so its row groups' statistics let a reader skip the rest), in row groups of
`ROW_GROUP_ROWS`. Over Kafka the merged file keeps the name of its offsets
(`part-p<P>-o<first>-<last>.parquet`, the union of its inputs' ranges), so
`ArchiveWriter.archived_until` still finds every offset on disk and a redelivered message
is never written twice; in-process it is `part-<first ts ns>-compacted-<seq>.parquet`.
Merged files are written as the writer writes them (times in microseconds, archive format
2), so compaction also rewrites an hour of format-1 files (nanoseconds, before 2026-12)
for readers that refuse those (Spark, Trino). An hour whose files are one per partition in
the current format already is left alone; one that gets a late file is merged again.

Atomic for readers, no row lost or twice, whatever is killed when:
  1. the new hour is built beside the archive, in `archive/.compaction/<work>/hour/`,
     with a journal of the input files and the outputs (written and fsynced first);
  2. one `renameat2(RENAME_EXCHANGE)` swaps it with the live hour folder: a reader lists
     either every input or every output, never both, never neither (Linux; elsewhere two
     renames, with a moment where the hour is missing, logged once);
  3. a file the writer put into the hour while it was built (a late one) is moved from
     the old folder into the new; then the work folder goes.
A run starts by finishing what a killed one left: before the swap, its work folder is
deleted (the inputs are still live); after it, step 3 is done again. A reader that
listed the hour just before the swap and opens a file after it gets "file not found"
and reads again (DuckDB and polars list and open within one query: milliseconds).
Archive processes sharing a folder (Kafka) take turns, and retention with them
(sinks/retention.py): one lock per archive (`locked`).

Memory: at most ROWS_PER_PASS rows at a time (about 250 bytes a row in memory), besides the
hour's first sort key, read whole to plan the passes: a larger partition-hour (1,000 nodes
at 1 s write 28.8 million GPU rows an hour) is merged in passes over ranges of nodes, each
reading the hour's files again (`_merge`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.model import ARCHIVE_FORMAT, ARCHIVE_SCHEMAS, SCHEMAS, archive_format, schema_version
from pipeline.sinks.files import fsync_dir, write_atomically
from pipeline.sinks.parquet import HOUR_FILES, TIME_COLUMN, as_current, on_disk

log = logging.getLogger("fleetwatch")

ROW_GROUP_ROWS = 1 << 20
ROWS_PER_PASS = 4_000_000  # rows sorted in memory at a time (about 1 GB of GPU samples)
SORT_KEYS = {
    "gpu_samples": ("node", "gpu", "ts"),
    "facility_samples": ("device", "metric", "ts"),
    "events": ("node", "gpu", "ts"),
    "alerts": ("ts",),
    "node_health": ("node", "ts"),
    "fault_labels": ("start",),
    "power_actions": ("node", "gpu", "ts"),
    "power_requests": ("ts",),
    "remediation_events": ("node", "ts"),
}
WORK = ".compaction"
OFFSETS = b"fleetwatch.kafka_offsets"  # a merged file's exact offset ranges, JSON [[first, last], ...]
_KAFKA = re.compile(r"part-p(\d{4})-o(\d+)-(\d+)\.parquet$")
_COMPACTED = re.compile(r"part-\d+-compacted-(\d+)\.parquet$")
_HOUR = re.compile(r"date=(\d{4}-\d{2}-\d{2})/hour=(\d{2})$")


@dataclass
class CompactionStats:
    hours: int = 0            # hour partitions merged
    files_in: int = 0
    files_out: int = 0
    rows: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    recovered: int = 0        # work a killed run left, finished or undone
    failed: list[str] = field(default_factory=list)  # hours left as they are: "<hour>: <why>"
    short_of_space: int = 0   # hours not merged: their copy would leave under min_free_mb free

    def line(self) -> str:
        return (f"{self.hours} hours compacted: {self.files_in} files -> {self.files_out}, {self.rows:,} rows, "
                f"{self.bytes_in / 2**20:.1f} MB -> {self.bytes_out / 2**20:.1f} MB"
                + (f"; {self.recovered} interrupted compactions finished" if self.recovered else "")
                + (f"; {self.short_of_space} hours left for want of free space" if self.short_of_space else "")
                + (f"; {len(self.failed)} hours failed and were left as they are (first: {self.failed[0]})"
                   if self.failed else ""))


def compact(archive: Path, after_s: float = 900.0, now: datetime | None = None,
            stop: threading.Event | None = None, datasets: tuple[str, ...] | None = None,
            min_free_mb: float = 0.0) -> CompactionStats:
    """Merge every hour of `archive` that ended at least `after_s` before `now` (default: the
    later of the clock and the newest hour with data, so an archive ahead of the clock, a
    simulation's, is compacted too). `stop` set: return after the hour in progress. An hour is
    merged only where its copy would leave `min_free_mb` free (the writer's floor: alerts and
    outboxes need it), and an hour that fails (a file that cannot be read) is left as it is, said in
    the log and the stats, and the others are merged."""
    archive = Path(archive)
    stats = CompactionStats()
    if not archive.is_dir():
        return stats
    with locked(archive):
        stats.recovered = recover(archive)
        for dataset in datasets or tuple(SCHEMAS):
            closed = hours(archive / dataset)
            if not closed:
                continue
            ref = max(now or datetime.now(timezone.utc), max(start for start, _ in closed))
            for start, folder in closed:
                if stop is not None and stop.is_set():
                    return stats
                if start + timedelta(hours=1, seconds=after_s) > ref:
                    continue
                try:
                    _compact_hour(archive, dataset, folder, stats, int(min_free_mb * 2**20))
                except (OSError, pa.ArrowException, ValueError, KeyError) as e:  # (the data's, not the code's)
                    why = f"{folder.relative_to(archive).as_posix()}: {e}"
                    log.warning("archive compaction: %s; that hour is left as it is (readers read it as it is), "
                                "and the others are merged", why)
                    stats.failed.append(why)
    return stats


@contextlib.contextmanager
def locked(archive: Path):
    """The archive's upkeep lock: compactions and prunes of one folder (from any process
    sharing it) take turns."""
    (archive / WORK).mkdir(exist_ok=True)
    with open(archive / WORK / "lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def recover(archive: Path) -> int:
    """Finish or undo what a killed run left in `archive/.compaction` (module doc)."""
    done = 0
    for work in sorted(p for p in (archive / WORK).glob("*") if p.is_dir()):
        journal = work / "journal.json"
        try:
            j = json.loads(journal.read_text())
        except (OSError, ValueError):  # killed before the journal was whole: nothing was swapped
            shutil.rmtree(work, ignore_errors=True)
            done += 1
            continue
        live, old = archive / j["hour"], work / "hour"
        if j["outputs"] and all((live / name).exists() for name in j["outputs"]):  # swapped: step 3 again
            _move_late(old, live, set(j["inputs"]) | set(j["outputs"]))
        shutil.rmtree(work, ignore_errors=True)
        done += 1
    return done


def hours(dataset_dir: Path) -> list[tuple[datetime, Path]]:
    """A dataset's hour partitions, oldest first: (its start, its folder)."""
    out = []
    for folder in dataset_dir.glob("date=*/hour=*"):
        m = _HOUR.search(folder.as_posix())
        if m and folder.is_dir():
            out.append((datetime.fromisoformat(f"{m[1]}T{m[2]}:00:00+00:00"), folder))
    return sorted(out)


def _groups(files: list[Path]) -> dict[str, list[Path]]:
    """The hour's files by source partition ("p0003"; "local" for the in-process writer's)."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        m = _KAFKA.match(f.name)
        groups.setdefault(f"p{m[1]}" if m else "local", []).append(f)
    return groups


def _current(dataset: str, f: Path) -> bool:
    """A file as the writer writes it today: the archive's format and the dataset's schema version (an older
    version's derived columns, null in the file, are filled only by a rewrite through the upgrade)."""
    schema = pq.read_schema(f)
    return archive_format(schema) == ARCHIVE_FORMAT and schema_version(schema) == schema_version(SCHEMAS[dataset])


def _compact_hour(archive: Path, dataset: str, folder: Path, stats: CompactionStats, min_free: int = 0) -> None:
    files = sorted(folder.glob(HOUR_FILES))
    groups = _groups(files)
    if all(len(g) == 1 for g in groups.values()) and all(_current(dataset, f) for f in files):
        return  # one file per partition already, as the writer writes them today
    bytes_in = sum(f.stat().st_size for f in files)
    if min_free and shutil.disk_usage(archive).free - bytes_in < min_free:
        stats.short_of_space += 1  # (the merged copy is about the inputs' size; retention may free room)
        return
    rel = folder.relative_to(archive).as_posix()
    work = archive / WORK / f"{dataset}-{folder.parent.name[5:]}-{folder.name[5:]}-{uuid.uuid4().hex[:8]}"
    try:
        new, journal, rows = _build(dataset, files, groups, rel, work)
    except BaseException:  # before the swap the inputs are live: the partial copy goes now, not at the next run
        shutil.rmtree(work, ignore_errors=True)
        raise
    bytes_out = sum((new / n).stat().st_size for n in journal["outputs"])
    _exchange(new, folder)
    _move_late(new, folder, set(journal["inputs"]) | set(journal["outputs"]))
    shutil.rmtree(work, ignore_errors=True)
    stats.hours += 1
    stats.files_in += len(files)
    stats.files_out += len(journal["outputs"])
    stats.rows += rows
    stats.bytes_in += bytes_in
    stats.bytes_out += bytes_out


def _build(dataset: str, files: list[Path], groups: dict[str, list[Path]], rel: str,
           work: Path) -> tuple[Path, dict, int]:
    """The merged hour in `work/hour` and its journal, written (step 1 of the module doc): (the hour's
    folder, the journal, the rows)."""
    new = work / "hour"
    new.mkdir(parents=True)
    journal = {"hour": rel, "inputs": [f.name for f in files], "outputs": []}
    write_atomically(work / "journal.json", json.dumps(journal))
    rows = 0
    seq = max([int(m[1]) for f in files if (m := _COMPACTED.match(f.name))], default=0)
    for key, group in sorted(groups.items()):
        out = new / f"merging-{key}.parquet"
        footers = [pq.read_metadata(f) for f in group]
        expected = sum(m.num_rows for m in footers)
        held = None if key == "local" else merged_ranges(offset_ranges(f, m) for f, m in zip(group, footers))
        written, first = _merge(dataset, group, expected, out, held)
        if written != expected or pq.ParquetFile(out).metadata.num_rows != expected:
            raise OSError(f"compaction of {rel}: {expected} rows in, {written} merged; nothing swapped")
        rows += written
        if key == "local":
            seq += 1
            name = f"part-{first}-compacted-{seq:06d}.parquet"
        else:  # named by the union of its inputs' offsets (ArchiveWriter.archived_until reads names)
            name = f"part-{key}-o{held[0][0]:016d}-{held[-1][1]:016d}.parquet"
        with open(out, "rb") as f:
            os.fsync(f.fileno())
        out.rename(new / name)
        journal["outputs"].append(name)
    fsync_dir(new)
    write_atomically(work / "journal.json", json.dumps(journal))  # the outputs known: from here a swap can be recognised
    return new, journal, rows


def offset_ranges(f: Path, footer: pq.FileMetaData | None = None) -> list[tuple[int, int]]:
    """The Kafka offsets a file of the archive holds: its name's range, or where it was merged, the
    exact ranges of its inputs (OFFSETS in its metadata): the name's union may span offsets no input
    held, which a staged file a killed write left may hold (ArchiveWriter._overlaps). `footer`: the
    file's, where the caller read it already."""
    m = _KAFKA.match(f.name)
    exact = ((footer or pq.read_metadata(f)).metadata or {}).get(OFFSETS)
    return [tuple(r) for r in json.loads(exact)] if exact else [(int(m[2]), int(m[3]))] if m else []


def merged_ranges(ranges) -> list[tuple[int, int]]:
    """Offset ranges as few as they go: overlapping or adjacent ones joined."""
    out: list[list[int]] = []
    for first, last in sorted(r for rs in ranges for r in rs):
        if out and first <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], last)
        else:
            out.append([first, last])
    return [(a, b) for a, b in out]


def _merge(dataset: str, files: list[Path], rows_in: int, out: Path,
           held: list[tuple[int, int]] | None = None) -> tuple[int, int]:
    """The files' `rows_in` rows into `out`, in the current schema and the archive's format, sorted by
    entity and time: (rows, the first time in ns). An hour larger than ROWS_PER_PASS is merged
    in passes, each over a contiguous range of the first sort key (a node's rows, say), so
    memory stays bounded whatever the fleet's size; the file is sorted all the same. `held`: the Kafka
    offset ranges of the inputs, kept in the file's metadata (offset_ranges)."""
    lead, rows, first = SORT_KEYS[dataset][0], 0, None
    schema = ARCHIVE_SCHEMAS[dataset]
    if held:
        schema = schema.with_metadata({**schema.metadata, OFFSETS: json.dumps(held).encode()})
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        for bounds in _passes(dataset, files, rows_in):
            filters = None if bounds is None else (pc.field(lead) >= bounds[0]) & (pc.field(lead) <= bounds[1])
            parts = [as_current(dataset, b) for f in files for b in pq.read_table(f, filters=filters).to_batches()]
            table = pa.Table.from_batches(parts, schema=SCHEMAS[dataset])
            if table.num_rows == 0:
                continue
            table = table.sort_by([(k, "ascending") for k in SORT_KEYS[dataset]])
            t0 = int(pc.min(table.column(TIME_COLUMN[dataset]).cast(pa.int64())).as_py())
            first = t0 if first is None else min(first, t0)
            writer.write_table(on_disk(dataset, table).replace_schema_metadata(schema.metadata),
                               row_group_size=ROW_GROUP_ROWS)
            rows += table.num_rows
    return rows, first or 0


def _passes(dataset: str, files: list[Path], rows_in: int) -> list[tuple | None]:
    """(low, high) of the first sort key for each pass of `_merge` over the files' `rows_in`
    rows (None: one pass, everything)."""
    lead = SORT_KEYS[dataset][0]
    if rows_in <= ROWS_PER_PASS or not pa.types.is_string(SCHEMAS[dataset].field(lead).type):
        return [None]
    counts = pc.value_counts(pa.chunked_array([pq.read_table(f, columns=[lead]).column(lead) for f in files]))
    # (The first sort key is never null: the archive's schema says so, and Parquet enforces it.)
    values, n = counts.field("values"), counts.field("counts").to_numpy()
    order = pc.sort_indices(values).to_numpy()
    passes, start, held = [], 0, 0
    for i, j in enumerate(order):
        if held and held + n[j] > ROWS_PER_PASS:
            passes.append((values[int(order[start])].as_py(), values[int(order[i - 1])].as_py()))
            start, held = i, 0
        held += n[j]
    passes.append((values[int(order[start])].as_py(), values[int(order[-1])].as_py()))
    return passes


def _move_late(old: Path, live: Path, known: set[str]) -> None:
    """Files the writer renamed into the hour while it was rebuilt: into the new one."""
    if not old.is_dir():
        return
    for f in old.glob("*.parquet"):
        if f.name not in known:
            os.replace(f, live / f.name)
            log.info("compaction: %s came in while %s was merged; kept beside it", f.name, live)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_warned = threading.Event()


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders in one step (Linux renameat2); elsewhere two renames."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # (a filesystem or kernel without it: the fallback)
            raise OSError(err, os.strerror(err), str(b))
    if not _warned.is_set():
        _warned.set()
        log.warning("compaction: this system cannot swap two folders in one step (renameat2): a reader may find "
                    "an hour missing for a moment while it is swapped")
    aside = a.with_name(a.name + ".old")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)

