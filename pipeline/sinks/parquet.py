"""The Parquet archive: one hive-partitioned dataset per record type.

    <data_dir>/archive/<dataset>/date=YYYY-MM-DD/hour=HH/part-<first ts>-<writer>-<seq>.parquet

Batches are buffered per dataset (and per source partition, from Kafka) and written
as one file per buffer and hour partition per flush. Each file is written into `<data_dir>/archive/.staging/` (same filesystem,
outside every dataset) and renamed into place, so a reader never sees a partial
file and no temporary file ever sits inside a dataset. File names never collide
with earlier data, so appending never overwrites it.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
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


@dataclass
class _Buffer:
    batches: list[pa.RecordBatch] = field(default_factory=list)
    rows: int = 0
    first_offset: int = -1
    last_offset: int = -1


class ArchiveWriter:
    """Buffers per dataset and source partition; writes one file per buffer and hour.

    From a partitioned bus (Kafka) a file is named after the partition and the offset
    range it holds, `part-p<partition>-o<first>-<last>.parquet`, and `archived_until`
    says which offsets are already on disk, so a consumer that restarts from its last
    commit skips what it had archived: redelivery never duplicates a row. In-process,
    files are named `part-<first ts ns>-<writer>-<seq>.parquet`.
    """

    def __init__(self, root: Path, compression: str = "zstd", max_buffer_rows: int = 500_000,
                 writer_id: str | None = None) -> None:
        self.root = Path(root)
        self.staging = self.root / ".staging"
        self.staging.mkdir(parents=True, exist_ok=True)
        self.compression = None if compression == "none" else compression
        self.max_buffer_rows = max_buffer_rows
        self.writer_id = writer_id or uuid.uuid4().hex[:12]
        self._seq = 0
        self._buffers: dict[tuple[str, int], _Buffer] = {}
        self._archived: dict[tuple[str, int], int] = {}
        self.rows_written: dict[str, int] = {name: 0 for name in SCHEMAS}
        self.files_written = 0
        self.redelivered_skipped = 0  # messages not written again: their offsets were archived
        for leftover in self.staging.glob("*.parquet"):  # from a crash mid-write: never renamed, never visible
            leftover.unlink()

    def add(self, dataset: str, batch: pa.RecordBatch, partition: int = -1, offset: int = -1) -> bool:
        """Buffer a batch; True when the dataset's buffers are full and should be flushed."""
        if batch.schema != SCHEMAS[dataset]:
            batch = pa.RecordBatch.from_arrays([batch.column(f.name).cast(f.type) for f in SCHEMAS[dataset]],
                                               schema=SCHEMAS[dataset])
        buf = self._buffers.setdefault((dataset, partition), _Buffer())
        buf.batches.append(batch)
        buf.rows += batch.num_rows
        if offset >= 0:
            buf.first_offset = offset if buf.first_offset < 0 else min(buf.first_offset, offset)
            buf.last_offset = max(buf.last_offset, offset)
        return sum(b.rows for (d, _), b in self._buffers.items() if d == dataset) >= self.max_buffer_rows

    def archived_until(self, dataset: str, partition: int) -> int:
        """The highest offset of `partition` already in the archive (-1: none)."""
        key = (dataset, partition)
        if key not in self._archived:
            last = -1
            for f in (self.root / dataset).glob(f"*/*/part-p{partition:04d}-o*-*.parquet"):
                last = max(last, int(f.stem.rsplit("-", 1)[1]))
            self._archived[key] = last
        return self._archived[key]

    def forget_archived(self) -> None:
        """Read the file names again on the next lookup (partitions changed hands)."""
        self._archived.clear()

    def take(self) -> dict[tuple[str, int], _Buffer]:
        """Hand over everything buffered (to be written off the event loop)."""
        taken, self._buffers = self._buffers, {}
        return taken

    def write(self, taken: dict[tuple[str, int], _Buffer]) -> list[Path]:
        """Write taken buffers: one file per buffer and hour, atomically renamed into place."""
        paths = []
        for (dataset, partition), buf in taken.items():
            # One contiguous chunk per column: per-node messages are many small batches.
            table = pa.Table.from_batches(buf.batches, schema=SCHEMAS[dataset]).combine_chunks()
            if table.num_rows == 0:
                continue
            ts = table.column(TIME_COLUMN[dataset]).cast(pa.int64()).to_numpy()
            hours = ts // HOUR_NS
            for hour in np.unique(hours):
                part = table if (hours == hour).all() else table.filter(pa.array(hours == hour))
                paths.append(self._write_file(dataset, int(hour), part, partition, buf))
                self.rows_written[dataset] += part.num_rows
            if partition >= 0:
                self._archived[(dataset, partition)] = max(self.archived_until(dataset, partition), buf.last_offset)
        return paths

    def flush(self) -> list[Path]:
        return self.write(self.take())

    def _write_file(self, dataset: str, hour: int, table: pa.Table, partition: int, buf: _Buffer) -> Path:
        start = datetime.fromtimestamp(hour * 3600, timezone.utc)
        if partition >= 0:
            name = f"part-p{partition:04d}-o{buf.first_offset:016d}-{buf.last_offset:016d}.parquet"
        else:
            first_ns = int(table.column(TIME_COLUMN[dataset]).cast(pa.int64()).to_numpy().min())
            self._seq += 1
            name = f"part-{first_ns}-{self.writer_id}-{self._seq:06d}.parquet"
        final_dir = self.root / dataset / f"date={start:%Y-%m-%d}" / f"hour={start:%H}"
        final_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.staging / f"{dataset}-{name}"
        pq.write_table(table, tmp, compression=self.compression)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final_dir / name)
        self.files_written += 1
        return final_dir / name
