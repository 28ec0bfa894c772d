"""A source's side of power caps: follow the power role's commands, apply them, hold them
on a lease, report what happened.

The power role (roles/power.py) sends `power_cap` rows on fleetwatch.power.caps, keyed by
rack (power/actuator.py: BusActuator), and sends every held cap again each third of its
lease. A source that owns GPUs follows them with `follow_caps`:

  - the latest row of each of its GPUs is applied through its `CapApplier` (the NVML
    agent's: sources/nvml_power.py on its NVML thread; the simulator's), unless the GPU
    already holds that cap: then the row only renews the lease;
  - a GPU whose cap was not renewed within its lease is restored to its own limit
    (cause `lease`): a planner that died or lost the bus leaves no cap behind; a restore
    that failed is tried again the same way every RETRY_S;
  - when the source stops, every cap it holds is restored (cause `stop`);
  - each change is a `power_action` row (fleetwatch.power.actions, archived as
    power_actions): the limit asked, the enforced limit read back, the status
    (sources/nvml_power.py: STATUSES) and what to do when it failed.

The lease runs on the source's clock from when a row arrives (the power role's clock, its
data's time, may lag it: Kafka lag): the simulator's for the simulated fleet (it may run
faster than real time), a monotonic clock for an agent (time.monotonic: an NTP step of the
wall clock neither stretches nor cuts a lease). The power_action rows are stamped with the
source's time (the wall clock for an agent).
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Awaitable, Callable, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.bus.base import EndOfStream, Topic
from pipeline.model import POWER_ACTION
from pipeline.sources.nvml_power import CapResult
from pipeline.waits import wait_set

log = logging.getLogger("fleetwatch")

POLL_S = 1.0  # how long a wait for commands lasts before the leases are checked again
FOLLOW_RETRY_MAX_S = 60.0  # following the commands again after a failure: backing off up to this
RETRY_S = 30.0  # a restore that failed is tried again this long after (through the lease's path)
# The longest lease a row may give a cap: power.lease_s's maximum (config.py), so the role's own
# leases are never cut, while a broken sender's (inf, 1e12 s) still ends. A lease that is not a
# number (null, NaN) cannot end at all: its row is taken as a restore.
MAX_LEASE_S = 3600.0


class CapApplier(Protocol):
    site: str

    def mine(self, caps: pa.RecordBatch) -> np.ndarray:
        """Which rows are for this source's GPUs (bool per row)."""

    async def apply(self, uuids: list[str], cap_w: list[float | None]) -> list[CapResult]:
        """Set each GPU's limit (None: its default); one result per GPU, in order."""

    def where(self, uuid: str) -> tuple[str, str]:
        """(rack, node) of one of its GPUs."""


