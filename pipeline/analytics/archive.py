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
"""

from __future__ import annotations

from pathlib import Path

from pipeline.model import ARCHIVE_SCHEMAS


def scan(dataset_dir: Path | str, dataset: str | None = None):
    """A polars LazyFrame of `<archive>/<dataset>` (hive partitions `date`, `hour` included),
    every column of the dataset's current schema, null where a file predates it."""
    import polars as pl  # only readers of the archive need it

    dataset_dir = Path(dataset_dir)
    name = dataset or dataset_dir.name
    schema = pl.from_arrow(ARCHIVE_SCHEMAS[name].empty_table()).schema
    frame = pl.scan_parquet(dataset_dir, hive_partitioning=True, schema=schema, missing_columns="insert",
                            cast_options=pl.ScanCastOptions(datetime_cast="nanosecond-downcast"))
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
