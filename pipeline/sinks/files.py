"""Durable local files: what the alert log, the outboxes, dead letters, routing state and
silences write, each fsynced before anyone is told it is written."""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable


def fsync_dir(path: Path) -> None:
    """Make a file's creation or rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str | bytes, fsync: bool = True) -> None:
    """Replace `path` with `text` (or bytes) so a crash leaves the old or the new content, never a mix.
    fsync=False: a reader still never sees half of it, but a crash may lose the new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") if isinstance(text, bytes) else open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: the part written would hold the last free bytes others need
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


class RewrittenFile:
    """A file a role rewrites again and again (a checkpoint, a state, a status). A write that
    fails (a full disk) is said once, with what it means, until one works again, which is
    said too; the role goes on either way and the previous file stays in place. `durable`:
    fsynced (a state a restart resumes from), or only replaced whole (a status rewritten every
    second from memory, where a reader must never see half of it)."""

    def __init__(self, log, path: Path, role: str, meaning: str, durable: bool = True) -> None:
        self.log, self.path, self.role, self.meaning, self.durable = log, Path(path), role, meaning, durable
        self.failing = False

    def write(self, text: str | bytes) -> bool:
        """Replace the file atomically; False when it could not be written."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, text, fsync=self.durable)
        except OSError as e:
            if not self.failing:
                self.log.warning("%s: cannot write %s (%s); %s. Free space or fix permissions there; it is "
                                 "retried", self.role, self.path, e, self.meaning)
            self.failing = True
            return False
        if self.failing:
            self.log.info("%s: %s written again", self.role, self.path)
        self.failing = False
        return True


@dataclass(frozen=True)
class Rotation:
    """When a JSON-lines file (alerts.jsonl, the dead letters) starts afresh: on the first write
    of a new UTC day, and once it holds `max_bytes`. The file it was is kept beside it as
    `<stem>.<YYYY-MM-DD>[.<n>]<suffix>` (the day of its last line) for `keep_days`."""
    max_bytes: int = 256 * 2**20
    keep_days: float = 30.0

    @staticmethod
    def of(daemon) -> "Rotation":
        """From the config's daemon section (jsonl_max_mb, jsonl_keep_days)."""
        return Rotation(int(daemon.jsonl_max_mb * 2**20), daemon.jsonl_keep_days)


def rotate(path: Path, rotation: Rotation, now: float | None = None,
           carry: Callable[[Path], str] | None = None) -> Path | None:
    """Start `path` afresh if `rotation` says so; returns the name it was kept under. The new
    file starts with `carry(old path)` (alerts.jsonl: the alerts still firing, so that its
    readers need only it). `path` is never missing: the old file gets its second name by a
    hard link, then the new content replaces it in one rename."""
    now = time.time() if now is None else now
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    last_day = datetime.fromtimestamp(st.st_mtime, timezone.utc).date()
    today = datetime.fromtimestamp(now, timezone.utc).date()
    if st.st_size == 0 or (last_day >= today and st.st_size < rotation.max_bytes):
        return None
    n, kept = 0, path.with_name(f"{path.stem}.{last_day}{path.suffix}")
    while kept.exists():
        n += 1
        kept = path.with_name(f"{path.stem}.{last_day}.{n}{path.suffix}")
    head = carry(path) if carry is not None else ""
    try:
        os.link(path, kept)
    except OSError:  # a filesystem without hard links: a copy (one writer: nothing is appended meanwhile)
        shutil.copy2(path, kept)
    write_atomically(path, head)
    cutoff = today - timedelta(days=rotation.keep_days)
    for old in path.parent.glob(f"{path.stem}.*{path.suffix}"):
        m = _ROTATED.fullmatch(old.name[len(path.stem):])
        try:
            day = datetime.fromisoformat(m[1]).date() if m else None
        except ValueError:  # a name like ours that is no date (alerts.2025-02-30.jsonl): not ours, kept
            continue
        if day is not None and day < cutoff:
            old.unlink(missing_ok=True)
    return kept


_ROTATED = re.compile(r"\.(\d{4}-\d{2}-\d{2})(?:\.\d+)?\.[A-Za-z0-9]+")


def append_durably(path: Path, text: str, rotation: Rotation | None = None,
                   carry: Callable[[Path], str] | None = None) -> None:
    """Append `text` (whole lines) to `path` and fsync it, after rotating it if `rotation` says
    so (`rotate`). An append that fails (a full disk) leaves the file as it was, so trying
    again never leaves half a line before the retry."""
    if rotation is not None:
        rotate(path, rotation, carry=carry)
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


class SharedJson:
    """A JSON file that writers (the CLI, an HTTP endpoint) change one at a time under an
    advisory lock and replace atomically, and that a daemon re-reads when it changed: the
    silences (sinks/silences.py) and the power requests (power/store.py). `what` names its
    content in messages ("silences")."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = Path(path), what
        self._stamp: tuple[int, int, int] | None = None

    def changed(self) -> bool:
        """Has the file changed since the last call (or write)? A replace gives a new inode."""
        try:
            st = self.path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        changed, self._stamp = stamp != self._stamp, stamp
        return changed

    def read(self) -> dict | None:
        """The document (None: no file yet); ConfigError saying what to do when it does not parse."""
        import json
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            return doc
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise self.unreadable(e) from None

    def unreadable(self, e: Exception):
        """The ConfigError of a file that does not parse, or whose content is wrong."""
        from pipeline.config import ConfigError
        return ConfigError(f"{self.what} file {self.path} is unreadable ({type(e).__name__}: {e}); fix it, or move "
                           f"it away to start with none")

    def locked(self):
        """A context: writers one at a time (re-read under it: no writer loses another's
        change; a corrupt file stops a writer rather than being replaced)."""
        import contextlib
        import fcntl

        from pipeline.config import ConfigError

        @contextlib.contextmanager
        def lock():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path.with_name(f".{self.path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ConfigError(f"cannot write {self.what} in {self.path.parent} ({e.strerror}); check --data-dir "
                                  f"and its permissions") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the lock
        return lock()

    def write(self, doc: dict) -> None:
        """Replace the file (under `locked`)."""
        import json
        write_atomically(self.path, json.dumps(doc, indent=2) + "\n")
        self.changed()  # what we wrote is what we have