@dataclass
class CapHolder:
    """The caps a source holds and their leases (UUID -> W, UUID -> until: seconds on the
    lease clock, the one `now` of take() and expired() reads)."""
    held: dict[str, float] = field(default_factory=dict)
    until: dict[str, float] = field(default_factory=dict)
    request: dict[str, str] = field(default_factory=dict)
    actions: int = 0
    failures: int = 0
    bad_leases: int = 0  # rows whose lease_s was not a number of seconds within 0-MAX_LEASE_S
    retrying: set[str] = field(default_factory=set)  # GPUs whose restore failed: tried again every RETRY_S

    def take(self, caps: pa.RecordBatch, now: float) -> tuple[list[str], list[float | None]]:
        """The commands that change a GPU's limit (the last row of each GPU wins); every
        row renews its GPU's lease from `now`, when it arrived: the lease is contact with
        the power role, and the role's clock (its data's time) may lag this one."""
        uuids = caps.column("gpu_uuid").to_pylist()
        watts = caps.column("cap_w").to_pylist()
        lease = caps.column("lease_s").to_pylist()
        requests = caps.column("request_id").to_pylist()
        latest: dict[str, float | None] = {}
        for u, w, s, r in zip(uuids, watts, lease, requests):  # a few rows per GPU per lease, not per sample
            if s is None or math.isnan(s) or not 0 <= s <= MAX_LEASE_S:
                self._bad_lease(u, s)
                w, s = (None, 0.0) if s is None or math.isnan(s) else (w, min(max(s, 0.0), MAX_LEASE_S))
            latest[u] = w
            self.request[u] = r
            if w is None:  # restored now; if that fails, the lease path tries again
                if u in self.held:
                    self.until[u] = now + RETRY_S
            else:
                self.until[u] = now + s
        change = [(u, w) for u, w in latest.items() if self.held.get(u) != w]
        return [u for u, _ in change], [w for _, w in change]

    def _bad_lease(self, uuid: str, lease_s: float | None) -> None:
        if not self.bad_leases:  # said once; counted in bad_leases
            log.warning("power cap row for GPU %s has lease_s %r, not seconds within 0-%g (a broken sender): taken "
                        "as a restore when not a number, else clamped; further bad leases are only counted",
                        uuid, lease_s, MAX_LEASE_S)
        self.bad_leases += 1

    def expired(self, now: float) -> list[str]:
        return [u for u, t in self.until.items() if t <= now and u in self.held]

    def record(self, results: list[CapResult], now: float | None = None) -> None:
        """`now`: on the lease clock, to try a failed restore again RETRY_S later."""
        for r in results:
            u, held = r.gpu_uuid, r.held
            if held is None:  # as the status says: a failure changes nothing
                held = r.status == "ok" or (r.status not in ("restored", "gpu_lost") and u in self.held)
            self.retrying.discard(u)
            if not held:
                self.held.pop(u, None)
                self.until.pop(u, None)
            elif r.status == "ok":
                self.held[u] = r.requested_w
            elif r.requested_w is not None:  # failed, but a limit is (or may be) set: held, so a restore reaches it
                self.held.setdefault(u, r.requested_w)
            elif now is not None:  # a restore that failed: tried again through the lease's path
                self.until[u] = now + RETRY_S
                self.retrying.add(u)
            if r.status not in ("ok", "restored"):
                self.failures += 1
        self.actions += len(results)


def action_rows(applier: CapApplier, holder: CapHolder, results: list[CapResult], cause: str,
                now: datetime) -> pa.RecordBatch:
    where = [applier.where(r.gpu_uuid) for r in results]
    return pa.RecordBatch.from_pydict({
        "ts": pa.array([now] * len(results), POWER_ACTION.field("ts").type),
        "site": [applier.site] * len(results),
        "rack": [w[0] for w in where],
        "node": [w[1] for w in where],
        "gpu_uuid": [r.gpu_uuid or None for r in results],
        "gpu": pa.array([r.gpu if r.gpu_uuid else None for r in results], pa.int16()),
        "request_id": [holder.request.get(r.gpu_uuid) for r in results],
        "requested_w": pa.array([r.requested_w for r in results], pa.float64()),
        "enforced_w": pa.array([r.enforced_w for r in results], pa.float64()),
        "status": [r.status for r in results],
        "cause": [cause] * len(results),
        "detail": [r.detail for r in results],
    }, schema=POWER_ACTION)


