"""A dataset of the Parquet archive (sinks/parquet.py), read at the current schema version.

The archive keeps every file as it was written, so one dataset, even one hour, can
hold files of two schema versions across a rolling upgrade (docs/data.md#schema-changes):
files written by an older Fleetwatch lack the columns added since. Read by column name
with the current schema, those columns are null in the older files' rows, as the bus
upgrades an older message (model.UPGRADES), and a column an upgrade derives is derived
here too (a facility reading's device_class from its device id). Polars reads the
first file's schema unless told otherwise, and then fails on a file with more columns:
`scan` tells it. Files of archive format 1 (before 2026-12) hold their times in
nanoseconds, read as the microseconds of format 2 (model.ARCHIVE_SCHEMAS).

`dataset` is what the commands that read the archive (`fleetwatch capacity`, `report`, `power
report`) read, wherever it lives: on local disk, or as the Delta tables of `archive.url`
(sinks/delta.py), the same frame either way.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path
from typing import Iterator, Union

from pipeline.model import ARCHIVE_SCHEMAS
from pipeline.sinks.delta import DeltaLocation
from pipeline.sinks.parquet import DATA_FILES, files_glob

Place = Union[Path, DeltaLocation]  # where an archive is: its folder, or its Delta tables


def place(cfg, data_dir_must_exist: bool = True) -> Place:
    """The archive of a config: `<data_dir>/archive` (its data_dir made by a daemon, unless
    told otherwise: a typo should not read as an empty archive), or the Delta tables of
    archive.url (read from anywhere: no data_dir needed)."""
    if cfg.archive.url:
        from pipeline.sinks.delta import location
        return location(cfg.archive)
    if data_dir_must_exist:
        from pipeline.config import existing_data_dir
        existing_data_dir(cfg)
    return Path(cfg.archive_dir)


def read_errors() -> tuple[type[BaseException], ...]:
    """What reading an archive raises when the data, not the code, is at fault: OSError (disk,
    bucket), and where loaded, deltalake's (a table this reader cannot read), DuckDB's and polars'
    (a file it cannot parse). Anything else is a defect and is shown as one."""
    kinds: list[type[BaseException]] = [OSError]
    for module, name in (("deltalake.exceptions", "DeltaError"), ("duckdb", "Error"),
                         ("polars.exceptions", "ComputeError")):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return tuple(kinds)


@contextlib.contextmanager
def reading(command: str, where: Place) -> Iterator[None]:
    """An archive that cannot be read (its bucket unreachable, credentials refused, a file gone
    under a reader) is the user's to fix: said as a ConfigError (`fleetwatch: <command>: ...`),
    not a traceback; on object storage through DeltaLocation.error (one line, secrets masked),
    with what to check. Most reads happen at a lazy frame's collect, so the whole command runs
    inside."""
    from pipeline.config import ConfigError
    try:
        yield
    except read_errors() as e:
        said = str(e)
        if isinstance(where, DeltaLocation) and not said.startswith("object storage:"):
            said = str(where.error(f"reading {where.url}", e))
        if (damaged := damaged_file(said)) is not None:
            said = damaged
        elif said.startswith("object storage:") and "DeltaProtocolError" in said:
            said += " (the table uses a Delta feature this reader lacks: deltalake may need upgrading)"
        elif said.startswith("object storage:"):
            said += (" (is the bucket reachable from here, archive.s3_endpoint_url right if it is not AWS, and are "
                     "credentials set: AWS_* or archive.credentials_file?)")
        raise ConfigError(f"{command}: {said}") from None


_DAMAGED = re.compile(r"No magic bytes found at end of file '([^']+)'|File '([^']+)' too small to be a Parquet file|"
                      r"(parquet: File out of specification)")


def damaged_file(said: str) -> str | None:
    """What to do about a file of the archive that is not Parquet (zero bytes, cut short: a copy, or a
    writer that crashed outside the archive's renames), from a reader's error (None: another error).
    DuckDB names the file; polars does not."""
    m = _DAMAGED.search(said)
    if m is None:
        return None
    what = f"{m[1] or m[2]} is" if m[1] or m[2] else "a file of the archive is"
    return (f"{what} not readable Parquet (zero bytes, or cut short: a copy, or a writer that crashed outside the "
            f"archive's renames): move it out of the archive (`fleetwatch archive stats` lists every such file)")


def shown(where: Place) -> str:
    """Where the archive is, for a person (no secret)."""
    return where.url if isinstance(where, DeltaLocation) else str(where)


def dataset(where: Place, name: str):
    """A dataset of the archive as `scan` reads it (its current schema, `date` and `hour`
    included), or None while it holds no file. Raises OSError where object storage cannot be
    read (its files are read when the frame is collected: run it under `reading`)."""
    import polars as pl

    if not isinstance(where, DeltaLocation):
        folder = Path(where) / name
        if not folder.is_dir() or next(folder.glob(DATA_FILES), None) is None:
            return None
        return scan(folder, name)
    from deltalake.exceptions import DeltaError
    table = where.table(name)
    try:
        if table is None or not table.file_uris():  # (retention can empty a table: no file, as on disk)
            return None
        stored = pl.scan_pyarrow_dataset(table.to_pyarrow_dataset())
        there = stored.collect_schema()
    except (OSError, DeltaError) as e:  # (its log read, its files listed: unreachable, refused, unsupported)
        raise where.error(f"reading {where.table_uri(name)}", e) from None
    schema = pl.from_arrow(ARCHIVE_SCHEMAS[name].empty_table()).schema
    # Delta merges a newer version's columns into the table: the rows before read null there,
    # as scan's missing columns do; the partitions are the hive columns' types (the date's format
    # given, so that a filter on the frame still reaches the scan: only the period is read).
    frame = stored.select([pl.col(c).cast(t) if c in there else pl.lit(None, t).alias(c) for c, t in schema.items()]
                          + [pl.col("date").str.to_date("%Y-%m-%d"), pl.col("hour").cast(pl.Int64)])
    return _derived(frame, name)


def scan(dataset_dir: Path | str, dataset: str | None = None):
    """A polars LazyFrame of `<archive>/<dataset>` (hive partitions `date`, `hour` included),
    every column of the dataset's current schema, null where a file predates it."""
    import polars as pl  # only readers of the archive need it

    dataset_dir = Path(dataset_dir)
    name = dataset or dataset_dir.name
    schema = pl.from_arrow(ARCHIVE_SCHEMAS[name].empty_table()).schema
    frame = pl.scan_parquet(files_glob(dataset_dir), hive_partitioning=True, schema=schema,
                            missing_columns="insert",
                            cast_options=pl.ScanCastOptions(datetime_cast="nanosecond-downcast"))
    return _derived(frame, name)


def _derived(frame, name: str):
    """The columns an upgrade derives, derived (module doc)."""
    import polars as pl

    if name == "facility_samples":  # version 1 had no device_class: its readers read it off the id
        frame = frame.with_columns(pl.col("device_class").fill_null(legacy_device_class()))
    return frame


def legacy_device_class():
    """model.legacy_device_class as a polars expression."""
    import polars as pl

    device = pl.col("device")
    return (pl.when(device.str.starts_with("pdu")).then(pl.lit("rack"))
            .when(device.str.starts_with("cdu")).then(pl.lit("cdu"))
            .when(device.str.starts_with("meter") | (pl.col("rack") == "")).then(pl.lit("meter"))
            .otherwise(pl.lit("")))
