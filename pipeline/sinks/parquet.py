"""The Parquet archive: one hive-partitioned dataset per record type.

    <data_dir>/archive/<dataset>/date=YYYY-MM-DD/hour=HH/part-<first ts>-<writer>-<seq>.parquet

Batches are buffered per dataset and written as one file per hour partition per
flush. Each file is written into `<data_dir>/archive/.staging/` (same filesystem,
outside every dataset) and renamed into place, so a reader never sees a partial
file and no temporary file ever sits inside a dataset. File names are unique per
writer and flush, so appending never overwrites.
"""

from __future__ import annotations

import logging
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.model import SCHEMAS

log = logging.getLogger(__name__)

HOUR_NS = 3_600_000_000_000
# The column that places a row in a partition.
TIME_COLUMN = {name: ("start" if name == "fault_labels" else "ts") for name in SCHEMAS}


class ArchiveWriter:
    def __init__(self, root: Path, compression: str = "zstd", max_buffer_rows: int = 500_000,
                 writer_id: str | None = None) -> None:
        self.root = Path(root)
        self.staging = self.root / ".staging"
        self.staging.mkdir(parents=True, exist_ok=True)
        self.compression = None if compression == "none" else compression
        self.max_buffer_rows = max_buffer_rows
        self.writer_id = writer_id or uuid.uuid4().hex[:12]
        self._seq = 0
        self._buffers: dict[str, list[pa.RecordBatch]] = {name: [] for name in SCHEMAS}
        self._rows: dict[str, int] = {name: 0 for name in SCHEMAS}
        self.rows_written: dict[str, int] = {name: 0 for name in SCHEMAS}
        self.files_written = 0
        for leftover in self.staging.glob("*.parquet"):  # from a crash mid-write: never renamed, never visible
            leftover.unlink()

    def add(self, dataset: str, batch: pa.RecordBatch) -> bool:
        """Buffer a batch; True when the dataset's buffer is full and should be flushed."""
        if batch.schema != SCHEMAS[dataset]:
            batch = pa.RecordBatch.from_arrays([batch.column(f.name).cast(f.type) for f in SCHEMAS[dataset]],
                                               schema=SCHEMAS[dataset])
        self._buffers[dataset].append(batch)
        self._rows[dataset] += batch.num_rows
        return self._rows[dataset] >= self.max_buffer_rows

    @property
    def buffered_rows(self) -> int:
        return sum(self._rows.values())

    def take(self) -> dict[str, list[pa.RecordBatch]]:
        """Hand over everything buffered (to be written off the event loop)."""
        taken = {k: v for k, v in self._buffers.items() if v}
        self._buffers = {name: [] for name in SCHEMAS}
        self._rows = {name: 0 for name in SCHEMAS}
        return taken

    def write(self, taken: dict[str, list[pa.RecordBatch]]) -> list[Path]:
        """Write taken buffers: one file per dataset and hour, atomically renamed into place."""
        paths = []
        for dataset, batches in taken.items():
            # One contiguous chunk per column: per-node messages are many small batches.
            table = pa.Table.from_batches(batches, schema=SCHEMAS[dataset]).combine_chunks()
            if table.num_rows == 0:
                continue
            ts = table.column(TIME_COLUMN[dataset]).cast(pa.int64()).to_numpy()
            hours = ts // HOUR_NS
            for hour in np.unique(hours):
                part = table if hours.size and (hours == hour).all() else table.filter(pa.array(hours == hour))
                paths.append(self._write_file(dataset, int(hour), part))
                self.rows_written[dataset] += part.num_rows
        return paths

    def flush(self) -> list[Path]:
        return self.write(self.take())

    def _write_file(self, dataset: str, hour: int, table: pa.Table) -> Path:
        start = datetime.fromtimestamp(hour * 3600, timezone.utc)
        first_ns = int(table.column(TIME_COLUMN[dataset]).cast(pa.int64()).to_numpy().min())
        self._seq += 1
        name = f"part-{first_ns}-{self.writer_id}-{self._seq:06d}.parquet"
        final_dir = self.root / dataset / f"date={start:%Y-%m-%d}" / f"hour={start:%H}"
        final_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.staging / name
        pq.write_table(table, tmp, compression=self.compression)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final_dir / name)
        self.files_written += 1
        return final_dir / name
