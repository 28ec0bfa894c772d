"""`fleetwatch archive stats`: files, rows and bytes per dataset and day, from the Parquet
footers alone (no data is read): what the archive holds, what it costs per metric value
(one non-null reading: a GPU sample's power is one, its temperature another), and where
compaction (sinks/compaction.py) has not run yet.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.model import SCHEMAS

_DAY = re.compile(r"date=(\d{4}-\d{2}-\d{2})$")


@dataclass
class DayStats:
    dataset: str
    day: str
    files: int = 0
    rows: int = 0
    bytes: int = 0
    values: int = 0   # non-null cells

    @property
    def bytes_per_value(self) -> float | None:
        return self.bytes / self.values if self.values else None

    def to_json(self) -> dict:
        return {**asdict(self), "bytes_per_value": None if self.bytes_per_value is None
                else round(self.bytes_per_value, 4)}


def file_values(path: Path) -> tuple[int, int]:
    """(rows, non-null cells) of a Parquet file, from its footer."""
    meta = pq.ParquetFile(path).metadata
    values = 0
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for c in range(meta.num_columns):
            col = group.column(c)
            stats = col.statistics
            values += col.num_values - (stats.null_count if stats is not None and stats.has_null_count else 0)
    return meta.num_rows, values


def stats(archive: Path) -> list[DayStats]:
    """Per dataset and day, oldest first; a dataset without files has no rows here."""
    out = []
    for dataset in SCHEMAS:
        for day_dir in sorted((Path(archive) / dataset).glob("date=*")):
            m = _DAY.search(day_dir.name)
            if not m:
                continue
            day = DayStats(dataset, m[1])
            for f in day_dir.glob("hour=*/*.parquet"):
                try:
                    rows, values = file_values(f)
                    size = f.stat().st_size
                except FileNotFoundError:  # merged or pruned while we read: the next run counts its successor
                    continue
                day.files, day.rows, day.bytes, day.values = (day.files + 1, day.rows + rows, day.bytes + size,
                                                              day.values + values)
            if day.files:
                out.append(day)
    return out


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
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [head, *rows])
