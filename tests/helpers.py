"""Helpers shared by tests of both tiers (unit tests in tests/, end-to-end tests in tests/e2e/):
the fast daemon settings, reading the archive back, starting `fleetwatch run` and waiting."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

FAST = {"FLEETWATCH_FLEET__SPEED": "20", "FLEETWATCH_FLEET__FAULT_INTERVAL_S": "4",
        "FLEETWATCH_FLEET__RACKS": "2", "FLEETWATCH_DAEMON__STATUS_INTERVAL_S": "1",
        "FLEETWATCH_ARCHIVE__FLUSH_INTERVAL_S": "1",
        # 20x the clock, a run crosses an hour now and then, depending on the time of day: the tests of
        # other things see the files as written (compaction has its own: tests/test_compaction.py)
        "FLEETWATCH_ARCHIVE__UPKEEP_INTERVAL_S": "0"}


def archived(data: Path, dataset: str) -> pl.DataFrame:
    files = list((data / "archive" / dataset).rglob("*.parquet"))
    if not files:
        return pl.DataFrame()
    return pl.scan_parquet(data / "archive" / dataset, hive_partitioning=True).collect()


def reported_samples(stderr: str) -> int:
    return int(re.search(r"stopped after [\d.]+ s: (\d+) GPU samples", stderr).group(1))


def start(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")} | FAST | (env or {})
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--data-dir", str(tmp_path / "data"), *args],
                            cwd=tmp_path, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def freeze(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP the process group of `pid` and return once every thread of `pid` is stopped: a
    stop reaches a thread running on another core a moment later, and a JVM's network thread
    had answered a request sent after killpg returned (a flaky test under load)."""
    import signal
    os.killpg(pid, signal.SIGSTOP)

    def states() -> set[str]:
        out = set()
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            try:  # (state: the field after the parenthesised name)
                out.add(stat.read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                pass
        return out
    wait_for(lambda: states() <= {"T", "t"}, timeout)


def http_get(url: str) -> tuple[int, str]:
    """(status, body) of a GET; (0, why) when nothing answers."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def run_on_terminal(tmp_path: Path, *args: str, stderr_too: bool, quiet_s: float) -> tuple[int, str]:
    """`fleetwatch run ARGS` with stdout (and stderr, if `stderr_too`) on a pseudo-terminal, as
    in an operator's shell; (exit status, everything it wrote there). Reading stops when the
    terminal closes or stays silent for `quiet_s`."""
    import os
    import pty
    import select
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")} | FAST
    p = subprocess.Popen([sys.executable, "-m", "pipeline", "run", *args, "--data-dir", "data"], cwd=tmp_path,
                         env=env, stdout=slave, stderr=slave if stderr_too else subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    try:
        while select.select([master], [], [], quiet_s)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the process closed the terminal and everything was read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        p.wait(timeout=quiet_s)
        os.close(master)
    return p.returncode, b"".join(chunks).decode(errors="replace")


def stop_in_order(procs: dict, groups: list[list[str]]) -> dict[str, str]:
    """SIGTERM each group of processes in turn (data order), wait for it; every process must
    exit 0. Returns each process's log (`proc.log_path`); kills whatever is left on the way out."""
    import signal
    logs = {}
    try:
        for group in groups:
            for name in group:
                procs[name].send_signal(signal.SIGTERM)
            for name in group:
                procs[name].wait(timeout=120)
                logs[name] = procs[name].log_path.read_text()
                assert procs[name].returncode == 0, f"{name}: {logs[name][-3000:]}"
    finally:
        for p in procs.values():
            p.kill()
    return logs


class HungFile:
    """A file whose next read hangs as one on a hung disk does (a FIFO: its open waits for a writer),
    until the reader has waited while the event loop had the chance to turn a few times (at most
    `bound_s`); then the reader gets `content` and the path is a plain file again. `turned`: whether the
    event loop turned while the reader waited (await `ticking()` beside the code under test)."""

    def __init__(self, path: Path, content: str, bound_s: float = 10.0) -> None:
        import threading
        self.path, self.content, self.bound_s = Path(path), content, bound_s
        self.turns = 0
        self.turned: bool | None = None  # None: no reader came
        self.path.unlink(missing_ok=True)
        os.mkfifo(self.path)
        self._thread = threading.Thread(target=self._hold, daemon=True)
        self._thread.start()

    def _hold(self) -> None:
        with open(self.path, "w") as fifo:  # (returns once a reader opened it)
            before, deadline = self.turns, time.monotonic() + self.bound_s
            while self.turns < before + 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            self.turned = self.turns >= before + 3
            plain = self.path.with_name(self.path.name + ".plain")
            plain.write_text(self.content)
            os.replace(plain, self.path)  # (later reads find a plain file)
            fifo.write(self.content)

    async def ticking(self) -> None:
        import asyncio
        while True:
            self.turns += 1
            await asyncio.sleep(0.005)

    def released(self, timeout: float = 60.0) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()
