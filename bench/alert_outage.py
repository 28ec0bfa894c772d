"""Alert delivery through a receiver outage: nothing lost, order kept, memory flat.

A Notifier (the notify role's delivery path: router, durable outbox, retries) gets new
alerts at a steady rate (and their resolutions later) while its webhook receiver, a real HTTP server in this
process (tests/services.HttpReceiver), is down for --outage-s (connection refused, or
answering 503 with --mode 503). Then the receiver comes back while alerts keep coming,
until the outbox is drained. Printed: alerts raised, notifications enqueued, delivered,
duplicates the receiver got (by Idempotency-Key), dead-lettered, whether the backlog
arrived in the order it was enqueued, peak RSS growth of the process, time to drain.

    python bench/alert_outage.py [--outage-s 600] [--rate 20] [--mode refused|503]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.config import load_config  # noqa: E402
from pipeline.model import Alert  # noqa: E402
from pipeline.sinks.notify import Notifier  # noqa: E402
from tests.services import HttpReceiver  # noqa: E402


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples the process's resident memory every 50 ms."""

    def __init__(self) -> None:
        self.base = self.peak = rss_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.05):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return (self.peak - self.base) / 2**20


class Alerts:
    """A steady stream of state changes: a new GPU alert fires each time, and each alert
    resolves `hold` changes later (so the firing set stays bounded)."""

    def __init__(self, hold: int = 200) -> None:
        self.n = 0
        self.hold = hold
        self.firing: dict[int, Alert] = {}

    def next(self) -> list[dict]:
        now = datetime.now(timezone.utc)
        i, self.n = self.n, self.n + 1
        node = f"r{i % 16:02d}-n{i % 97}"
        a = Alert(labels={"alertname": "GpuOverTemperature", "severity": "critical", "site": "site-a",
                          "rack": node[:3], "node": node, "gpu": str(i % 8), "seq": str(i)},
                  annotations={"summary": f"GPU {i % 8} on {node} at 91 C", "description": "bench alert",
                               "runbook_url": "runbooks/GpuOverTemperature.md"},
                  starts_at=now, detector="bench", score=9.0, evidence={"temp_c": 91.0})
        self.firing[i] = a
        out = [a.to_json()]
        old = self.firing.pop(i - self.hold, None)
        if old is not None:
            old.ends_at = now
            out.append(old.to_json())
        return out


def outbox_ids(directory: Path) -> list[str]:
    return [json.loads(line)["id"] for segment in sorted(directory.glob("*.jsonl"))
            for line in segment.read_text().splitlines()]


async def run(args: argparse.Namespace, data: Path) -> None:
    receiver = HttpReceiver()
    if args.mode == "503":
        receiver.status = 503
        receiver.start()
    cfg = load_config(env={}, overrides={"data_dir": str(data), "alerts": {
        "webhooks": [receiver.url], "group_by": ["alertname", "site", "rack", "node", "gpu", "seq"],
        "group_wait_s": 0, "group_interval_s": 0, "retry_initial_s": 0.5, "retry_max_s": args.retry_max_s,
        "max_age_s": args.max_age_s}})
    notifier = Notifier(cfg)
    await notifier.start()
    source, rss = Alerts(), PeakRss()
    period = 1.0 / args.rate

    async def produce(until) -> None:
        next_t = time.monotonic()
        while not until():
            await notifier.handle(source.next())
            next_t += period
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    t0 = time.monotonic()
    print(f"receiver down ({args.mode}) for {args.outage_s:g} s; {args.rate:g} new alerts/s ...", flush=True)
    await produce(lambda: time.monotonic() - t0 >= args.outage_s)
    backlog = outbox_ids(data / "outbox" / "webhook-1")
    print(f"outage over: {notifier.stats.pending} notifications wait in the outbox "
          f"({sum(f.stat().st_size for f in (data / 'outbox').rglob('*.jsonl')) / 2**20:.1f} MB on disk)", flush=True)
    if args.mode == "503":
        receiver.status = 200
    else:
        receiver.start()
    t_up = time.monotonic()
    await produce(lambda: notifier.stats.pending == 0)  # alerts keep coming while the backlog drains
    drain_s = time.monotonic() - t_up
    await notifier.close()
    receiver.stop()
    growth = rss.stop()
    s = notifier.stats
    kept = receiver.unique()
    dead = {json.loads(line)["id"] for line in _dead_letters(data)}
    queued = set(backlog)
    # Every notification queued during the outage arrived (or was dead-lettered), in queue order.
    in_order = [k for k in kept if k in queued] == [b for b in backlog if b not in dead] and queued <= set(kept) | dead
    print(f"alerts raised:                 {source.n} ({s.alerts} state changes with the resolutions, "
          f"{s.alerts / (time.monotonic() - t0):.0f}/s)")
    print(f"notifications enqueued:        {s.notifications}")
    print(f"delivered:                     {s.delivered} ({len(kept)} distinct at the receiver)")
    print(f"duplicates received:           {receiver.duplicates} (by Idempotency-Key)")
    print(f"dead-lettered:                 {s.dead_lettered}")
    print(f"pending at the end:            {s.pending}")
    print(f"backlog in order:              {in_order} ({len(backlog)} notifications queued during the outage)")
    print(f"peak RSS growth:               {growth:.1f} MB")
    print(f"time to drain after the outage: {drain_s:.1f} s")


def _dead_letters(data: Path) -> list[str]:
    path = data / "deadletter" / "alerts-webhook-1.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--outage-s", type=float, default=600.0, help="how long the receiver is down (default 600)")
    p.add_argument("--rate", type=float, default=20.0,
                   help="new alerts per second, each one batch (default 20); each resolves later, so about twice "
                        "as many state changes")
    p.add_argument("--mode", choices=("refused", "503"), default="refused", help="how the receiver is down")
    p.add_argument("--retry-max-s", type=float, default=10.0, help="alerts.retry_max_s (default 10)")
    p.add_argument("--max-age-s", type=float, default=3600.0, help="alerts.max_age_s (default 3600)")
    p.add_argument("--data-dir", help="where the outbox goes (default: a temporary directory)")
    args = p.parse_args()
    if args.data_dir:
        asyncio.run(run(args, Path(args.data_dir)))
    else:
        with tempfile.TemporaryDirectory(prefix="alert-outage-") as d:
            asyncio.run(run(args, Path(d)))


if __name__ == "__main__":
    main()
