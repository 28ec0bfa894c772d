"""Power limits through NVML: the NVML agent applies and restores power caps on its GPUs.

`PowerLimiter` (the agent's `power`) works on the agent's GPU handles. Each call blocks for
NVML's latency (a set took 8-23 ms on the recorded H100): run it on the agent's NVML thread,
`await agent.on_nvml_thread(agent.power.apply, gpu, watts)`, never on the event loop; there
it also runs between scrapes, not during one.

A cap is checked against the GPU's constraints before NVML is asked, set, then read back
from the enforced limit: it is `ok` only if the GPU enforces what was asked. A real GPU
enforces a new limit only some 0.1 s after the set, so the readback waits for it (a node's
GPUs set together share the wait: `set_many`). Every outcome is
a `CapResult` that says what happened and, when it failed, what to do; nothing raises for a
GPU that refuses. Its `held` says whether the GPU holds a limit set here even when it failed
(another limit wins, the readback failed): a restore must still reach it.

A cap only ever lowers a GPU's limit. Its own limit, the one it had before its first cap
(the site's `nvidia-smi -pl` policy, or its default), is read then and is what a restore
sets: a cap asked at or above it leaves the GPU at it, and a restore never raises a GPU
past the limit its operator chose (one set while a cap held, too: `_operators_change`). The agent restores every cap it set when it closes. So
that a killed agent's caps do not outlive it either, the own limits of the GPUs it holds
are written to a ledger (`<data_dir>/agent/power-limits.json`) before the first cap; the
next agent on the node restores what the ledger names when it starts (`recover`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pynvml

if TYPE_CHECKING:
    from pipeline.sources.nvml import Gpu, NvmlAgent

log = logging.getLogger(__name__)

TOLERANCE_W = 1.0  # the enforced limit read back is the request within this
# A GPU enforces a new limit 30-120 ms after the set began (seen on a real H100 and H200; the set
# call itself takes 8-23 ms): read back at once it still says the old limit. So the readback
# polls, for at most this long, before it calls the set overridden.
ENFORCE_WAIT_S = 0.5
ENFORCE_POLL_S = 0.01
STATUSES = ("ok", "restored", "not_permitted", "out_of_range", "gpu_lost", "not_supported", "error")


@dataclass(frozen=True)
class CapResult:
    gpu: int
    gpu_uuid: str
    requested_w: float | None  # None: back to its own limit (the default where it never had a cap)
    enforced_w: float | None   # read back after the set; None where it could not be read
    status: str                # one of STATUSES
    detail: str                # what happened; when it failed, what to do
    held: bool | None = None   # whether the GPU holds (or may hold) a limit this source set, whatever the
                               # status: its restore must reach it. None: as the status says (ok: held)


class Limits(NamedTuple):
    min_w: float
    max_w: float
    default_w: float
    enforced_w: float


class PowerLimiter:
    """Power caps on the agent's GPUs (by the agent's GPU index). Blocking: call on the
    agent's NVML thread (NvmlAgent.on_nvml_thread), which also serialises the calls."""

    def __init__(self, agent: NvmlAgent, ledger: Path | None = None) -> None:
        self.agent = agent
        self.ledger = ledger  # the own limits of the GPUs held, for the next agent if this one is killed
        self._own: dict[int, float] = {}     # GPU index -> its limit before its first cap, W: held from that
                                             # cap until a restore, which sets it back
        self._capped: dict[int, float] = {}  # GPU index -> the cap this limiter set below it, W
        self._set_w: dict[int, float] = {}   # GPU index -> the limit it set and read back (an operator's change
                                             # since is told from it: _operators_change)
        self._bounds: dict[int, tuple[float, float, float]] = {}  # constraints and default, W: fixed per GPU
        self._owed: set[int] = set()  # GPUs whose restore was asked while they were lost (set when they are back)
        self._said: dict[int, tuple[str, float | None]] = {}  # each GPU's last answer logged: (status, cap asked)
        self._ledger_failing = False

    @property
    def capped(self) -> dict[int, float]:
        """The GPUs this limiter holds to a cap now: GPU index -> W."""
        return dict(self._capped)

    def limits(self, gpu: int) -> Limits:
        """The GPU's limit constraints, default and enforced limit, W. Raises pynvml.NVMLError
        (NotSupported, GpuIsLost, ...) and KeyError for a GPU index the agent does not have."""
        g = self._gpu(gpu)
        if g is None:
            raise KeyError(f"no GPU {gpu} on node {self.agent.node}")
        low, high, default = self._constraints(g)
        return Limits(low, high, default, pynvml.nvmlDeviceGetEnforcedPowerLimit(g.handle) / 1000.0)

    def apply(self, gpu: int, cap_w: float) -> CapResult:
        """Hold the GPU's power to `cap_w` W (at most its own limit)."""
        return self.set_many([(gpu, float(cap_w))])[0]

    def restore(self, gpu: int) -> CapResult:
        """Put the GPU back to its own limit; one this limiter never capped is left as it is (a
        site's `nvidia-smi -pl 600` is not raised to the default)."""
        return self.set_many([(gpu, None)])[0]

    def restore_all(self) -> list[CapResult]:
        """Restore every GPU this limiter holds (the agent's close() does)."""
        return self.set_many([(i, None) for i in sorted(set(self._own) | set(self._capped))])

    def set_many(self, asks: list[tuple[int, float | None]]) -> list[CapResult]:
        """Caps (W) or restores (None) of several GPUs: each set, then all read back together.
        A GPU enforces a new limit only some 0.1 s after the set (`ENFORCE_WAIT_S`), so a node's
        GPUs share that wait rather than each taking its own. A GPU asked twice is set in order."""
        results: list[CapResult] = []
        group: list[CapResult | _Pending] = []
        for gpu, cap_w in asks:
            if any(isinstance(x, _Pending) and x.g.index == gpu for x in group):
                results += self._confirm(group)
                group = []
            try:
                group.append(self._start(gpu, cap_w))
            except Exception as e:  # not NVML's word (a binding's surprise): the batch's other GPUs still answer
                log.exception("GPU %s: power limit: unexpected failure", gpu)
                g = self._gpu(gpu)
                group.append(CapResult(gpu, g.uuid if g else "", cap_w, None, "error",
                                       f"unexpected {type(e).__name__} setting GPU {gpu}'s power limit: {e}; check "
                                       f"`nvidia-smi -q -d POWER`", g is not None and g.index in self._own))
        return results + self._confirm(group)

    def recover(self) -> list[CapResult]:
        """At start: every GPU the ledger names whose limit is not its own any more (an agent
        that stopped without restoring: a kill, a crash) back to it; the ledger then names
        what this one holds. An unreadable ledger is moved aside, never overwritten."""
        if self.ledger is None or not self.ledger.exists():
            return []
        try:
            own = json.loads(self.ledger.read_text())["own_w"]
            if not isinstance(own, dict):
                raise TypeError(f"own_w is {type(own).__name__}, not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            aside = self.ledger.with_suffix(".unreadable")
            with contextlib.suppress(OSError):
                os.replace(self.ledger, aside)
            log.warning("power limits ledger %s unreadable (%s), moved to %s: GPUs a stopped agent left capped keep "
                        "their caps until restored by hand (`nvidia-smi -q -d POWER`, `nvidia-smi -pl`)",
                        self.ledger, e, aside.name)
            return []
        by_uuid = {g.uuid: g for g in self.agent.gpus}
        back: list[int] = []
        for uuid, watts in own.items():
            g = by_uuid.get(uuid)
            if g is None:
                log.warning("power limits ledger: GPU %s is no longer on node %s: not restored", uuid, self.agent.node)
                continue
            if not isinstance(watts, (int, float)) or not math.isfinite(watts) or watts <= 0:
                log.warning("power limits ledger: GPU %s's own limit %r is not a limit: not restored", uuid, watts)
                continue
            with contextlib.suppress(pynvml.NVMLError):  # unread: restored anyway
                if abs(pynvml.nvmlDeviceGetPowerManagementLimit(g.handle) / 1000.0 - watts) <= TOLERANCE_W:
                    continue  # at its own limit already (the agent was killed before or after its cap)
            self._own[g.index] = float(watts)
            back.append(g.index)
        results = self.set_many([(i, None) for i in back])  # one readback wait for them all
        self._write_ledger()
        return results

    # ---- one set ------------------------------------------------------------------------

    def _start(self, gpu: int, cap_w: float | None) -> CapResult | _Pending:
        """Check and set one GPU's limit: a CapResult when that settles it (refused, nothing to
        do), else what to read back."""
        g = self._gpu(gpu)
        if g is None:
            return CapResult(gpu, "", cap_w, None, "error",
                             f"no GPU {gpu} on node {self.agent.node} (GPUs: "
                             f"{', '.join(str(x.index) for x in self.agent.gpus) or 'none'}): nothing set", False)
        if g.uuid in self.agent.lost:  # (a cap held on it stays held: the GPU may come back without a reset,
            if cap_w is None and g.index in self._own:  # its cap still set, and the agent sets it again. A
                self._capped.pop(g.index, None)         # restore asked meanwhile is owed: it is restored when
                self._owed.add(g.index)                 # it comes back, never capped again)
            return self._result(g, cap_w, "gpu_lost", _LOST.format(g=g))
        self._owed.discard(g.index)
        try:
            low, high, default = self._constraints(g)
            if cap_w is not None and not (math.isfinite(cap_w) and low <= cap_w <= high):
                return self._result(g, cap_w, "out_of_range",
                                    f"{cap_w:g} W is outside GPU {g.index}'s power limit range, {low:g}-{high:g} W "
                                    f"(its NVML constraints): ask for a cap within it; nothing changed")
            if cap_w is None and g.index not in self._own:  # never capped here: its limit is the site's to keep
                enforced = pynvml.nvmlDeviceGetEnforcedPowerLimit(g.handle) / 1000.0
                return self._result(g, cap_w, "restored", f"not capped by this agent: left at its {enforced:g} W",
                                    enforced)
            first = cap_w is not None and g.index not in self._own
            if first:  # what to come back to, in the ledger before the set (a kill after it loses nothing)
                self._own[g.index] = pynvml.nvmlDeviceGetPowerManagementLimit(g.handle) / 1000.0
                self._write_ledger()
            else:
                self._operators_change(g)
            own = self._own.get(g.index, default)
            target = own if cap_w is None else min(cap_w, own)  # a cap never raises the limit
            try:
                pynvml.nvmlDeviceSetPowerManagementLimit(g.handle, int(round(target * 1000)))
            except pynvml.NVMLError as e:
                if first and isinstance(e, _UNCHANGED):  # nothing was set: nothing held
                    self._forget(g)  # (any other error may have set it: held, so that a restore reaches it)
                raise
            if cap_w is None:  # back at its own limit: no longer held
                self._forget(g)
            elif abs(target - own) <= TOLERANCE_W:  # held at its own limit (a cap at or over it)
                self._capped.pop(g.index, None)
            else:
                self._capped[g.index] = target
        except pynvml.NVMLError as e:
            return self._refused(g, cap_w, e)
        return _Pending(g, cap_w, target, own, low, high, default)

    def owed(self, gpu: int) -> bool:
        """A GPU whose restore was asked while it was lost: its own limit is owed to it, no cap."""
        return gpu in self._owed

    def reverted(self, gpu: int, limit_w: float) -> bool:
        """A GPU held to a cap whose enforced limit reads its own limit from before the cap again: reset (its
        limit put back), where no counter said so (a GPU without a readable energy counter: it had run
        uncapped while its cap was reported held). An operator's other limit is no revert (_operators_change)."""
        own, cap = self._own.get(gpu), self._capped.get(gpu)
        return own is not None and cap is not None and abs(limit_w - own) < 1.0 and limit_w > cap + 1.0

    def reset_happened(self, gpus: list[int]) -> None:
        """These GPUs were reset: the default limit the reset put back is not their operator's choice."""
        for i in gpus:
            self._set_w.pop(i, None)

    def _operators_change(self, g: Gpu) -> None:
        """A held GPU whose limit is no longer the one set here: its operator set another since (`nvidia-smi
        -pl 400` during a request), which is its own limit from now on, so that a restore does not undo it
        (it had gone back to the limit from before the cap)."""
        set_w = self._set_w.get(g.index)
        if set_w is None:  # (what this agent set was not read back: nothing to tell a change by)
            return
        now_w = pynvml.nvmlDeviceGetPowerManagementLimit(g.handle) / 1000.0
        if abs(now_w - set_w) > TOLERANCE_W:
            log.warning("GPU %d (%s): its power limit is %g W, not the %g W set here: set by its operator since; "
                        "its own limit from now on (a restore goes back to it)", g.index, g.uuid, now_w, set_w)
            self._own[g.index] = now_w
            self._capped.pop(g.index, None)
            self._set_w.pop(g.index, None)
            self._write_ledger()

    def _confirm(self, group: list[CapResult | _Pending]) -> list[CapResult]:
        """Read back the enforced limits of the GPUs set, until each enforces its target or
        `ENFORCE_WAIT_S` has passed; then what each one enforces says how its set went."""
        pending = [x for x in group if isinstance(x, _Pending)]
        read: dict[int, float | Exception] = {}
        deadline = time.monotonic() + ENFORCE_WAIT_S
        while True:
            for p in pending:
                if p.g.index in read and not _behind(read[p.g.index], p.target):
                    continue
                try:
                    read[p.g.index] = pynvml.nvmlDeviceGetEnforcedPowerLimit(p.g.handle) / 1000.0
                except Exception as e:  # said once: a readback that fails is not polled
                    read[p.g.index] = e
            if not any(_behind(read[p.g.index], p.target) for p in pending) or time.monotonic() >= deadline:
                break
            time.sleep(ENFORCE_POLL_S)
        return [x if isinstance(x, CapResult) else self._verdict(x, read[x.g.index]) for x in group]

    def _verdict(self, p: _Pending, enforced: float | Exception) -> CapResult:
        g, cap_w, target, own = p.g, p.cap_w, p.target, p.own
        if cap_w is not None and isinstance(enforced, float) and abs(enforced - target) <= TOLERANCE_W:
            self._set_w[g.index] = target  # (what an operator's later change is told from)
        else:
            self._set_w.pop(g.index, None)
        if isinstance(enforced, pynvml.NVMLError_GpuIsLost):  # set, then lost: still held (it may come back so)
            return self._result(g, cap_w, "gpu_lost",
                                f"the limit was set to {target:g} W, then GPU {g.index} was lost before its readback "
                                f"(NVML_ERROR_GPU_IS_LOST); see runbooks/GpuFellOffBus.md")
        if isinstance(enforced, Exception):  # the limit is set: only its readback failed
            what = (f"{type(enforced).__name__}, NVML error {enforced.value}" if isinstance(enforced, pynvml.NVMLError)
                    else f"{type(enforced).__name__}: {enforced}")
            return self._result(g, cap_w, "error",
                                f"the limit was set to {target:g} W but GPU {g.index}'s enforced limit could not be "
                                f"read back ({what}); check `nvidia-smi -q -d POWER`")
        if abs(enforced - target) > TOLERANCE_W:
            return self._result(g, cap_w, "error",
                                f"the limit was set to {target:g} W but GPU {g.index} enforces {enforced:g} W "
                                f"{ENFORCE_WAIT_S:g} s later: another limit wins (another tool's, or the board's); "
                                f"check `nvidia-smi -q -d POWER`", enforced)
        mine = "its default" if abs(own - p.default) <= TOLERANCE_W else f"its own limit (default {p.default:g} W)"
        if cap_w is None:
            return self._result(g, cap_w, "restored", f"back to {mine}, {own:g} W", enforced)
        if target < cap_w:
            return self._result(g, cap_w, "ok", f"left at {mine}, {own:g} W: a cap of {cap_w:g} W would raise it",
                                enforced)
        return self._result(g, cap_w, "ok", f"held to {cap_w:g} W (range {p.low:g}-{p.high:g} W, {mine} {own:g} W)",
                            enforced)

    def _result(self, g: Gpu, cap_w: float | None, status: str, detail: str,
                enforced_w: float | None = None) -> CapResult:
        fine = status in ("ok", "restored")
        # A refusal is said once until its GPU's answer changes: renewed every third of its lease, an
        # unprivileged agent's not_permitted had been a warning per GPU every 20 s
        said, self._said[g.index] = self._said.get(g.index), (status, cap_w)
        level = logging.INFO if fine else logging.DEBUG if said == (status, cap_w) else logging.WARNING
        log.log(level, "GPU %d (%s): power limit: %s: %s", g.index, g.uuid, status, detail)
        return CapResult(g.index, g.uuid, cap_w, enforced_w, status, detail, g.index in self._own)

    def _forget(self, g: Gpu) -> None:
        """The GPU is no longer held (restored, lost, or its first cap refused)."""
        self._capped.pop(g.index, None)
        self._set_w.pop(g.index, None)
        if self._own.pop(g.index, None) is not None:
            self._write_ledger()

    def _write_ledger(self) -> None:
        """The own limits of the GPUs held now, by UUID (written aside, then renamed)."""
        if self.ledger is None:
            return
        own = {g.uuid: self._own[g.index] for g in self.agent.gpus if g.index in self._own}
        try:
            self.ledger.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.ledger.with_suffix(".tmp")
            tmp.write_text(json.dumps({"version": 1, "node": self.agent.node, "own_w": own}))
            os.replace(tmp, self.ledger)
            if self._ledger_failing:
                log.info("power limits ledger %s written again", self.ledger)
            self._ledger_failing = False
        except OSError as e:
            if not self._ledger_failing:
                log.warning("power limits ledger %s cannot be written (%s): caps go on, but an agent killed while "
                            "holding some leaves them to the next set, a GPU reset or a driver reload",
                            self.ledger, e.strerror or e)
            self._ledger_failing = True

    def _refused(self, g: Gpu, cap_w: float | None, e: pynvml.NVMLError) -> CapResult:
        def result(status: str, detail: str) -> CapResult:
            return self._result(g, cap_w, status, detail)

        what = f"{type(e).__name__}, NVML error {e.value}"
        if isinstance(e, pynvml.NVMLError_NoPermission):
            return result("not_permitted", f"NVML refused to set the power limit ({what}): only root may change "
                                           f"power limits; run the agent as root (in a container: root with "
                                           f"CAP_SYS_ADMIN; deploy/ has a systemd drop-in and a Kubernetes patch). "
                                           f"Nothing changed")
        if isinstance(e, pynvml.NVMLError_InvalidArgument):  # constraints read fine, the driver said otherwise
            asked = "its own limit" if cap_w is None else f"{cap_w:g} W"
            return result("out_of_range", f"the driver refused {asked} ({what}); its constraints: "
                                          f"{_range(self._bounds.get(g.index))}. Nothing changed")
        if isinstance(e, pynvml.NVMLError_GpuIsLost):  # a cap it held stays held: it may come back with it
            return result("gpu_lost", _LOST.format(g=g))
        if isinstance(e, pynvml.NVMLError_NotSupported):
            return result("not_supported", f"GPU {g.index} has no settable power limit through NVML ({what}): it "
                                           f"cannot be capped")
        return result("error", f"NVML: {e} ({what})")

    def _constraints(self, g: Gpu) -> tuple[float, float, float]:
        if g.index not in self._bounds:
            low, high = pynvml.nvmlDeviceGetPowerManagementLimitConstraints(g.handle)
            default = pynvml.nvmlDeviceGetPowerManagementDefaultLimit(g.handle)
            self._bounds[g.index] = (low / 1000.0, high / 1000.0, default / 1000.0)
        return self._bounds[g.index]

    def _gpu(self, gpu: int) -> Gpu | None:
        return next((g for g in self.agent.gpus if g.index == gpu), None)


@dataclass(frozen=True)
class _Pending:
    """A GPU whose limit was set, its enforced limit still to be read back."""
    g: Gpu
    cap_w: float | None
    target: float  # the limit set, W
    own: float     # the GPU's own limit, W
    low: float
    high: float
    default: float


def _behind(enforced: float | Exception, target: float) -> bool:
    """Not (yet) enforcing the target; a failed readback is final."""
    return not isinstance(enforced, Exception) and abs(enforced - target) > TOLERANCE_W


# A set that raised one of these changed nothing; any other error may have set the limit.
_UNCHANGED = (pynvml.NVMLError_NoPermission, pynvml.NVMLError_InvalidArgument, pynvml.NVMLError_NotSupported,
              pynvml.NVMLError_GpuIsLost)
_LOST = "GPU {g.index} is lost (NVML_ERROR_GPU_IS_LOST): no limit set; see runbooks/GpuFellOffBus.md"


def _range(bounds: tuple[float, float, float] | None) -> str:
    return "unknown" if bounds is None else f"{bounds[0]:g}-{bounds[1]:g} W"


class NvmlCaps:
    """The agent's CapApplier (sources/power_caps.py): the power role's commands for this
    node's GPUs, applied by UUID through its PowerLimiter on the NVML thread."""

    def __init__(self, agent: NvmlAgent, site: str, rack: str) -> None:
        self.agent, self.site, self.rack = agent, site, rack

    def mine(self, caps):
        from pipeline.sources.power_caps import for_node
        return for_node(caps, self.agent.node)

    async def apply(self, uuids: list[str], cap_w: list[float | None]) -> list[CapResult]:
        return await self.agent.on_nvml_thread(self._apply, uuids, cap_w)

    def _apply(self, uuids: list[str], cap_w: list[float | None]) -> list[CapResult]:
        index = {g.uuid: g.index for g in self.agent.gpus}
        known = [(index[u], None if w is None else float(w)) for u, w in zip(uuids, cap_w) if u in index]
        done = iter(self.agent.power.set_many(known))  # one readback wait for the node's GPUs
        return [next(done) if u in index else
                CapResult(-1, u, w, None, "error", f"no GPU {u} on node {self.agent.node}: the power role's view of "
                          f"the fleet is stale (a replaced GPU?); nothing set", False)
                for u, w in zip(uuids, cap_w)]

    def where(self, uuid: str) -> tuple[str, str]:
        return self.rack, self.agent.node
