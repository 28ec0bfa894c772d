"""The archive on object storage: a Delta Lake table per dataset (`archive.url = "s3://bucket/prefix"`).

    s3://bucket/prefix/<dataset>/_delta_log/...                 the table's commits
    s3://bucket/prefix/<dataset>/date=YYYY-MM-DD/hour=H/*.parquet

Why Delta Lake (the `deltalake` package, delta-rs) and not Iceberg: the table's whole state
is its log in the bucket, so there is no catalog service to run, and a commit is one object
written only if absent (`If-None-Match: *`, which S3, MinIO and s3proxy honour), so several
archive processes append to one table safely. Each commit can also carry application
transactions (app id, version), which is what exactly-once over Kafka needs:

  - each flush of a dataset is one commit: rows in the archive's format (model.ARCHIVE_SCHEMAS,
    times in microseconds), partitioned by `date` and `hour` as the local archive is, and
    for each source partition it holds, the transaction (`fleetwatch-archive-p<P>`, its
    last offset); `stored_until` reads that back, so a redelivered batch is never written
    twice, after a restart or a rebalance (ArchiveBuffers.archived_until);
  - a commit that fails (the bucket unreachable, credentials refused) raises OSError and
    leaves its buffers with the writer, as a full disk does (archive_outage.py); every
    write reads the table's transactions first (the table it then appends to: no extra
    request), and leaves out each batch whose offset is already there (a commit that
    landed but whose reply was lost; a lookup that failed while reading). In-process (no
    Kafka offsets) each batch takes the writer's own sequence number instead, recorded as the
    writer's transaction (`fleetwatch-archive-w<writer id>`), so a lost reply is not written
    twice there either (a restarted writer has a new id: its buffers died with it).

Upkeep (the archive role, `fleetwatch archive compact|prune`): a closed hour's small files
are merged by Delta's optimize, ordered by entity (`SORT_KEYS`: a node's rows together) where
the dataset has one (one commit; readers of the previous version keep reading it); hours
past their retention are deleted by a partition predicate (no file is read); files no
version references any more are vacuumed once they are `VACUUM_AFTER_H` old, so a reader
of a version that recent never loses a file under it.

Credentials come from `archive.credentials_file` (an AWS shared-credentials file) or, by
default, from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
or the instance's role): never from the config, never printed, and masked in every error
this module raises.
"""

from __future__ import annotations

import configparser
import importlib.util
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ArchiveConfig, ConfigError
from pipeline.model import ARCHIVE_SCHEMAS, SCHEMAS
from pipeline.redact import MASK
from pipeline.sinks.compaction import SORT_KEYS
from pipeline.sinks.parquet import TIME_COLUMN, ArchiveBuffers, _Buffer, on_disk
from pipeline.sinks.retention import retention_days

log = logging.getLogger("fleetwatch")

PARTITIONS = ["date", "hour"]
PARQUET_CODEC = {"none": "UNCOMPRESSED", "lz4": "LZ4_RAW"}  # archive.compression in deltalake's words
VACUUM_AFTER_H = 24  # a file no version references is deleted once this old (readers of older versions)
APP = "fleetwatch-archive-p{:04d}"  # a source partition's transaction in a table
WRITER_APP = "fleetwatch-archive-w{}"  # an in-process writer's own (module doc)
# A new table's log keeps every column's statistics (Delta's default: the first 32; gpu_samples
# has 35), so `archive stats` counts rows and values from the log, without a request per file.
NEW_TABLE = {"delta.dataSkippingNumIndexedCols": "-1"}


