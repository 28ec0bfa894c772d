"""`fleetwatch query`: SQL over the Parquet archive, with DuckDB.

Each dataset of the archive (model.SCHEMAS: `gpu_samples`, `facility_samples`, `events`,
`alerts`, `node_health`, `fault_labels`, `power_actions`, `power_requests`) is a view
of the same name, with every column of its current schema and the hive partition
columns `date` and `hour`:

  - across schema versions by column name: a file written before a column existed reads
    null there (DuckDB's `union_by_name`), and a column an upgrade derives is derived
    as the bus derives it (facility_sample v1's `device_class`, by model.legacy_device_class);
  - across archive formats: times are TIMESTAMPTZ (microseconds, archive format 2); while
    a dataset still holds files of format 1 (nanoseconds, before 2026-12; compaction
    rewrites them) they are TIMESTAMPTZ_NS in SQL, exact, and results come out truncated
    to the microsecond as polars reads them (`_microseconds`; a cast in the view would
    round, and hide the times from DuckDB's row-group filters);
  - on an empty or partial archive: a dataset without files is an empty view of the
    same columns, so a query that names it returns no rows instead of failing;
  - on an archive of years: a query binds only the views its SQL names (binding reads a footer
    of each file), a report only its period's days of the samples; a file that is not data
    (sinks/parquet.py's DATA_FILES) is no file of any view, and one that is not readable Parquet
    is named, with what to do (analytics/archive.py's damaged_file);
  - while the daemon writes: a file appears only by rename (sinks/parquet.py), so a
    query sees whole files, and each view reads the files there when it runs; on object
    storage (`archive.url`), each view reads its Delta table's latest version.

The queries an SRE asks first are in docs/queries.md (tests/test_query.py runs each).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import IO, Iterable, Mapping

import pyarrow as pa

from pipeline.analytics.archive import damaged_file
from pipeline.model import ARCHIVE_SCHEMAS, SCHEMAS, iso_utc, legacy_device_class
from pipeline.sinks.delta import DeltaLocation
from pipeline.sinks.parquet import DATA_FILES, DAY_FILES, files_glob

FORMATS = ("table", "csv", "json", "parquet")
HIVE_TYPES = "{'date': DATE, 'hour': INTEGER}"


class QueryError(Exception):
    """The SQL was refused (syntax, an unknown view or column): DuckDB's words, and the views."""


@dataclass(frozen=True)
class Archive:
    """A DuckDB connection with a view per dataset of `archive_dir` (module doc), or of the
    Delta tables at `delta` (sinks/delta.py: `archive.url`), each read at its latest version."""
    archive_dir: Path | None = None
    delta: DeltaLocation | None = None

    @classmethod
    def at(cls, where: Path | DeltaLocation) -> "Archive":
        """The views of the archive at `where` (analytics/archive.py's place)."""
        return cls(delta=where) if isinstance(where, DeltaLocation) else cls(Path(where))

    def connect(self, names: Iterable[str] | None = None, days: Mapping[str, tuple[date, date]] | None = None,
                listed: bool = False):
        """A connection with the views of `names` (None: every dataset): binding a view reads a footer
        of each of its files, which on an archive of years is most of a query's time (10,000 files:
        2 s, 775 MB). `days`: dataset -> (first, last): only its files of those days (a report's period).
        `listed`: every other dataset a view of its columns and no rows (`show tables` lists them all)."""
        import duckdb  # only `fleetwatch query` and the report need it
        con = duckdb.connect()
        con.execute("SET TimeZone = 'UTC'")  # the archive's times are UTC: shown as such
        con.create_function("fw_legacy_device_class", lambda device, rack: legacy_device_class(device, rack),
                            ["VARCHAR", "VARCHAR"], "VARCHAR", type="arrow")
        for name, schema in ARCHIVE_SCHEMAS.items():
            bound = names is None or name in names
            if not bound and not listed:
                continue
            empty = f"_{name}_columns"
            con.from_arrow(schema.empty_table()).create(empty)
            table = self.delta.table(name) if self.delta is not None and bound else None
            folder = self.archive_dir / name if self.archive_dir is not None and bound else None
            if table is not None:  # (DuckDB's delta extension is a download: read through deltalake's dataset)
                con.register(f"_{name}_delta", table.to_pyarrow_dataset())
                source = (f"select * replace (date::date as date, hour::integer as hour) from "
                          f"(select * from {empty} union all by name select * from _{name}_delta)")
            elif folder is not None and (files := _globs(folder, (days or {}).get(name))):
                source = (f"select * from {empty} union all by name select * from read_parquet([{files}], "
                          f"hive_partitioning = true, union_by_name = true, hive_types = {HIVE_TYPES})")
            else:
                source = f"select *, null::date as date, null::integer as hour from {empty}"
            derive = ""
            if name == "facility_samples":
                derive = " replace (coalesce(device_class, fw_legacy_device_class(device, rack)) as device_class)"
            con.execute(f"create view {name} as select *{derive} from ({source})")
        return con

    def run(self, sql: str) -> pa.Table:
        import duckdb
        con = None
        try:
            con = self.connect(named(sql), listed=True)  # (binding reads its files' footers: a damaged one fails here)
            rel = con.sql(sql)
            if rel is None:  # a statement without rows (SET ...)
                return pa.table({})
            fetch = getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table  # (the name before DuckDB 1.4)
            return _microseconds(fetch())
        except duckdb.Error as e:
            said = str(e).strip()
            if (damaged := damaged_file(said)) is not None:
                raise QueryError(damaged) from None
            raise QueryError(f"{said}\n(views: {', '.join(SCHEMAS)}; each has its schema's columns "
                             f"(schemas/README.md) and date, hour)") from None
        finally:
            if con is not None:
                con.close()


