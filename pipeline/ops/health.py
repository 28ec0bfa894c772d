"""Is this process alive, is it ready, and is any of its roles stalled: judged on an
injected clock from the roles' heartbeats and counters (ops/progress.py) and what the
monitor sampled (Kafka and MQTT reachability, consumer backlogs).

Live (`/healthz`, systemd's WATCHDOG=1): the event loop turned within LOOP_LIVE_S, no
role's task ended, and no source's loop stopped: it published nothing for its stall window
while it was not waiting for the bus to take a batch (backpressure) and what it publishes
to and reads from is reachable. A source paced by others (`paced`: the MQTT facility
collector, which publishes when the BMS sends; the DCGM source, whose exporters may all be
down) is never dead for being quiet: its quiet is a stall (alerted), as a restart would not
make a quiet BMS send, and only after PACED_WINDOW_S at least (a BMS that reports every minute
would flap the alert at each reading). A consumer that cannot go on (a full disk under notify, a
slow detect) is stalled, not dead: restarting it would not help, and would lose what an
in-process daemon holds.

Ready (`/readyz`, READY=1): live, warmed up (the roles are built: detect's Numba kernels
compiled), each role had its first successful publish or read (in-process consumers read
nothing that could fail), Kafka and the MQTT broker reachable, and not stopping.

Stalled (FleetwatchStalled, ops/selfalerts.py): a source's loop stopped (above), a
consumer's input waits unread for its window, a Kafka consumer's lag grew at each of the last
`stall_intervals` checks, or the archive holds rows and has not made them durable for
`stall_intervals` flush intervals (unless FleetwatchArchiveFailing already says why).

A role's window is `stall_intervals` of its interval: a source's own scrape interval in
wall seconds, at least TICK_S; a consumer's TICK_S.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.ops.progress import Progress

TICK_S = 1.0        # the monitor's period: one health check, one backlog sample
PACED_WINDOW_S = 600.0  # the least quiet of a source paced by others that is a stall
LOOP_LIVE_S = 10.0  # the event loop must have turned within this

# what stalled (the `stalled` label of FleetwatchStalled)
SAMPLES, CONSUMER_LAG, ARCHIVE_FLUSH = "samples", "consumer_lag", "archive_flush"


@dataclass
class RoleInfo:
    name: str
    consumer: bool
    interval_s: float          # a source's scrape interval in wall seconds (0: flat out)
    deps: tuple[str, ...] = ()  # what it needs reachable: "kafka", "mqtt"
    task: Any = None            # its asyncio task, once started
    paced: bool = False         # a source paced by others (a BMS, exporters): quiet is a stall, not a hang


class Health:
    def __init__(self, progress: Progress, stall_intervals: int, clock: Callable[[], float],
                 in_process: bool = True) -> None:
        self.progress, self.stall_intervals, self.clock = progress, stall_intervals, clock
        self.in_process = in_process
        self.roles: list[RoleInfo] = []
        self.warmed = False       # the roles are built (detect's kernels compiled)
        self.started: float | None = None  # clock() when the roles started
        self.stopping = False
        self.loop_beat = clock()  # the monitor's last tick: the event loop turns
        self.archive: Any = None  # the archive's ArchiveWriter, where this process archives
        self.flush_interval_s = 10.0
        self._backlogs: dict[str, collections.deque] = {}

    def attach(self, roles: list[RoleInfo]) -> None:
        self.roles, self.warmed, self.started = roles, True, self.clock()
        self._backlogs = {r.name: collections.deque(maxlen=self.stall_intervals + 1) for r in roles if r.consumer}

    # ---- what the monitor feeds in --------------------------------------------------

    def sample_backlogs(self) -> None:
        """One backlog sample per consumer: Kafka lag of its group (sampled into progress.lag),
        or in-process its queue's depth."""
        for r in self.roles:
            if r.consumer:
                self._backlogs[r.name].append(self.backlog(r))

    def backlog(self, role: RoleInfo) -> int | None:
        p = self.progress.roles.get(role.name)
        sub = p.sub if p is not None else None
        if sub is None:
            return None
        if self.in_process:
            queue = getattr(sub, "queue", None)
            return queue.qsize() if queue is not None else None
        lags = [n for (group, _, _), n in self.progress.lag.items() if group == getattr(sub, "group", role.name)]
        return sum(lags) if lags else None

    # ---- verdicts ----------------------------------------------------------------------

    def window(self, role: RoleInfo) -> float:
        window = self.stall_intervals * max(TICK_S, role.interval_s)
        return max(window, PACED_WINDOW_S) if role.paced else window

    def deps_down(self, role: RoleInfo | None = None) -> list[str]:
        names = role.deps if role is not None else tuple(dict.fromkeys(d for r in self.roles for d in r.deps))
        return [d for d in names if not self.progress.deps.get(d, False)]

    def quiet(self, now: float, consumers: bool) -> dict[str, str]:
        """role -> why it made no progress for its window: sources (consumers=False) that
        published nothing while not held up by the bus or an unreachable broker; consumers
        whose input waits unread."""
        out = {}
        for r in self.roles:
            if r.consumer != consumers:
                continue
            p = self.progress.roles.get(r.name)
            last = p.beat if p is not None and p.beat is not None else self.started
            if last is None or now - last <= self.window(r):
                continue
            quiet = now - last
            if not r.consumer:
                if not self.deps_down(r) and (p is None or p.emitting is None):
                    out[r.name] = f"no samples published for {quiet:.0f} s"
            elif (backlog := self.backlog(r)) and backlog > 0:
                out[r.name] = f"{backlog} messages wait unread, nothing read for {quiet:.0f} s"
        return out

    def hung(self, now: float) -> dict[str, str]:
        """role -> why its loop counts as stopped: a quiet source that paces itself (see the module doc)."""
        paced = {r.name for r in self.roles if r.paced}
        return {name: why for name, why in self.quiet(now, consumers=False).items() if name not in paced}

    def unlive(self, now: float) -> list[str]:
        """Why the process is not live (empty: live)."""
        problems = []
        if now - self.loop_beat > LOOP_LIVE_S:
            problems.append(f"the event loop has not turned for {now - self.loop_beat:.0f} s")
        for r in self.roles:
            if r.task is not None and r.task.done():
                problems.append(f"role {r.name} ended")
        problems += [f"role {name}: {why}" for name, why in self.hung(now).items()]
        return problems

    def unready(self, now: float) -> list[str]:
        """Why the process is not ready (empty: ready)."""
        if self.stopping:
            return ["stopping"]
        if not self.warmed:
            return ["starting: building the roles (detect compiles its kernels)"]
        problems = []
        for r in self.roles:
            p = self.progress.roles.get(r.name)
            # (a source others pace, the MQTT collector or the DCGM source, publishes when its BMS or exporters
            # send: waiting for that, a compose stack whose simulator waited for the collector to be ready
            # never started; its broker's reach is deps_down's)
            if (p is None or p.first is None) and not (r.consumer and self.in_process) and not r.paced:
                problems.append(f"role {r.name}: no successful {'read' if r.consumer else 'publish'} yet")
        problems += [f"{'Kafka' if d == 'kafka' else 'the MQTT broker'} is unreachable" for d in self.deps_down()]
        return problems + self.unlive(now)

    def stalls(self, now: float) -> dict[tuple[str, str], str]:
        """(role, what stalled) -> detail, for FleetwatchStalled."""
        out = {(name, SAMPLES): why for name, why in self.quiet(now, consumers=False).items()}
        out.update(((name, CONSUMER_LAG), why) for name, why in self.quiet(now, consumers=True).items())
        if not self.in_process:
            for name, samples in self._backlogs.items():
                if len(samples) == samples.maxlen and None not in samples and \
                        all(a < b for a, b in zip(samples, list(samples)[1:])):
                    out.setdefault((name, CONSUMER_LAG), f"consumer lag grew at each of the last "
                                                         f"{self.stall_intervals} checks, to {samples[-1]} messages")
        w = self.archive
        if w is not None and (w.outage is None or not w.outage.failing) and w.held_rows() > 0:
            since = w.last_durable if w.last_durable is not None else self.started
            if since is not None and now - since > self.stall_intervals * self.flush_interval_s:
                out[("archive", ARCHIVE_FLUSH)] = (f"{w.held_rows()} rows held, nothing made durable for "
                                                   f"{now - since:.0f} s")
        return out