@dataclass(frozen=True)
class DeltaLocation:
    """Where the tables are (`s3://bucket/prefix`, or a local folder in tests) and how to reach them."""
    url: str
    storage_options: dict[str, str] = field(default_factory=dict, repr=False)  # holds secrets: never shown

    def table_uri(self, dataset: str) -> str:
        return f"{self.url.rstrip('/')}/{dataset}"

    def table(self, dataset: str):
        """The dataset's DeltaTable at its latest version; None before its first commit."""
        from deltalake import DeltaTable
        uri = self.table_uri(dataset)
        try:
            if not DeltaTable.is_deltatable(uri, storage_options=self.storage_options):
                return None
            return DeltaTable(uri, storage_options=self.storage_options)
        except Exception as e:  # unreachable, refused: the caller's error, without the secrets
            raise self.error(f"reading {uri}", e) from None

    def error(self, doing: str, e: BaseException) -> OSError:
        """An OSError for `e`, with every secret masked: the storage options' and the environment's."""
        # delta-rs gives the chain of causes on lines of its own, coloured: one line, plain.
        text = re.sub(r"\s*\n\s*(?:↳\s*)?", ": ", re.sub(r"\x1b\[[0-9;]*m", "", f"{type(e).__name__}: {e}").strip())
        for key in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            for secret in (self.storage_options.get(key), os.environ.get(key)):
                if secret:
                    text = text.replace(secret, MASK)
        return OSError(f"object storage: {doing}: {text.strip()}")


def location(cfg: ArchiveConfig) -> DeltaLocation:
    """The archive's location and storage options from its config (module doc: credentials)."""
    if importlib.util.find_spec("deltalake") is None:  # the full install's: say so at start, not at the first write
        raise ConfigError(f"config error: archive.url = {cfg.url!r} needs the deltalake package: "
                          f"pip install 'fleetwatch[all]'")
    options: dict[str, str] = {}
    if cfg.s3_endpoint_url:
        options["AWS_ENDPOINT_URL"] = cfg.s3_endpoint_url
    if cfg.s3_region:
        options["AWS_REGION"] = cfg.s3_region
    if cfg.s3_allow_http:
        options["AWS_ALLOW_HTTP"] = "true"
    if cfg.credentials_file:
        options.update(_credentials(Path(cfg.credentials_file), cfg.credentials_profile))
    return DeltaLocation(cfg.url, options)


def _credentials(path: Path, profile: str) -> dict[str, str]:
    ini = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            ini.read_file(f)
    except OSError as e:
        raise ConfigError(f"config error: archive.credentials_file {str(path)!r}: {e.strerror}") from None
    except configparser.Error:
        raise ConfigError(f"config error: archive.credentials_file {str(path)!r} is not an AWS credentials file "
                          f"(INI: [{profile}] with aws_access_key_id and aws_secret_access_key)") from None
    if not ini.has_section(profile) or not {"aws_access_key_id", "aws_secret_access_key"} <= set(ini[profile]):
        raise ConfigError(f"config error: archive.credentials_file {str(path)!r}: no [{profile}] section with "
                          f"aws_access_key_id and aws_secret_access_key (archive.credentials_profile)")
    section = ini[profile]
    out = {"AWS_ACCESS_KEY_ID": section["aws_access_key_id"], "AWS_SECRET_ACCESS_KEY": section["aws_secret_access_key"]}
    if section.get("aws_session_token"):
        out["AWS_SESSION_TOKEN"] = section["aws_session_token"]
    return out


def with_partitions(dataset: str, table: pa.Table) -> pa.Table:
    """The table as stored: the archive's format, plus `date` and `hour` of its time column (UTC)."""
    table = on_disk(dataset, table)
    ts = table.column(TIME_COLUMN[dataset])
    return (table.append_column("date", pc.strftime(ts, format="%Y-%m-%d"))
            .append_column("hour", pc.hour(ts).cast(pa.int32())))