def named(sql: str) -> set[str]:
    """The datasets `sql` may name (a word of it; one in a string or a comment costs a view only)."""
    words = {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", sql)}
    return {name for name in ARCHIVE_SCHEMAS if name in words}


def _globs(folder: Path, days: tuple[date, date] | None) -> str:
    """The files of a dataset as read_parquet's list of globs (SQL; '' where there is none): every day's,
    or those of `days` only, whose folders name them (hive's `date=`): a period reads its own footers."""
    if days is None:
        globs = [files_glob(folder)] if any(folder.glob(DATA_FILES)) else []
    else:
        first, last = (d.isoformat() for d in days)
        globs = [files_glob(day, DAY_FILES) for day in sorted(folder.glob("date=*"))
                 if first <= day.name[5:] <= last and any(day.glob(DAY_FILES))]
    return ", ".join("'" + str(g).replace("'", "''") + "'" for g in globs)


def _microseconds(table: pa.Table) -> pa.Table:
    """Times to the microsecond, truncated as pyarrow and polars do (Spark and Python's datetime
    refuse nanoseconds, which format-1 files and some SQL functions make)."""
    for i, f in enumerate(table.schema):
        if pa.types.is_timestamp(f.type) and f.type.unit == "ns":
            table = table.set_column(i, f.name, table.column(i).cast(pa.timestamp("us", f.type.tz), safe=False))
    return table


def write(table: pa.Table, fmt: str, out: IO | None = None, path: Path | None = None) -> None:
    """`table` as `fmt` (FORMATS) to `path`, or to `out` (stdout) where no path is given."""
    if fmt == "parquet":
        import pyarrow.parquet as pq
        pq.write_table(table, path)  # (the CLI asks for --out: binary is no terminal's)
        return
    if path is not None:
        with open(path, "w", encoding="utf-8", newline="") as f:
            return write(table, fmt, f)
    out = out or sys.stdout
    if fmt == "csv":
        import pyarrow.csv as pcsv
        buf = pa.BufferOutputStream()
        pcsv.write_csv(table, buf)
        out.write(buf.getvalue().to_pybytes().decode())
    elif fmt == "json":  # an array of objects, times in ISO 8601 UTC (jq reads it)
        json.dump(table.to_pylist(), out, default=_json_value, indent=2)
        out.write("\n")
    else:
        out.write(text(table) + "\n")


def text(table: pa.Table) -> str:
    """Every row and column, aligned: the columns' names over the values; "(no rows)"."""
    head = table.column_names
    rows = [[_cell(v) for v in row.values()] for row in table.to_pylist()]
    if not rows:
        return "  ".join(head) + "\n(no rows)"
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
               for t in table.schema.types]
    return "\n".join("  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip()
                     for r in [head, *rows])


def _utc(t: datetime) -> str:
    """A time as ISO 8601 UTC to the microsecond (a time without a zone is the archive's: UTC)."""
    return iso_utc(t if t.tzinfo else t.replace(tzinfo=timezone.utc), "microseconds")


def _cell(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, datetime):
        return _utc(v)
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _json_value(v):
    if isinstance(v, datetime):
        return _utc(v)
    if isinstance(v, date):
        return v.isoformat()
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    return str(v)
