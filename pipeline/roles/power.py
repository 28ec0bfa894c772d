"""The power role: demand response for one site (`fleet.site`).

It follows the site's GPU and facility data (consumer group `power`) into the site's
controller (power/controller.py) and steps it every `power.control_interval_s` of the
data's time. Beside them it listens to the alerts (`bus.listen`, outside its group, so the
alerts topic, which it writes too, does not hold its end): a GPU or node a fault alert names
is not capped while the alert fires (Controller.observe_alerts). Over Kafka it first reads the
last ALERTS_LOOKBACK_S of them (what the topic keeps: 30 days), so a restarted role knows the
alerts still firing (one that fired longer ago is known when it fires again); a listener that
fails is logged and tried again, the role goes on. Requests come in three ways (four with MQTT), each ending in the request
store (`<data_dir>/power/`, power/store.py) with the role's verdict:

  the command line   `fleetwatch power request` writes the store; the role re-reads it
  HTTP               `POST /power/requests` on the process's --http (a route this role adds)
  the grid signal    power_request rows on fleetwatch.power.requests (a utility's or BMS
                     gateway's); a row that is not a valid request is dead-lettered with
                     the reason, counted, and logged once
  MQTT               with mqtt.broker set, <topic_root>/<site>/power/requests, answered on
                     .../<id>/status (power/mqtt_intake.py)

A request is judged when it arrives, against the fleet's live state (what the covered
GPUs can shed within their classes: `Controller.flexible_kw`), and accepted or rejected
saying why. Caps go out as `power_cap` rows on fleetwatch.power.caps (power/actuator.py
BusActuator: each agent applies its node's, renewed within their lease); with
`power.dry_run` nothing is sent (DryRunActuator: the plan is logged and reported).
`PowerTargetMissed` fires on the alerts topic when a request's target is not reached by
its ramp deadline or a minute of its hold falls short, and resolves at the request's
end. Each request, when over, is one `power_request_report` row (power/report.py) on
fleetwatch.power.reports (archived as `power_requests`; `fleetwatch power report`), also one
cancelled before its start and one found over when the role starts (it ended while the role
was down: nothing measured, nulls). The role writes the store off its event loop (one
worker thread, in order: `flush`), and prunes the requests over from it and from its memory
a week after (power/store.py RETENTION_S); the controller forgets one once it is reported.

One power process per site: it is the site's only controller (Kafka: replicas 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.bus import EndOfStream, Message, Topic
from pipeline.bus.base import ALERTS_KEPT_H
from pipeline.bus.intake import Rejection, dead_letters_for
from pipeline.config import Config, ConfigError
from pipeline.detect.catalog import raised
from pipeline.model import alerts_to_batch, iso_utc, python_rows
from pipeline.power.controller import ALERTS_READ, Controller, Firm, Outcome
from pipeline.power.curve import from_recording
from pipeline.power.node_labels import job_poller_for, poller_for
from pipeline.power.report import Tracked, report_batch, report_row, status_doc, summary
from pipeline.power.request import PowerRequest, Rejected, in_range, sender_id, validate
from pipeline.power.store import NOT_STARTED, OPEN, Change, Entry, RequestStore, request_store, when

log = logging.getLogger("fleetwatch")

STATUS_EVERY_S = 1.0    # the status file is replaced at most this often (wall clock), and on each verdict
MISSED = "PowerTargetMissed"
BAD_REQUEST = "bad_request"  # the dead-letter reason of a grid-signal row that is not a valid request
KEEP_REFUSED = 10000  # grid-signal rows refused remembered (id -> hash), so a redelivery is not dead-lettered twice
PRUNE_EVERY = timedelta(hours=1)  # of the data's time: the store is pruned at the role's first step, then this often
ENDED_DOWN = "it ended while the power role was down: nothing was verified"
NEVER_TAKEN = ("it ended before the power role took it (the role was down, or had no data of the fleet): nothing "
               "was done")
CANCELLED_DOWN = "cancelled while the power role was down: nothing was verified"
_ALERTS_READ = pa.array(sorted(ALERTS_READ))  # the alertnames the controller takes (observe_alerts)
# The alerts read again when the role starts (over Kafka): all the topic keeps (the few of a month).
ALERTS_LOOKBACK_S = ALERTS_KEPT_H * 3600.0
# The facility data may trail the GPU data by this much (a BMS scraped every 15-30 s) and still
# set the role's clock alone; further behind (a feed stopped), the GPU data's time less this sets
# it, so the steps go on and the caps are renewed within their lease (at most a third of it).
FACILITY_SLACK_S = 30.0
# A hold is judged by the minute: a minute with no reading of the covered load is not verified.
HOLD_SILENT_S = 60.0


class DryRunActuator:
    """`power.dry_run`: the caps planned, logged and kept (`planned`, UUID -> W), none applied."""

    applies = False  # (the load was never capped: a later request's baseline keeps the readings of its plans)

    def __init__(self) -> None:
        self.planned: dict[str, float] = {}
        self.changes = 0

    def apply(self, caps: dict[str, float | None]) -> None:
        self.changes += len(caps)
        for uuid, w in caps.items():
            if w is None:
                self.planned.pop(uuid, None)
            else:
                self.planned[uuid] = w
        log.debug("power (dry run): %d caps planned, %d GPUs under a planned cap", len(caps), len(self.planned))


class PowerRole:
    """The role's logic, apart from the bus (tests drive it with batches and a clock)."""

    def __init__(self, cfg: Config, store: RequestStore, actuator, publish: Callable[[Topic, pa.RecordBatch],
                 Awaitable[None]], dry_run: bool | None = None, wall: Callable[[], float] = time.monotonic,
                 utc_now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self.cfg, self.store, self.actuator, self.publish = cfg, store, actuator, publish
        self.site = cfg.fleet.site
        self.dry_run = cfg.power.dry_run if dry_run is None else dry_run
        self.ctl = Controller(self.site, from_recording(), actuator, cfg.power, cfg.detect.site_power_cap_w)
        slurm_env = cfg.remediate.command_env  # (what of the daemon's environment sinfo and squeue get)
        self.labels = poller_for(cfg.power, self.ctl.classes, slurm_env)  # nodes' labels for the classes (Slurm)
        self.jobs = job_poller_for(cfg.power, self.ctl.set_jobs, slurm_env)  # the jobs on the nodes: firm capacity
        self.tracked: dict[str, Tracked] = {}
        self.now: datetime | None = None       # the data's time: the facility data's, else the GPU data's (observe)
        self._facility_at: datetime | None = None  # the newest facility batch's time
        self._gpu_at: datetime | None = None       # the newest GPU batch's time
        self.next_step: datetime | None = None
        self.last_step: datetime | None = None
        self.wall = wall
        self.utc_now = utc_now  # the wall clock: is the data's time far behind it (lagging)?
        self.lagging = False
        self._status_at = -math.inf
        self._dirty = True
        self.signals_rejected = 0
        self.signals_seen: set[str] = set()  # grid-signal ids stored (a redelivery is not news)
        self.signals_refused: dict[str, str] = {}  # grid-signal id -> the hash of its row refused (bounded)
        self.last_signal_rejection = ""
        self.latest = ""  # the last request accepted: the one restores after it are sent for
        self._waiting: dict[str, str] = {}  # request id -> why it is not judged yet (written to the store once)
        # The role's writes: a store of its own, used only by one worker thread (in order, off the
        # event loop; the file's lock keeps it and `store`, the readers' and the MQTT intake's, apart).
        self._disk = RequestStore(store.folder)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="power-store")
        self._changes: dict[str, Change] = {}          # request id -> its state to write, merged
        self._retry: list[Change] = []                 # (the worker's) what the file could not take yet
        self._unwritten = False                        # the last write failed: the next tick tries again
        self._unsent: list[tuple[dict[str, Any], Change]] = []  # report rows, and their mark once sent
        self._inflight: list[Future] = []
        self._pruned_at: datetime | None = None

    # ---- data in ------------------------------------------------------------------

    def observe(self, message: Message | list[Message]) -> None:
        """A message's rows into the controller, and the role's clock on. A list: consecutive
        messages of one topic and schema (`power_role` joins a scrape's per-node messages: the
        controller's cost is per batch), observed as one batch; the clock moves as it would
        message by message (to the latest of their medians)."""
        messages = message if isinstance(message, list) else [message]
        parts = [m.value for m in messages if m.value.num_rows]
        if not parts:
            return
        topic = messages[0].topic
        batch = parts[0] if len(parts) == 1 else pa.concat_batches(parts)
        # Each row's message (in a list), for the medians of each.
        of = np.repeat(np.arange(len(parts)), [p.num_rows for p in parts]) if len(parts) > 1 else None
        keep = pc.equal(batch.column("site"), self.site)
        if topic == Topic.FACILITY:  # the controller reads the meter's and the PDUs' power only
            keep = pc.and_(keep, pc.equal(batch.column("metric"), "power_w"))
        if topic == Topic.ALERTS:  # (a fleetwatch alert has no site: null, not kept)
            keep = pc.and_(pc.fill_null(keep, False), pc.is_in(batch.column("alertname"), _ALERTS_READ))
        if not pc.all(keep).as_py():
            if of is not None:
                of = of[pc.fill_null(keep, False).to_numpy(zero_copy_only=False)]
            batch = batch.filter(keep)
            if batch.num_rows == 0:
                return
        if topic == Topic.ALERTS:
            self.ctl.observe_alerts(_alert_changes(batch))
            return
        if topic == Topic.POWER_ACTIONS:
            self.ctl.observe_actions(batch)
            return
        # Microseconds, as Python's datetime holds them (the controller's clock): a reading's
        # nanoseconds (the live simulator's, an agent's) are truncated.
        i = batch.schema.get_field_index("ts")
        batch = batch.set_column(i, "ts", batch.column(i).cast(pa.timestamp("us", tz="UTC"), safe=False))
        if topic == Topic.GPU:
            self.ctl.observe_gpus(batch)
        elif topic == Topic.FACILITY:
            self.ctl.observe_facility(batch)
        else:
            return
        # A batch's median reading time, so one device or agent whose clock runs ahead (the intake
        # lets a reading through up to intake.max_ahead_s early) does not end a request or skip its
        # control steps. Of a list, each message's (as np.median takes it), and the latest of them.
        us = batch.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False)
        if of is None:
            mid = int(np.median(us))
        else:
            ts, n = us[np.lexsort((us, of))], np.bincount(of)
            n = n[n > 0]
            first = np.cumsum(n) - n
            mid = int(((ts[first + (n - 1) // 2].astype(np.float64) + ts[first + n // 2]) / 2).max())
        median = datetime.fromtimestamp(0, timezone.utc) + timedelta(microseconds=mid)
        if topic == Topic.FACILITY:
            self._facility_at = max(median, self._facility_at or median)
        else:
            self._gpu_at = max(median, self._gpu_at or median)
        # The role's clock is the meter's and the PDUs' (what a request is judged on: a step runs
        # once the readings of its time are in). Should they stop while the GPUs report, the GPU
        # data's time moves it on (never the wall clock's): with none, no step would run and no cap
        # be renewed, the agents would restore every GPU at their lease, and the request would show
        # active; so the steps go on and see the meter's silence (`_watch_meter`). Not while the GPU
        # data is a backlog (more than a lease behind the wall clock, `_behind`: no cap goes out to
        # renew then), where one topic may be read ahead of the other.
        now = self._facility_at
        if self._gpu_at is not None and (self.cfg.fleet.speed != 1 or (
                self.utc_now() - self._gpu_at).total_seconds() <= self.cfg.power.lease_s):
            gpu = self._gpu_at - timedelta(seconds=min(FACILITY_SLACK_S, self.cfg.power.lease_s / 3))
            now = gpu if now is None else max(now, gpu)
        if now is not None and (self.now is None or now > self.now):
            self.now = now

    def clock(self) -> datetime:
        """The role's now: the data's, or the wall clock's before any data."""
        return self.now or datetime.now(timezone.utc)

    # ---- requests in ----------------------------------------------------------------

    def submit(self, data: dict[str, Any], source: str) -> Entry:
        """A request from MQTT: stored before this returns (the intake's handler runs as paho reads
        the message, and acknowledges it after), then judged now if the fleet is known; the verdict
        is written off the loop. Rejected (raised) for what needs no fleet to refuse (its form, in
        the past, overlapping)."""
        self._ours(data)
        try:
            entry, _ = self.store.add(data, source, self.clock())
        except ConfigError as why:  # the store's file is unreadable: the sender is told, the role goes on
            raise Rejected(f"not stored: {why}") from None
        self._take(entry)
        self._write()
        return entry

    def _ours(self, data: dict[str, Any]) -> None:
        """Another site's request is refused before it is stored (it had been kept for days, and each
        stored request makes the next store dearer: a flood of them stalled the role)."""
        site = data.get("site")
        if site not in (None, "") and str(site) != self.site:
            raise Rejected(f"site {str(site)[:64]!r}: this power role controls site {self.site!r} (fleet.site); send "
                           f"it to that site's")

    async def arrive(self, data: dict[str, Any], source: str) -> Entry:
        """A request from HTTP or the grid signal: `submit`'s, stored off the event loop."""
        self._ours(data)
        try:
            entry, _ = await asyncio.wrap_future(self._pool.submit(self._disk.add, data, source, self.clock()))
        except ConfigError as why:
            raise Rejected(f"not stored: {why}") from None
        t = self.tracked.get(entry.id)
        if t is not None:  # the tick re-read the file the worker wrote, and took it first: taken once
            return t.entry
        self._take(entry)
        return entry

    async def grid_signal(self, message: Message, dead_letters) -> None:
        """power_request rows from the topic; a row that is not a valid request is dead-lettered."""
        bad: list[tuple[dict, str]] = []
        for row in python_rows(message.value):
            rid = sender_id(row)
            if rid and (self.store.known(rid) or rid in self.signals_seen):
                continue  # delivered again (a restart re-reads what was not committed)
            # Only a stored id is "seen": one refused (overlapping, the store unreadable...) may be sent
            # again and is judged again; the same row again (a redelivery) is not dead-lettered twice.
            digest = hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()
            if rid and self.signals_refused.get(rid) == digest:
                continue
            try:
                await self.arrive({k: v for k, v in row.items() if v is not None and k != "source"}, "kafka")
            except Rejected as why:
                bad.append((row, str(why)))
            except Exception as why:  # a row no check foresaw: dead-lettered with what it raised, the role goes on
                log.debug("power: grid-signal request %s could not be taken", rid, exc_info=True)
                bad.append((row, f"not a valid request ({type(why).__name__}: {why})"))
            else:
                if rid:
                    self.signals_seen.add(rid)
                    self.signals_refused.pop(rid, None)
                continue
            if rid:
                self.signals_refused[rid] = digest
                while len(self.signals_refused) > KEEP_REFUSED:  # the oldest go first
                    self.signals_refused.pop(next(iter(self.signals_refused)))
        await self.flush()
        if not bad:
            return
        for row, why in bad:
            if self.signals_rejected == 0:
                log.warning("power: a grid-signal request was rejected (%s: %s); it is dead-lettered to %s. Further "
                            "rejected requests are counted and dead-lettered, not logged", row.get("id"), why,
                            dead_letters.where)
            self.signals_rejected += 1
            self.last_signal_rejection = f"{row.get('id')}: {why}"
        rows = pa.Table.from_pylist([r for r, _ in bad], schema=message.value.schema)
        await dead_letters.write("power", [(message, Rejection(BAD_REQUEST, why, rows.slice(i, 1).to_batches()[0]))
                                           for i, (_, why) in enumerate(bad)])
        self._dirty = True

    async def poll_store(self) -> None:
        """Requests the CLI added or cancelled since the last look, and those still waiting to be
        judged; a request cancelled that this process did not run is reported (on the data's clock)."""
        # (read on the store's thread, after its writes: a hung disk had stopped the event loop)
        await asyncio.wrap_future(self._pool.submit(self.store.refresh))
        for entry in self.store.entries():
            t = self.tracked.get(entry.id)
            if t is None:
                if entry.unreported or (entry.state in OPEN and entry.cancelled):
                    if self.now is not None:
                        self._cancelled_unrun(entry)
                elif entry.state in OPEN:
                    self._take(entry)
                continue
            if entry.cancelled and not t.cancelled and t.state in OPEN:
                self._cancel(t)
        await self._send_reports()

    def _cancelled_unrun(self, entry: Entry) -> None:
        """Cancelled before its start, or while the role was down (it resumed nothing): one report row."""
        now = self.clock()
        self._waiting.pop(entry.id, None)
        t = Tracked(entry, cancelled=True, unseen=entry.state in OPEN)
        self.tracked[entry.id] = t
        try:  # a start of "now" never taken: "now" was when it was sent
            req = entry.parsed(when(entry.submitted) or now)
            in_range(req, now)  # (stored by an older version, its end may be past year 9999: no row holds it)
        except Rejected as why:  # edited by hand: no report row can say what it was
            t.state, t.reason = entry.state, entry.reason
            log.warning("power request %s is cancelled, but it cannot be reported: %s", entry.id, why)
            return
        t.req = req
        self._set(t, "cancelled", entry.reason if entry.state == "cancelled" else CANCELLED_DOWN)
        self._report(t, now)

    def _take(self, entry: Entry) -> None:
        """Judge a request once the fleet is known (GPU data and a meter reading); until then it
        waits. One taken already is not taken again: an HTTP POST takes its request once the worker
        stored it, and a tick between, re-reading the file, may have taken it first (taken twice, the
        controller would run it twice, and a cancel would end only one)."""
        if entry.id in self.tracked or not self.ctl.gpus.uuids or not self.ctl.meter:
            return
        now = self.clock()
        t = Tracked(entry)
        self.tracked[entry.id] = t
        # Judged before this process started (a restart): resumed, not judged again on the meter
        # now, which the caps the agents still hold (up to a lease) keep down ("already under it").
        resumed = entry.state in ("accepted", "active", "restoring")
        try:
            req = entry.parsed(now)
            in_range(req, now)  # before its end is read: one stored by an older version may end past year 9999
            if req.end <= now:  # over before this process took it (the role was down): said, not judged
                t.req, t.unseen = req, True
                self._set(t, "done", NEVER_TAKEN if entry.state == "pending" else ENDED_DOWN)
                self._report(t, req.end)
                return
            if resumed and req.start < now:
                # Accepted before this process started (a restart): it goes on from now to its end. What it
                # held before is not known here (the agents kept their caps a lease at most): not verified,
                # and its report keeps the start it was asked for.
                t.extra["silent"] = ["the power role restarted during the request", req.start, now]
                t.extra["asked_start"] = req.start
                req = dataclasses.replace(req, start=now, duration_s=(req.end - now).total_seconds(),
                                          ramp_s=min(req.ramp_s, (req.end - now).total_seconds()))
            if req.site != self.site:
                raise Rejected(f"site {req.site!r}: this power role controls site {self.site!r} (fleet.site); send it "
                               f"to that site's")
            unknown = sorted(set(req.racks) - set(self.ctl.gpus.racks))
            if unknown:
                raise Rejected(f"racks {', '.join(unknown)}: no GPU of site {self.site} reports from them")
            open_ = [o.req for o in self.tracked.values() if o.req is not None and o.state in OPEN and o is not t]
            baseline = flexible = None
            if not resumed:
                baseline = self.ctl.covered_kw(req) if req.racks else self.ctl.baseline_kw(now)
                silent = self._silence(req, now, self.cfg.power.baseline_s)
                if silent or baseline is None:  # nothing to judge its size by: never taken unjudged
                    silent = silent or self._silence(req, now, -math.inf)
                    if (req.start - now).total_seconds() > self.cfg.power.control_interval_s:
                        del self.tracked[entry.id]  # judged when a reading comes (each tick tries again)
                        self._wait(entry, f"{silent}: it waits and is judged once one comes (rejected if none "
                                          f"by its start)")
                        return
                    raise Rejected(f"{silent}: no baseline to judge it by; check the feed of the site's facility "
                                   f"data (its meter, its PDUs) and send it again once their readings are back")
                flexible = self.ctl.flexible_kw(req.racks)
            validate(req, now, [r for r in open_ if r.end > now], baseline, flexible)
        except (Rejected, ArithmeticError) as why:  # (a value no arithmetic takes: a refusal, not a crash)
            log.warning("power request %s rejected: %s", entry.id, why)
            self._waiting.pop(entry.id, None)
            self._set(t, "rejected", str(why))
            return
        self._waiting.pop(entry.id, None)
        given = (entry.baseline_kw, entry.base_it_kw) if resumed and entry.baseline_kw is not None else None
        t.req, t.outcome, t.state = req, self.ctl.submit(req, given), "accepted"
        self.latest = req.id
        if resumed:
            log.info("power request %s resumed (%s): %s of %s until %s", req.id, entry.state, req.goal(),
                     req.where(), iso_utc(req.end))
            # (the start it was asked for stays stored: a second restart still reports it)
            self._change(Change(entry.id, "accepted", start=iso_utc(t.extra.get("asked_start", req.start))))
            return
        firm, wanted_kw = self.ctl.firm(req.racks), req.reduction_w(baseline) / 1000.0
        at_risk = (f"; at risk: {wanted_kw:.1f} kW is more than the {firm.kw:.1f} kW left if {firm.largest} "
                   f"({firm.largest_gpus} GPUs) ends or pauses" if firm is not None and wanted_kw > firm.kw else "")
        if slow := self.ctl.slow_readings():
            at_risk += f"; at risk: {slow}"
        log.info("power request %s accepted (%s): %s of %s from %s for %.0f s, ramp %.0f s%s%s", req.id, req.source,
                 req.goal(), req.where(), iso_utc(req.start), req.duration_s, req.ramp_s,
                 " (dry run: nothing applied)" if self.dry_run else "", at_risk)
        self._change(Change(entry.id, "accepted", start=iso_utc(req.start)))

    def _wait(self, entry: Entry, why: str) -> None:
        """A request not judged yet, and why: in the store (`fleetwatch power status`, MQTT's answer) once."""
        if self._waiting.get(entry.id) != why:
            self._waiting[entry.id] = why
            log.warning("power request %s waits: %s", entry.id, why)
            self._change(Change(entry.id, "pending", why))
            self._dirty = True

    def _last_reading(self, req: PowerRequest) -> tuple[str, datetime | None]:
        """What judges `req` (the site meter; a rack request's PDUs) and the time of its last reading
        (the racks': the oldest of their PDUs' last; None: none yet)."""
        if not req.racks:
            return "no meter reading", self.ctl.meter[-1][0] if self.ctl.meter else None
        seen = [self.ctl.pdu.get(r) for r in req.racks]
        return (f"no PDU reading of racks {','.join(req.racks)}",
                None if any(x is None for x in seen) else min(x[0] for x in seen))

    def _silence(self, req: PowerRequest, now: datetime, within_s: float) -> str:
        """'' if the covered load has a reading within `within_s` before `now`; else what has been
        silent, and since when."""
        what, last = self._last_reading(req)
        if last is None:
            return f"{what} yet"
        return "" if (now - last).total_seconds() <= within_s else f"{what} since {iso_utc(last)}"

    def _cancel(self, t: Tracked) -> None:
        what = self.ctl.cancel(t.req.id) if t.req is not None else ""
        if t.outcome is None or t.outcome.restore_from is None:  # (one whose hold is over, restoring or restored,
            t.cancelled = True                                     # is judged on it: a cancel ends nothing of it)
        log.info("power request %s cancelled: %s", t.entry.id, {"dropped": "it had not started",
                                                                 "restoring": "its caps are restored in steps"}.get(
            what, "it was over"))
        if what == "dropped":  # nothing ran: its report says so
            self._set(t, "cancelled", NOT_STARTED)
            self._report(t, self.clock())
        self._dirty = True

    # ---- the loop -----------------------------------------------------------------

    async def tick(self) -> None:
        """After each read: new requests, a control step when one is due, the status file, the
        store's changes (and its pruning when due), written off the event loop."""
        for poller in (self.labels, self.jobs):
            if poller is not None:
                poller.poll()
        await self.poll_store()  # (also the requests that wait for the fleet to be known)
        prune = None
        if self.now is not None:
            interval = timedelta(seconds=self.cfg.power.control_interval_s)
            if self.next_step is None:
                self.next_step = self.now
            if self.now >= self.next_step:
                await self.step(self.now)
                self.next_step = max(self.next_step + interval, self.now)
            if self._pruned_at is None or self.now >= self._pruned_at + PRUNE_EVERY:
                prune = self._pruned_at = self.now
        if self._dirty or self.wall() - self._status_at >= STATUS_EVERY_S:
            self.write_status()
        await self.flush(prune)

    async def step(self, now: datetime) -> None:
        ctl = self.ctl
        ctl.step(now)
        dt = (now - self.last_step).total_seconds() if self.last_step is not None else 0.0
        self.last_step = now
        for t in list(self.tracked.values()):
            if t.req is None or t.state not in OPEN:
                continue
            o, req = t.outcome, t.req
            started = o.baseline_kw is not None
            if started and math.isnan(o.baseline_kw):
                await self._finish(t, now, "done", f"no meter reading to take its baseline on "
                                                   f"({self._silence(req, now, -math.inf)})")
                continue
            if ctl.active is req:
                self._account(t, dt)
                self._set(t, "active" if ctl.phase == "active" else "restoring")
                if t.entry.baseline_kw is None and "baseline_kw" not in t.extra:
                    # Its baseline, before its caps: what a restart resumes it on (the meter then is
                    # held down by the caps the agents keep for their lease).
                    t.extra["baseline_kw"] = o.baseline_kw
                    self._change(Change(t.entry.id, t.state, t.reason, baseline_kw=o.baseline_kw,
                                        base_it_kw=o.base_it_kw))
                if ctl.phase == "active":
                    await self._watch_meter(t, now)
                if ctl.phase == "active" and not self.dry_run and not t.cancelled:
                    await self._judge(t, now)
            elif started and o.restore_done is not None and not ctl.caught_up(o, now):
                self._set(t, "restoring")  # (its rise's last readings still to come: a meter delivered late)
            elif started:
                await self._finish(t, now, "cancelled" if t.cancelled else "done")
            elif now >= req.end:
                held = ctl.active is not None and ctl.active is not req
                await self._finish(t, now, "done", f"never started: request {ctl.active.id} held the site's caps "
                                                   "until its end" if held else "never started: no data at its start")
        await self._send_caps(now)

    def _account(self, t: Tracked, dt: float) -> None:
        """The caps' cost over the last step, and uniform capping's for the same watts (the planner's model)."""
        if dt <= 0:
            return
        lost, uniform = self.ctl.work_lost(t.req.racks)
        t.lost_gpu_h += lost * dt / 3600.0
        t.uniform_gpu_h += uniform * dt / 3600.0

    async def _watch_meter(self, t: Tracked, now: datetime) -> None:
        """A hold whose covered load had no reading for HOLD_SILENT_S is not verified (the controller
        goes on with the last reading it has): said in the status, the verdict and PowerTargetMissed.
        `silent` keeps the last such gap: [what, its last reading before (None: none), the first
        after (None while it lasts)]."""
        what, last = self._last_reading(t.req)
        quiet = last is None or (now - last).total_seconds() > HOLD_SILENT_S
        gap = t.extra.get("silent")
        if quiet and (gap is None or gap[2] is not None):
            t.extra["silent"] = [what, last, None]
            self._dirty = True
            log.warning("power request %s: %s", t.req.id, _gap(t.extra["silent"]))
            if t.alert is None and not self.dry_run and not t.cancelled:
                await self._raise_missed(t, now, _gap(t.extra["silent"]))
        elif not quiet and gap is not None and gap[2] is None:
            gap[2] = last  # readings again; the verdict still says the hold was not verified meanwhile
            self._dirty = True

    async def _raise_missed(self, t: Tracked, now: datetime, missed: str) -> None:
        t.alert = raised(MISSED, {"site": self.site, "rack": "", "request": t.req.id},
                         {"request": t.req.id, "missed": missed}, now, self.cfg.alerts.runbook_base_url)
        await self.publish(Topic.ALERTS, alerts_to_batch([(now, t.alert)]))

    async def _judge(self, t: Tracked, now: datetime, final: bool = False) -> None:
        """PowerTargetMissed: not reached by the ramp deadline, or a whole minute of the hold short
        (`final`: the request is over, every minute counts)."""
        if t.alert is not None or "missed" in t.extra:
            return
        o, req = t.outcome, t.req
        since = (now - req.start).total_seconds()
        missed = ""
        if o.ramp_judged(since) and not o.in_time:
            got = o.shed_kw[-1][1] if o.shed_kw else None
            missed = (f"did not reach {o.requested_kw:.1f} kW of reduction within its {req.ramp_s:g} s ramp"
                      + (f" (reached at {o.reached_s:.0f} s)" if o.reached_s is not None else
                         f" ({got:.1f} kW now)" if got is not None else ""))
        else:
            means, hold = o.minute_means(), o.hold()
            if not final and hold:  # only the minutes that are over
                means = means[:int((hold[-1][0] - hold[0][0]) // 60)]
            short = [(i, m) for i, m in enumerate(means) if m < 0.98 * o.requested_kw]
            if short:
                i, m = short[0]
                missed = (f"held {m:.1f} kW of its {o.requested_kw:.1f} kW reduction in minute {i + 1} of the hold")
        if missed:
            log.warning("power request %s: %s", req.id, missed)
            t.extra["missed"] = missed
            await self._raise_missed(t, now, missed)

    async def _finish(self, t: Tracked, now: datetime, state: str, why: str = "") -> None:
        o = t.outcome
        if not why and not self.dry_run and not t.cancelled and o.requested_kw:
            await self._judge(t, now, final=True)  # a last minute short: raised, and resolved with the request
        if t.alert is not None:
            resolved = dataclasses.replace(t.alert, ends_at=max(now, t.alert.starts_at))
            await self.publish(Topic.ALERTS, alerts_to_batch([(resolved.ends_at, resolved)]))
            t.alert = None
        if t.cancelled:  # ended early on purpose: not met, whatever it held until then
            held = o.achieved_kw[-1][0] if o.achieved_kw else 0.0
            why = why or f"cancelled after {held:.0f} s of its {t.req.duration_s:g} s"
        elif not why and not o.met:
            why = "dry run: no cap applied" if self.dry_run else t.extra.get("missed") or _shortfall(o)
        if "silent" in t.extra:  # not met, whatever the readings before said
            why = "; ".join(x for x in (why, _gap(t.extra["silent"])) if x)
        self._set(t, state, why)
        self._report(t, now)
        await self._send_reports()

    def _set(self, t: Tracked, state: str, reason: str = "") -> None:
        if (t.state, t.reason) != (state, reason):
            t.state, t.reason = state, reason
            self._change(Change(t.entry.id, state, reason))
            self._dirty = True

    def _report(self, t: Tracked, over: datetime) -> None:
        """Its report row (`ts`: when it was over), sent at the next `_send_reports`. What it measured
        stays for the status as numbers; the controller forgets it."""
        if t.reported:
            return
        t.reported = True
        row = report_row(t, over, self.dry_run)
        self._unsent.append((row, Change(t.entry.id, t.state, t.reason, reported=iso_utc(self.clock()))))
        t.final, t.outcome = self.live(t), None
        if t.req is not None:
            self.ctl.forget(t.req.id)
        log.info("power request %s %s: %s", t.entry.id, t.state, summary(row))

    async def _send_reports(self) -> None:
        """The report rows made, then their mark in the store (a crash between: sent again, not lost)."""
        if not self._unsent:
            return
        n = len(self._unsent)
        await self.publish(Topic.POWER_REPORTS, report_batch([row for row, _ in self._unsent[:n]]))
        sent, self._unsent = self._unsent[:n], self._unsent[n:]
        for _, mark in sent:
            self._change(mark)

    # ---- the store, off the event loop -------------------------------------------------

    def _change(self, c: Change) -> None:
        old = self._changes.get(c.id)
        self._changes[c.id] = old.then(c) if old is not None else c

    def _write(self, prune_at: datetime | None = None) -> None:
        """Hand the changes so far to the worker (and the pruning with `prune_at`, the role's now)."""
        if self._changes or prune_at is not None or self._unwritten:
            changes, self._changes = list(self._changes.values()), {}
            self._inflight.append(self._pool.submit(self._apply, changes, prune_at))

    def _apply(self, changes: list[Change], prune_at: datetime | None) -> tuple[bool, list[str]]:
        """In the worker: the changes after those the file could not take before, in order."""
        merged: dict[str, Change] = {}
        for c in [*self._retry, *changes]:
            merged[c.id] = merged[c.id].then(c) if c.id in merged else c
        written, pruned = self._disk.apply(list(merged.values()), prune_at)
        self._retry = [] if written else list(merged.values())
        return written, pruned

    async def flush(self, prune_at: datetime | None = None) -> None:
        """Write what the role changed and wait for every write handed over (the status file's too).
        A change the file could not take is written with the next; a request pruned leaves the
        role's memory."""
        self._write(prune_at)
        inflight, self._inflight = self._inflight, []
        for done in inflight:
            result = await asyncio.wrap_future(done)
            if isinstance(result, bool):  # the status file's (a failure was said by it)
                continue
            written, pruned = result
            self._unwritten = not written
            for i in pruned:
                if i in self.tracked and self.tracked[i].state not in OPEN:
                    del self.tracked[i]
                self.signals_seen.discard(i)
        if inflight:  # the readers' store sees what was written
            await asyncio.wrap_future(self._pool.submit(self.store.refresh))

    async def _send_caps(self, now: datetime) -> None:
        rows = getattr(self.actuator, "rows", None)
        if rows is None:
            return
        active = self.ctl.active
        current = active.id if active is not None else self.latest
        batch = rows(now, self.ctl.gpus, current)
        if batch is not None and self._behind(now):  # restores only: a cap for a time long past is no cap
            batch = batch.filter(pc.is_null(batch.column("cap_w")))
        if batch is not None and batch.num_rows:
            await self.publish(Topic.POWER_CAPS, batch)

    def _behind(self, now: datetime) -> bool:
        """The data is more than a lease behind the wall clock (a restart that reads hours of Kafka
        backlog): the caps it plans are for a fleet as it was, so none is sent until it catches up.
        A simulated fleet at another speed than real time has its own clock (intake's rule)."""
        lag_s = (self.utc_now() - now).total_seconds()
        behind = self.cfg.fleet.speed == 1 and lag_s > self.cfg.power.lease_s
        if behind != self.lagging:
            (log.warning if behind else log.info)(
                "power: the data is %.0f s behind the wall clock: %s", lag_s,
                "no new caps are sent until it catches up (restores are)" if behind else "caught up; caps go out again")
            self.lagging = behind
        return behind

    async def close(self) -> None:
        """The process stops: every cap restored (sent), alerts resolved; the store keeps what is
        not over, and the next start resumes it."""
        now = self.clock()
        for poller in (self.labels, self.jobs):
            if poller is not None:
                await poller.close()
        cut = [t for t in self.tracked.values() if t.state in OPEN and t.outcome is not None
               and t.outcome.restore_from is not None and t.outcome.restore_done is None]
        # (a cap never outlives its controller: lifted at once, as a stop during a hold lifts them; none in a dry run)
        for t in cut if not self.dry_run else ():
            log.warning("power request %s: the power role stops during its staged restore: its %d caps left are "
                        "lifted at once", t.req.id, int(np.count_nonzero(~np.isnan(self.ctl.cap))))
        self.ctl.stop()
        await self._send_caps(now)
        for t in list(self.tracked.values()):  # its hold over (restored or restoring): its verdict is known
            if t.state in OPEN and t.outcome is not None and t.outcome.restore_from is not None:
                await self._finish(t, now, "cancelled" if t.cancelled else "done")
        for t in self.tracked.values():
            if t.alert is not None:
                resolved = dataclasses.replace(t.alert, ends_at=max(now, t.alert.starts_at))
                await self.publish(Topic.ALERTS, alerts_to_batch([(resolved.ends_at, resolved)]))
                t.alert = None
        await self._send_reports()
        self.write_status()
        await self.flush()

    # ---- what the user sees ------------------------------------------------------------

    def live(self, t: Tracked) -> dict[str, Any]:
        if t.final is not None:
            return t.final
        o = t.outcome
        out: dict[str, Any] = {"state": t.state, "reason": t.reason}
        if t.req is not None:
            out["start"] = iso_utc(t.req.start)  # "now" resolved, on the role's clock
        if o is not None and o.baseline_kw is not None and not math.isnan(o.baseline_kw):
            out.update(baseline_kw=_r(o.baseline_kw), requested_kw=_r(o.requested_kw),
                       achieved_kw=_r(o.shed_kw[-1][1]) if o.shed_kw else None,
                       reached_s=_r(o.reached_s), gpus_capped=o.gpus_capped,
                       throughput_lost_gpu_h=_r(t.lost_gpu_h, 3), uniform_lost_gpu_h=_r(t.uniform_gpu_h, 3))
        missed = [x for x in (t.extra.get("missed"), "silent" in t.extra and _gap(t.extra["silent"])) if x]
        if missed:
            out["missed"] = "; ".join(missed)
        return out

    def status(self) -> dict[str, Any]:
        ctl = self.ctl
        firm = ctl.firm()  # (the flexible capacity too: one snapshot of the fleet)
        return {"updated": iso_utc(self.clock()), "site": self.site, "dry_run": self.dry_run,
                "gpus": len(ctl.gpus.uuids), "site_kw": _r(ctl.meter[-1][1]) if ctl.meter else None,
                "flexible_kw": _r(firm.flexible_kw) if firm is not None else None, **_firm(firm), "phase": ctl.phase,
                **dict(zip(("gpu_interval_s", "meter_interval_s"), map(_r, ctl.readings_interval_s()))),
                "slow_readings": ctl.slow_readings() or None,
                "grid_signal_rejected": self.signals_rejected, "grid_signal_last_rejection": self.last_signal_rejection,
                **({"node_labels": self.labels.status()} if self.labels is not None else {}),
                **({"jobs": self.jobs.status()} if self.jobs is not None else {}),
                "requests": {i: self.live(t) for i, t in self.tracked.items()}}

    def write_status(self) -> None:
        """The status file, from the role's memory now, written by the worker (`flush` waits for it)."""
        self._inflight.append(self._pool.submit(self._disk.write_status, self.status()))
        self._status_at, self._dirty = self.wall(), False

    def routes(self) -> dict[tuple[str, str], Callable[[bytes], Awaitable[tuple[int, Any]]]]:
        """The HTTP endpoints this role adds to the process's --http (ops/http.py)."""
        async def post(body: bytes) -> tuple[int, Any]:
            try:
                try:
                    data = json.loads(body or b"{}")
                except RecursionError:  # (JSON nested thousands deep: a 400, never a traceback and a 500)
                    raise Rejected("the body is JSON nested too deep: send a power request's object") from None
                if not isinstance(data, dict):
                    raise Rejected("the body must be a JSON object of a power request (schemas/power_request.v1.json)")
                entry = await self.arrive(data, "http")
            except (ValueError, ArithmeticError) as why:  # Rejected, JSON that does not parse, a number too big
                return 400, {"error": str(why)}
            t = self.tracked.get(entry.id)
            state, reason = (t.state, t.reason) if t is not None else (entry.state,
                                                                          self._waiting.get(entry.id, entry.reason))
            self.write_status()
            await self.flush()
            return (400 if state == "rejected" else 202), {"id": entry.id, "state": state, "reason": reason}

        async def get(body: bytes) -> tuple[int, Any]:
            return 200, status_doc(self.store)
        return {("POST", "/power/requests"): post, ("GET", "/power/requests"): get}


def _r(x: float | None, digits: int = 2) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), digits)


def _firm(firm: Firm | None) -> dict[str, Any]:
    """The status's firm capacity: what is left if the job holding the most of it goes."""
    if firm is None:
        return {"firm_kw": None, "largest_job": None}
    return {"firm_kw": _r(firm.kw), "largest_job": None if firm.largest is None else
            {"job": firm.largest, "kw": _r(firm.largest_kw), "gpus": firm.largest_gpus}}


def _gap(gap: list) -> str:
    """A hold's gap in the covered load's readings (PowerRole._watch_meter), in words."""
    what, since, until = gap
    if since is None:
        return f"{what}: the hold is not verified"
    if until is None:
        return f"{what} since {iso_utc(since)}: the hold is not verified"
    return f"{what} from {iso_utc(since)} to {iso_utc(until)}: the hold is not verified in between"


def _shortfall(o: Outcome) -> str:
    if o.reached_s is None:
        return "never reached its target"
    return f"reached at {o.reached_s:.0f} s" + (f"; the worst minute held {min(o.minute_means()):.1f} kW of "
                                               f"{o.requested_kw:.1f} kW" if o.minute_means() else "")


# ---- the role --------------------------------------------------------------------

def preflight(cfg: Config, env=None, warn: bool = True) -> None:
    """Before the role starts: its caps are renewed at its steps, each third of a lease at most; with
    MQTT, the BMS tree's site is the role's."""
    p = cfg.power
    if p.lease_s < 3 * p.control_interval_s:
        raise ConfigError(f"config error: power.lease_s = {p.lease_s:g} is under 3 x power.control_interval_s "
                          f"({p.control_interval_s:g}): the role renews caps at its steps, so the agents would restore "
                          f"them between two; raise power.lease_s to {3 * p.control_interval_s:g} or more")
    m, site = cfg.mqtt, cfg.fleet.site
    if m.broker and m.site and m.site != site:
        # The intake listens under mqtt.site and the collector stamps the meter's rows with it, but the
        # role keeps only fleet.site's rows: every request would be rejected for "no meter reading".
        raise ConfigError(f"config error: mqtt.site = {m.site!r} differs from fleet.site = {site!r}: the power role "
                          f"controls fleet.site, but takes MQTT requests under mqtt.site's tree and the facility "
                          f"collector stamps the meter's readings with mqtt.site, so the role would see no meter "
                          f"reading and reject every request; set mqtt.site to {site!r} (or leave it empty: it "
                          f"defaults to fleet.site), or fleet.site to {m.site!r}")


def build(ctx, spec):
    """The power role of this process: its subscription, its store, its actuator, its routes."""
    cfg = ctx.cfg
    sub = ctx.bus.subscribe(list(spec.inputs), spec.group)
    gate = ctx.gate(sub, spec.group)
    if cfg.power.dry_run:
        actuator = DryRunActuator()
    else:
        from pipeline.power.actuator import BusActuator
        actuator = BusActuator(cfg.fleet.site, cfg.power.lease_s)
    role = PowerRole(cfg, request_store(cfg.data_dir), actuator, ctx.emit)
    ctx.routes.update(role.routes())
    ctx.power = role
    dead_letters = dead_letters_for(sub, cfg)
    log.info("power: site %s, requests in %s%s", role.site, role.store.folder,
             " (dry run: caps are planned and reported, never applied)" if role.dry_run else "")

    def run():
        return power_role(role, sub, gate, dead_letters, cfg.kafka.commit_interval_s,
                          ctx.bus.listen(Topic.ALERTS, [], ALERTS_LOOKBACK_S))
    if cfg.mqtt.broker:  # requests from a BMS gateway under the tree too (power/mqtt_intake.py)
        from pipeline.power.mqtt_intake import intake_for
        intake = intake_for(cfg, role)
        return lambda: intake.alongside(run())
    return run


def _alert_changes(batch: pa.RecordBatch):
    """(fingerprint, firing, labels) of each row whose labels are a JSON object (the alerts'
    consumers dead-letter the others; this side input skips them)."""
    for r in batch.select(["fingerprint", "status", "labels_json"]).to_pylist():
        try:
            labels = json.loads(r["labels_json"] or "")
        except ValueError:
            continue
        if isinstance(labels, dict):
            yield r["fingerprint"], r["status"] == "firing", labels


async def follow_alerts(role: PowerRole, alerts, retry_s: float = 5.0) -> None:
    """The alerts as they come, into the role (a side input: see the module doc). A failure is
    logged once until the listener reads again, and tried again `retry_s` later."""
    failing = ""
    while True:
        try:
            messages = await alerts.get_batch(max_messages=4096, timeout_s=0.5)
        except EndOfStream:
            return
        except Exception as e:  # (a broker away: the role's own inputs say so too)
            if f"{type(e).__name__}: {e}" != failing:
                failing = f"{type(e).__name__}: {e}"
                log.warning("power: cannot read the alerts (%s): GPUs that fault alerts name may be capped until "
                            "they are read again; trying again every %g s", failing, retry_s)
            await asyncio.sleep(retry_s)
            continue
        if failing:
            log.info("power: reading the alerts again")
            failing = ""
        for m in messages:
            role.observe(m)


async def power_role(role: PowerRole, sub, gate, dead_letters, commit_interval_s: float, alerts=None) -> None:
    """Read, observe, step, until the inputs end; then restore every cap.

    A read's GPU and facility messages (one per node or rack on Kafka: 12,500 per scrape of a
    100k-GPU site) are observed a group at a time, as one batch: the controller's cost is per
    batch. A group is consecutive messages of one topic and schema that the controller takes as
    it would one by one (`groups`); a grid signal is judged after the messages before it. (One
    difference: a GPU's default limit follows its model's highest limit in its whole group, not
    only in the messages before its own: a model's highest limit rising shows a scrape sooner.)"""
    next_commit = time.monotonic() + commit_interval_s
    side = asyncio.create_task(follow_alerts(role, alerts), name="power-alerts") if alerts is not None else None
    ctl = role.ctl

    def settled() -> bool:
        """The controller's meter-vs-PDU history holds the meter's last reading (`observe_facility`
        adds a point after a batch where it does not): PDU-only batches add none now."""
        return bool(ctl.pdu) and (not ctl.meter or (bool(ctl.it) and ctl.it[-1][0] == ctl.meter[-1][0]))

    def groups(run: list[Message]):
        """`run` (one topic, one schema) in the groups observed as one batch each, in order. GPU: no
        GPU twice in a group (two scrapes of one GPU stay two updates, in order). Facility: a group
        ends at a message holding a meter's row (each is a point of the meter-vs-PDU history), and
        until `settled`, one message each. Lazy: each group is cut after the one before is observed."""
        topic, i = run[0].topic, 0
        if topic == Topic.FACILITY:
            while i < len(run) and not settled():
                yield run[i:i + 1]
                i += 1
            run = run[i:]
        if len(run) < 2 or topic not in (Topic.GPU, Topic.FACILITY):
            yield from ([m] for m in run)
            return
        of = np.repeat(np.arange(len(run)), [m.value.num_rows for m in run])  # each row's message
        if topic == Topic.GPU:
            codes = pc.dictionary_encode(pa.concat_arrays([m.value.column("gpu_uuid") for m in run]),
                                         null_encoding="encode").indices.to_numpy()
            order = np.argsort(codes, kind="stable")
            again = codes[order[1:]] == codes[order[:-1]]  # a row whose GPU has a row before it
            prev = np.full(len(run), -1)  # per message: the latest message before it in the run with one of its GPUs
            np.maximum.at(prev, of[order[1:][again]], of[order[:-1][again]])
            cuts, start = [], 0
            for j in np.flatnonzero(prev >= 0).tolist():
                if prev[j] >= start:
                    cuts.append(j)
                    start = j
        else:
            meter = pc.fill_null(pc.equal(pa.concat_arrays([m.value.column("device_class") for m in run]), "meter"),
                                 False).to_numpy(zero_copy_only=False)
            cuts = (np.flatnonzero(np.bincount(of, weights=meter, minlength=len(run)) > 0) + 1).tolist()
        for a, b in zip([0, *cuts], [*cuts, len(run)]):
            if a < b:
                yield run[a:b]

    def observe(run: list[Message]) -> None:
        for group in groups(run) if run else ():
            role.observe(group)
        run.clear()

    try:
        while True:
            try:
                messages = await sub.get_batch(max_messages=4096, timeout_s=0.5)
            except EndOfStream:
                break
            run: list[Message] = []  # consecutive messages of one topic and schema
            for m in await gate.screen(messages):
                if m.topic == Topic.POWER_REQUESTS:
                    observe(run)
                    await role.grid_signal(m, dead_letters)
                    continue
                if run and (m.topic != run[0].topic or not m.value.schema.equals(run[0].value.schema)):
                    observe(run)
                run.append(m)
            observe(run)
            await role.tick()
            if time.monotonic() >= next_commit:
                await sub.commit()
                next_commit = time.monotonic() + commit_interval_s
    finally:
        if side is not None:
            side.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await side
            await alerts.close()
        await asyncio.shield(role.close())
    await sub.commit()