class DeltaArchiveWriter(ArchiveBuffers):
    """ArchiveBuffers whose storage is a Delta table per dataset (module doc)."""

    def __init__(self, where: DeltaLocation, compression: str = "zstd", max_buffer_rows: int = 500_000,
                 writer_id: str | None = None) -> None:
        super().__init__(max_buffer_rows, writer_id)
        self.where = where
        self.compression = PARQUET_CODEC.get(compression, compression.upper())
        self._lookup: dict[str, Any] = {}  # dataset -> its table as last read, for offset lookups
        self._sequence = -1  # in-process: the last batch's own number (module doc)

    @classmethod
    def from_config(cls, cfg: ArchiveConfig) -> "DeltaArchiveWriter":
        return cls(location(cfg), cfg.compression, cfg.max_buffer_rows)

    def add(self, dataset: str, batch: pa.RecordBatch, partition: int = -1, offset: int = -1) -> bool:
        if partition < 0:  # in-process: numbered here, as Kafka numbers a partition's messages
            self._sequence += 1
            offset = self._sequence
        return super().add(dataset, batch, partition, offset)

    def stored_until(self, dataset: str, partition: int) -> int:
        """(A table read once per dataset until `forget_archived`: partitions come in bursts.)"""
        if dataset not in self._lookup:
            self._lookup[dataset] = self.where.table(dataset)
        return self._committed(self._lookup[dataset], partition)

    def forget_archived(self) -> None:
        super().forget_archived()
        self._lookup.clear()

    def write(self, taken: dict[tuple[str, int], _Buffer]) -> list[str]:
        """One commit per dataset of what `taken` holds for it; what is committed leaves `taken`."""
        from deltalake import CommitProperties, Transaction, WriterProperties, write_deltalake
        written = []
        for dataset in sorted({d for d, _ in taken}):
            keys = [k for k in taken if k[0] == dataset]
            uri = self.where.table_uri(dataset)
            target = self.where.table(dataset)  # its transactions now, and the table to append to
            batches: list[pa.RecordBatch] = []
            txns = []
            for k in keys:
                buf, done = taken[k], self._committed(target, k[1])
                batches += [b for i, b in enumerate(buf.batches) if not buf.offsets or buf.offsets[i] > done]
                if buf.last_offset > done:
                    txns.append(Transaction(self._app(k[1]), buf.last_offset))
            rows = sum(b.num_rows for b in batches)
            if rows:
                table = with_partitions(dataset, pa.Table.from_batches(batches, schema=SCHEMAS[dataset]).combine_chunks())
                try:
                    write_deltalake(target if target is not None else uri, table, mode="append",
                                    partition_by=PARTITIONS, schema_mode="merge",
                                    storage_options=None if target is not None else self.where.storage_options,
                                    configuration=None if target is not None else NEW_TABLE,
                                    writer_properties=WriterProperties(compression=self.compression),
                                    commit_properties=CommitProperties(app_transactions=txns or None))
                except Exception as e:  # what is not committed stays in `taken` (the outage path retries it)
                    raise self.where.error(f"appending {rows} rows to {uri}", e) from None
                self.rows_written[dataset] += rows
                self.files_written += 1
                self.files_by_dataset[dataset] += 1
                written.append(uri)
            for k in keys:
                buf = taken.pop(k)
                if k[1] >= 0:
                    self._archived[k] = max(self._archived.get(k, -1), buf.last_offset)
        return written

    def _app(self, partition: int) -> str:
        """The transaction that says how far a source partition (or this writer, in-process) is stored."""
        return APP.format(partition) if partition >= 0 else WRITER_APP.format(self.writer_id)

    def _committed(self, table, partition: int) -> int:
        """The last offset of `partition` (in-process: of this writer's batches) the table holds; -1: none."""
        if table is None:
            return -1
        version = table.transaction_version(self._app(partition))
        return -1 if version is None else int(version)

    def upkeep(self, cfg: ArchiveConfig, stop) -> list[tuple[str, Callable[[], Any]]]:
        return [("compaction", lambda: compact(self.where, cfg.compact_after_s, stop=stop)),
                ("retention", lambda: prune(self.where, cfg))]