async def follow_caps(sub, applier: CapApplier, emit: Callable[[Topic, pa.RecordBatch], Awaitable[None]],
                      stop: asyncio.Event, clock: Callable[[], datetime], holder: CapHolder | None = None,
                      lease_clock: Callable[[], float] | None = None) -> CapHolder:
    """Until `stop`: apply the commands of `sub` (a subscription to fleetwatch.power.caps)
    that are `applier`'s, restore caps whose lease ran out; at the end, restore every cap held.
    `clock` stamps the power_action rows; leases run on `lease_clock` (seconds: an agent's
    time.monotonic), by default on `clock` (the simulator's time)."""
    holder = holder or CapHolder()
    if lease_clock is None:
        def lease_clock() -> float:
            return clock().timestamp()

    async def act(uuids: list[str], watts: list[float | None], cause: str) -> None:
        if not uuids:
            return
        results = await applier.apply(uuids, watts)
        holder.record(results, lease_clock())
        await emit(Topic.POWER_ACTIONS, action_rows(applier, holder, results, cause, clock()))

    ended = False
    try:
        while not stop.is_set():
            if not ended:
                try:
                    messages = await sub.get_batch(timeout_s=POLL_S)
                except EndOfStream:
                    ended, messages = True, []
            else:
                await wait_set(stop, POLL_S)
                messages = []
            for m in messages:
                rows = m.value.filter(pa.array(applier.mine(m.value)))
                if rows.num_rows:
                    await act(*holder.take(rows, lease_clock()), "cap")
            if lapsed := holder.expired(lease_clock()):
                if new := [u for u in lapsed if u not in holder.retrying]:  # (a retry was said when it lapsed)
                    log.warning("power caps of %d GPUs not renewed within their lease (the power role is gone or "
                                "cut off): back to their own limits", len(new))
                await act(lapsed, [None] * len(lapsed), "lease")
    finally:
        await act(list(holder.held), [None] * len(holder.held), "stop")
    return holder


def for_node(caps: pa.RecordBatch, node: str) -> np.ndarray:
    return pc.equal(caps.column("node"), node).to_numpy(zero_copy_only=False)


class SimulatedCaps:
    """The simulator's CapApplier: the commands for its GPUs, set as NVML would (a cap
    outside a GPU's limits is refused and changes nothing)."""

    def __init__(self, sim) -> None:
        self.sim, self.site = sim, sim.cfg.site
        self.index = {u: i for i, u in enumerate(sim.gpu_uuids)}

    def mine(self, caps: pa.RecordBatch) -> np.ndarray:
        return pc.is_in(caps.column("gpu_uuid"), pa.array(list(self.index))).to_numpy(zero_copy_only=False)

    async def apply(self, uuids: list[str], cap_w: list[float | None]) -> list[CapResult]:
        refused: dict[str, str] = {}
        for uuid, w in zip(uuids, cap_w):  # one at a time: a refused cap leaves the others set
            try:
                self.sim.set_caps(np.array([self.index[uuid]]), np.array([np.nan if w is None else w]))
            except ValueError as e:
                refused[uuid] = f"{e}; nothing changed"
        limits = self.sim.caps  # each GPU's limit now, read once
        out = []
        for uuid, w in zip(uuids, cap_w):
            g = self.index[uuid]
            status, detail = (("out_of_range", refused[uuid]) if uuid in refused else
                              ("restored", "back to its default limit") if w is None else ("ok", f"held to {w:g} W"))
            out.append(CapResult(int(self.sim.gpu_index[g]), uuid, w, float(limits[g]), status, detail))
        return out

    def where(self, uuid: str) -> tuple[str, str]:
        g = self.index[uuid]
        return self.sim.rack_names[self.sim.gpu_rack[g]], self.sim.node_names[self.sim.gpu_node[g]]


async def alongside(run: Callable[[asyncio.Event], Awaitable[None]], follow: Callable[[asyncio.Event], Awaitable],
                    stop: asyncio.Event) -> None:
    """`run(source_stop)`, a source's loop, with `follow(stop)` (follow_caps) beside it:
    the source stops once the follower has restored its caps, so the restores go out
    through it (an agent's NVML thread) and their actions are published before it ends."""
    source_stop = asyncio.Event()

    async def caps() -> None:
        failures = 0
        try:
            while not stop.is_set():
                try:
                    await follow(stop)
                    return
                except Exception as e:  # the bus is away: the source's data goes on, caps are followed again
                    failures += 1
                    wait_s = min(FOLLOW_RETRY_MAX_S, 2.0 ** failures)
                    (log.exception if failures == 1 else log.warning)(
                        "following power caps failed (%s: %s); the caps held were restored, trying again in %.0f s",
                        type(e).__name__, e, wait_s)
                    await wait_set(stop, wait_s)
        finally:
            source_stop.set()
    follower = asyncio.create_task(caps(), name="power-caps")
    try:
        await run(source_stop)
    finally:  # the source ended: normally once the follower is done; if it failed, the follower goes too
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
