"""`fleetwatch archive stats`: files, rows and bytes per dataset and day, from the Parquet
footers on local disk and from each table's log on object storage (no data is read): what the
archive holds, what it costs per metric value (one non-null reading: a GPU sample's power
is one, its temperature another), and where compaction (sinks/compaction.py) has not run yet.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from pyarrow import ArrowException

from pipeline.model import SCHEMAS
from pipeline.sinks.delta import PARTITIONS, DeltaLocation
from pipeline.sinks.parquet import HOUR_FILES

_DAY = re.compile(r"date=(\d{4}-\d{2}-\d{2})$")


@dataclass
class DayStats:
    dataset: str
    day: str
    files: int = 0
    rows: int = 0
    bytes: int = 0
    values: int = 0   # non-null cells
    unreadable: list[str] = field(default_factory=list)  # files whose footer is not Parquet's (zero bytes, cut short)

    @property
    def bytes_per_value(self) -> float | None:
        return self.bytes / self.values if self.values else None

    def to_json(self) -> dict:
        return {**asdict(self), "bytes_per_value": None if self.bytes_per_value is None
                else round(self.bytes_per_value, 4)}


def file_values(path: Path) -> tuple[int, int]:
    """(rows, non-null cells) of a Parquet file, from its footer."""
    return footer_values(pq.ParquetFile(path).metadata)


def footer_values(meta) -> tuple[int, int]:
    """(rows, non-null cells) of a Parquet footer (pyarrow's FileMetaData)."""
    values = 0
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for c in range(meta.num_columns):
            col = group.column(c)
            stats = col.statistics
            values += col.num_values - (stats.null_count if stats is not None and stats.has_null_count else 0)
    return meta.num_rows, values


def stats(where: Path | DeltaLocation) -> list[DayStats]:
    """Per dataset and day, oldest first; a dataset without files has no rows here. On object
    storage (archive.url), the files of each Delta table's latest version, as its log counts
    them (_delta_stats). Raises OSError where the bucket cannot be read."""
    if isinstance(where, DeltaLocation):
        return _delta_stats(where)
    archive = where
    out = []
    for dataset in SCHEMAS:
        for day_dir in sorted((Path(archive) / dataset).glob("date=*")):
            m = _DAY.search(day_dir.name)
            if not m:
                continue
            day = DayStats(dataset, m[1])
            for f in day_dir.glob(f"hour=*/{HOUR_FILES}"):
                try:
                    rows, values = file_values(f)
                    size = f.stat().st_size
                except FileNotFoundError:  # merged or pruned while we read: the next run counts its successor
                    continue
                except (OSError, ArrowException):  # a file no writer of the archive wrote whole: said, not a traceback
                    day.unreadable.append(str(f))
                    continue
                day.files, day.rows, day.bytes, day.values = (day.files + 1, day.rows + rows, day.bytes + size,
                                                              day.values + values)
            if day.files or day.unreadable:
                out.append(day)
    return out


def _delta_stats(where: DeltaLocation) -> list[DayStats]:
    """From each table's log: a file's rows and null counts are in its add action. Only a file
    whose log entry lacks a column's (a table created before sinks/delta.NEW_TABLE, where Delta
    kept the first 32 columns'; a file older than a column) has its footer read."""
    from deltalake.exceptions import DeltaError
    out = []
    for dataset in SCHEMAS:
        table = where.table(dataset)
        if table is None:
            continue
        try:
            files = _logged(table)
            unlogged = {path for path, (_, values, _) in files.items() if values is None}
            if unlogged:  # (paths as the log's)
                for fragment in table.to_pyarrow_dataset().get_fragments():
                    if fragment.path in unlogged:
                        rows, values = footer_values(fragment.metadata)
                        files[fragment.path] = (rows, values, files[fragment.path][2])
        except (OSError, DeltaError, ArrowException) as e:  # unreachable, refused, vacuumed, not Parquet
            raise where.error(f"reading {where.table_uri(dataset)}", e) from None
        days: dict[str, DayStats] = {}
        for path, (rows, values, size) in files.items():
            m = _DAY.search(path.rsplit("/", 2)[0])
            day = days.setdefault(m[1] if m else "", DayStats(dataset, m[1] if m else ""))
            day.files, day.rows, day.bytes, day.values = (day.files + 1, day.rows + rows, day.bytes + size,
                                                          day.values + (values or 0))
        out += [days[d] for d in sorted(days)]
    return out


def _logged(table) -> dict[str, tuple[int, int | None, int]]:
    """path: (rows, non-null cells or None where the log does not say, bytes) of the table's files."""
    import pyarrow as pa
    import pyarrow.compute as pc
    actions = pa.table(table.get_add_actions(flatten=True))
    columns = [f.name for f in table.schema().fields if f.name not in PARTITIONS]
    rows = pc.fill_null(actions.column("num_records"), 0)
    nulls = [actions.column(f"null_count.{c}") if f"null_count.{c}" in actions.column_names
             else pa.nulls(actions.num_rows, pa.int64()) for c in columns]
    values = pa.array([0] * actions.num_rows, pa.int64())
    for n in nulls:  # a null anywhere (no statistics for a column) leaves the file's total null
        values = pc.add(values, pc.subtract(rows, n))
    known = pc.and_(actions.column("num_records").is_valid(), values.is_valid())
    return {path: (r, v if k else None, size) for path, r, v, k, size in zip(
        actions.column("path").to_pylist(), rows.to_pylist(), values.to_pylist(), known.to_pylist(),
        actions.column("size_bytes").to_pylist())}


def text(days: list[DayStats]) -> str:
    if not days:
        return "the archive holds no files yet"
    head = ["DATASET", "DAY", "FILES", "ROWS", "MB", "BYTES/VALUE"]
    rows = [[d.dataset, d.day, f"{d.files:,}", f"{d.rows:,}", f"{d.bytes / 2**20:,.1f}",
             "-" if d.bytes_per_value is None else f"{d.bytes_per_value:.3f}"] for d in days]
    totals: dict[str, DayStats] = {}
    for d in days:
        t = totals.setdefault(d.dataset, DayStats(d.dataset, "all"))
        t.files, t.rows, t.bytes, t.values = t.files + d.files, t.rows + d.rows, t.bytes + d.bytes, t.values + d.values
    rows += [[t.dataset, "all", f"{t.files:,}", f"{t.rows:,}", f"{t.bytes / 2**20:,.1f}",
              "-" if t.bytes_per_value is None else f"{t.bytes_per_value:.3f}"] for t in totals.values()]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    table = "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                       for r in [head, *rows])
    unreadable = [f for d in days for f in d.unreadable]
    if unreadable:
        table += (f"\n{len(unreadable)} files are not readable Parquet (a writer that crashed before the archive "
                  f"wrote by rename, a copy cut short): the readers refuse the archive while they are there; move "
                  f"them out of it:\n" + "\n".join(f"  {f}" for f in unreadable))
    return table
