"""A durable, ordered queue of what one receiver is owed, on disk.

    <data_dir>/outbox/<receiver>/
        00000000000000000001.jsonl   segments: one JSON record a line, named by their first seq
        cursor.json                  {"acked": N}: every record up to seq N is done with

A record is appended and fsynced before anyone counts it as sent; it is acked only
after the receiver took it (or it was dead-lettered). The cursor is replaced atomically
(temporary file, fsync, rename); a crash between a delivery and the cursor's next write
sends those records again after the restart, with the same id, which receivers use to
drop duplicates (at least once, never lost). The reader holds a small window of records
in memory, never the backlog, and segments go once every record in them is acked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.sinks.files import fsync_dir, write_atomically

log = logging.getLogger(__name__)

SEGMENT_BYTES = 1 << 20   # roll to a new segment file past this size
WINDOW = 64               # records read from disk at a time
CURSOR_SYNC_S = 0.2       # longest a delivered record's ack waits in memory (a crash resends these)


@dataclass(frozen=True)
class Record:
    seq: int          # position in this outbox, from 1
    id: str           # stable across retries and restarts: the Idempotency-Key
    created: float    # unix time it was enqueued (max_age counts from here)
    payload: Any      # the JSON body to POST


class Outbox:
    """One receiver's queue. Thread-safe: the notifier appends from one thread while the
    receiver's delivery thread reads and acks."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._cursor_path = self.dir / "cursor.json"
        self._segments: list[int] = sorted(int(p.stem) for p in self.dir.glob("*.jsonl") if p.stem.isdigit())
        self.bad_lines = 0
        self.acked = self._read_cursor()
        self._synced = self.acked
        self._last_sync = time.monotonic()
        self.next_seq = self._scan_tail()
        self.acked = max(self.acked, (self._segments[0] - 1) if self._segments else self.next_seq - 1)
        self._window: deque[Record] = deque()
        self._read_seg = 0   # index in _segments of the segment being read
        self._read_pos = 0   # byte offset of the next line to read there
        self._writer: BinaryIO | None = None
        self._drop_acked_segments()

    @property
    def pending(self) -> int:
        return self.next_seq - 1 - self.acked

    def append(self, payloads: list[Any], now: float, ids: list[str] | None = None) -> list[Record]:
        """Durably enqueue payloads (one fsync for all), each under its id (the Idempotency-Key) or a random one;
        returns their records."""
        if not payloads:
            return []
        with self._lock:
            writer = self._writable()
            records = [Record(self.next_seq + i, ids[i] if ids else uuid.uuid4().hex, now, p)
                       for i, p in enumerate(payloads)]
            data = b"".join(json.dumps({"seq": r.seq, "id": r.id, "created": r.created, "payload": r.payload},
                                       separators=(",", ":")).encode() + b"\n" for r in records)
            start = writer.tell()
            try:
                writer.write(data)
                writer.flush()
                os.fsync(writer.fileno())
            except OSError:  # e.g. disk full: take back what got written, so no half-append is ever read
                with contextlib.suppress(OSError):
                    writer.close()  # flushes what is buffered, if it can: truncated next
                self._writer = None
                os.truncate(self._path(self._segments[-1]), start)
                raise
            self.next_seq += len(records)
            return records

    def peek(self, n: int) -> list[Record]:
        """Up to n (at most WINDOW) of the oldest records not acked yet, oldest first."""
        with self._lock:
            if not self._window:
                self._fill()
            return [self._window[i] for i in range(min(n, len(self._window)))]

    def ack(self, seq: int) -> None:
        """The head record is done with (delivered or dead-lettered)."""
        with self._lock:
            if not self._window or self._window[0].seq != seq:
                raise ValueError(f"outbox {self.dir}: ack of seq {seq}, but the head is "
                                 f"{self._window[0].seq if self._window else None}")  # a programming error
            self._window.popleft()
            self.acked = seq
            if time.monotonic() - self._last_sync >= CURSOR_SYNC_S:
                self._sync()

    def sync(self) -> None:
        """Write the cursor now (when idle or stopping)."""
        with self._lock:
            self._sync()

    def close(self) -> None:
        """Save the cursor; with nothing pending, no segment is left behind either."""
        with self._lock:
            self._sync()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if self.pending == 0:
                for first in self._segments:
                    self._path(first).unlink(missing_ok=True)
                self._segments = []

    # ---- internals -------------------------------------------------------------------

    def _path(self, first_seq: int) -> Path:
        return self.dir / f"{first_seq:020d}.jsonl"

    def _read_cursor(self) -> int:
        try:
            return int(json.loads(self._cursor_path.read_text())["acked"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Sending again is safe (receivers drop duplicates by id); skipping is not.
            log.error("outbox %s: cursor unreadable (%s); delivering every record still on disk again",
                      self.dir, e)
            return 0

    def _scan_tail(self) -> int:
        """The next seq, from the last segment; a line torn by a crash mid-append is cut off
        (it was never fsynced, so nobody was told it was queued)."""
        while self._segments:
            path = self._path(self._segments[-1])
            data = path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                log.warning("outbox %s: cutting a partial last line (%d bytes) left by a crash", path, len(data) - end)
                with open(path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
            last = data[:end].rstrip(b"\n").rsplit(b"\n", 1)[-1]
            if last:
                try:
                    return int(json.loads(last)["seq"]) + 1
                except (ValueError, KeyError, TypeError):
                    return self._segments[-1] + data[:end].count(b"\n")  # seqs are consecutive
            path.unlink()  # empty
            self._segments.pop()
        return self.acked + 1

    def _writable(self) -> BinaryIO:
        """The segment to append to: the last one until it is full, then a new one."""
        if self._writer is not None and self._writer.tell() < SEGMENT_BYTES:
            return self._writer
        if self._writer is None and self._segments and \
                self._path(self._segments[-1]).stat().st_size < SEGMENT_BYTES:
            self._writer = open(self._path(self._segments[-1]), "ab")
            return self._writer
        # The new segment first: one that cannot be made (a full disk, no inodes) leaves the outbox as it was,
        # to try the roll again at the next append (a closed writer and a segment listed but not on disk had
        # failed every append and read after it, and ended notify).
        writer = open(self._path(self.next_seq), "ab")
        try:
            fsync_dir(self.dir)  # the new file's name is durable too
        except OSError:
            writer.close()
            raise
        if self._writer is not None:
            self._writer.close()
        self._segments.append(self.next_seq)
        self._writer = writer
        return self._writer

    def _fill(self) -> None:
        """Read the next window of unacked records from disk."""
        while not self._window and self._read_seg < len(self._segments):
            path = self._path(self._segments[self._read_seg])
            with open(path, "rb") as f:
                f.seek(self._read_pos)
                while len(self._window) < WINDOW:
                    line = f.readline()
                    if not line.endswith(b"\n"):
                        break  # end of what was written
                    self._read_pos += len(line)
                    rec = self._parse(line, path)
                    if rec is not None and rec.seq > self.acked:
                        self._window.append(rec)
            if self._window or self._read_seg == len(self._segments) - 1:
                return
            # Read out, nothing left in it (acked, or unreadable: done with, so it can go): the next one.
            self._read_seg += 1
            self._read_pos = 0
            self.acked = max(self.acked, self._segments[self._read_seg] - 1)

    def _parse(self, line: bytes, path: Path) -> Record | None:
        try:
            d = json.loads(line)
            return Record(int(d["seq"]), str(d["id"]), float(d["created"]), d["payload"])
        except (ValueError, KeyError, TypeError) as e:
            self.bad_lines += 1
            if self.bad_lines == 1:
                log.error("outbox %s: skipping an unreadable record (%s); further ones are counted", path, e)
            return None

    def _sync(self) -> None:
        if self.acked != self._synced:
            write_atomically(self._cursor_path, json.dumps({"acked": self.acked}) + "\n")
            self._synced = self.acked
            self._drop_acked_segments()
        self._last_sync = time.monotonic()

    def _drop_acked_segments(self) -> None:
        """Delete segments whose every record is acked, the cursor already saying so on disk."""
        while len(self._segments) > 1 and self._segments[1] - 1 <= self._synced:
            self._path(self._segments.pop(0)).unlink(missing_ok=True)
            if self._read_seg == 0:  # not read yet (at start): read the new first one from its start
                self._read_pos = 0
            else:
                self._read_seg -= 1