@dataclass
class DeltaUpkeep:
    """What a compaction or prune pass of the Delta tables did."""
    what: str
    hours: int = 0
    files_in: int = 0
    files_out: int = 0
    rows: int = 0
    vacuumed: int = 0

    def line(self, dry_run: bool = False) -> str:
        if self.what == "compaction":
            return (f"{self.hours} closed hours compacted: {self.files_in} files -> {self.files_out}; "
                    f"{self.vacuumed} unreferenced files vacuumed")
        if dry_run:
            return f"would delete {self.hours} hours past their retention"
        return f"deleted {self.hours} hours past their retention ({self.rows} rows); {self.vacuumed} files vacuumed"


def _hours(table) -> dict[tuple[str, int], int]:
    """Files per (date, hour) partition of the table's current version."""
    actions = pa.table(table.get_add_actions(flatten=True))
    counts: dict[tuple[str, int], int] = {}
    for d, h in zip(actions.column("partition.date").to_pylist(), actions.column("partition.hour").to_pylist()):
        counts[(d, int(h))] = counts.get((d, int(h)), 0) + 1
    return counts


def _start(date: str, hour: int) -> datetime:
    return datetime.fromisoformat(date).replace(hour=hour, tzinfo=timezone.utc)


def compact(where: DeltaLocation, after_s: float = 900.0, now: datetime | None = None, stop=None) -> DeltaUpkeep:
    """Merge the files of every hour that ended `after_s` ago and has more than one, then vacuum."""
    now = now or datetime.now(timezone.utc)
    stats = DeltaUpkeep("compaction")
    for dataset in ARCHIVE_SCHEMAS:
        table = where.table(dataset)
        if table is None:
            continue
        for (date, hour), files in sorted(_hours(table).items()):
            if stop is not None and stop.is_set():
                return stats
            if files < 2 or _start(date, hour) + timedelta(hours=1, seconds=after_s) > now:
                continue
            hour_filter = [("date", "=", date), ("hour", "=", str(hour))]
            entity = SORT_KEYS[dataset][0] if len(SORT_KEYS[dataset]) > 1 else None  # a node's rows together
            try:
                done = (table.optimize.z_order([entity], partition_filters=hour_filter) if entity
                        else table.optimize.compact(partition_filters=hour_filter))
            except Exception as e:
                raise where.error(f"compacting {where.table_uri(dataset)} date={date} hour={hour}", e) from None
            stats.hours += 1
            stats.files_in += int(done.get("numFilesRemoved", files))
            stats.files_out += int(done.get("numFilesAdded", 1))
        stats.vacuumed += _vacuum(where, table, dataset)
    return stats


def prune(where: DeltaLocation, cfg: ArchiveConfig, now: datetime | None = None, dry_run: bool = False) -> DeltaUpkeep:
    """Delete the hours past each dataset's retention (a partition predicate: no file read), then vacuum."""
    now = now or datetime.now(timezone.utc)
    stats = DeltaUpkeep("retention")
    for dataset in ARCHIVE_SCHEMAS:
        days = retention_days(cfg, dataset)
        table = where.table(dataset) if days > 0 else None
        if table is None:
            continue
        cutoff = now - timedelta(days=days)
        expired = [(d, h) for d, h in _hours(table) if _start(d, h) + timedelta(hours=1) <= cutoff]
        if not expired:
            continue
        stats.hours += len(expired)
        predicate = (f"date < '{cutoff:%Y-%m-%d}' or (date = '{cutoff:%Y-%m-%d}' and hour < {cutoff.hour})")
        if dry_run:
            continue
        try:
            done = table.delete(predicate)
        except Exception as e:
            raise where.error(f"deleting expired hours of {where.table_uri(dataset)}", e) from None
        stats.rows += int(done.get("num_deleted_rows", 0) or 0)
        stats.vacuumed += _vacuum(where, table, dataset)
    return stats


def _vacuum(where: DeltaLocation, table, dataset: str) -> int:
    try:
        return len(table.vacuum(retention_hours=VACUUM_AFTER_H, dry_run=False, enforce_retention_duration=False))
    except Exception as e:
        raise where.error(f"vacuuming {where.table_uri(dataset)}", e) from None
