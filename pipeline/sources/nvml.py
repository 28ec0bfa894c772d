"""The NVML agent: the GPUs of this node, scraped through NVML (`fleetwatch agent`).

- Discovery at start: every GPU's handle (cached), UUID, name, PCI bus id and serial, and the
  driver version: what the GPU is goes with every sample (gpu_sample v3), null where NVML does not say.
- A scrape per `agent.interval_s`, in a worker thread (NVML calls block for
  milliseconds; the event loop never waits on them). Per GPU: one batched
  `nvmlDeviceGetFieldValues` call (power, energy, memory temperature, PCIe replays,
  ECC, row remapping, NVLink CRC), then the few values that have no field id
  (temperature, clocks, utilisation, memory use, clocks event reasons, P-state).
- A field or call that answers NVML_ERROR_NOT_SUPPORTED (or that this driver lacks) is
  remembered per GPU and asked again only every RETRY_UNSUPPORTED_S (a GPU taken out of MIG
  mode answers utilisation again); its column is null, never 0. Where a driver lacks a newer
  call or field, the older one answers: the clocks throttle reasons before R535, and
  nvmlDeviceGetPowerUsage where NVML_FI_DEV_POWER_AVERAGE is not supported (an A100).
- Any other NVML error (NVML_ERROR_UNKNOWN, RESET_REQUIRED, ...) is one GPU's, never the
  agent's: a call that fails leaves its value null for that scrape, a GPU whose reads fail
  gives no row (the detectors' GpuNotReporting follows), each said once when it starts and
  once when it ends. A GPU NVML cannot open at start is left out and looked for again every
  REDISCOVER_S, as a lost one is: a GPU that answers again (a reset) is read again.
- Base units: W, J, C, MHz, bytes, 0-1.
- Power limits (sources/nvml_power.py): each scrape reads the enforced limit (`power_limit_w`);
  `agent.power` applies and restores caps on the agent's NVML thread (`await agent.on_nvml_thread(
  agent.power.apply, gpu, watts)`), and close() restores every cap the agent set.
- Events without waiting for the next scrape: XID and ECC events through an NVML
  event set, waited on in a thread of their own and published at once. The set is made
  again without a lost GPU (NVML answers a wait with GPU_IS_LOST at once while one is in it)
  and with a GPU found again; an NVML error backs the thread off, never ends it.
- A GPU reset puts a power limit back to the default: a cap this agent holds is set again.
- A GPU that answers NVML_ERROR_GPU_IS_LOST, or drops out of the device count,
  becomes a `gpu_lost` event and its samples stop. Energy going backwards means the
  GPU was reset (counters restart at zero): a `gpu_reset` event, so that detectors
  take the drop for what it is.
- No driver: one clear message. The library missing or no permission is a setup problem
  (`NvmlUnavailable`, exit status 2); the driver not loaded yet is a moment (a boot that starts
  the agent before the driver, a driver upgrade: `NvmlDriverNotLoaded`, exit status 75, which a
  supervisor restarts: with 2, systemd's RestartPreventExitStatus had left the agent dead).
- A call that hangs in the driver (a GPU falling off the bus, a driver in recovery): NVML answers
  in milliseconds, and one that has not answered in HANG_S (OPEN_HANG_S at start) is hung. The
  agent says which call (`NvmlHung`: the GPU and what it asked) and ends with status 75 to be
  started again, where its supervisor would have killed it on /healthz with nothing said. Its
  NVML thread is a daemon (`threads.DaemonThread`): close() and the process's exit do not wait on
  the hung call, and the caps it held are said to stay until the next agent restores them from
  its ledger.

Tests run this same code against a recording of a real H100 (sources/nvml_replay.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, TypeVar

import numpy as np
import pyarrow as pa
import pynvml

from pipeline.config import AgentConfig, ConfigError, Unavailable
from pipeline.model import (COLLECTOR_STARTED, COLLECTOR_STOPPING, EVENT, GPU_INFO, GPU_METRICS, GPU_SAMPLE, GPU_SETTINGS,
                            GPU_WORKLOAD, ClockEventReason)
from pipeline.sources.job_mapping import JobMapping
from pipeline.sources.nvml_power import PowerLimiter
from pipeline.threads import DaemonThread
from pipeline.waits import wait_set

log = logging.getLogger(__name__)
T = TypeVar("T")

# Field id -> (column, divisor to base units). One batched call per GPU per scrape.
FIELDS: dict[int, tuple[str, float]] = {
    pynvml.NVML_FI_DEV_POWER_AVERAGE: ("power_w", 1000.0),        # mW, 1 s average (as nvmlDeviceGetPowerUsage)
    pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION: ("energy_j", 1000.0),  # mJ since driver load
    pynvml.NVML_FI_DEV_MEMORY_TEMP: ("mem_temp_c", 1.0),
    pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER: ("pcie_replay_total", 1.0),
    pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL: ("ecc_sbe_volatile_total", 1.0),
    pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL: ("ecc_dbe_volatile_total", 1.0),
    pynvml.NVML_FI_DEV_REMAPPED_COR: ("remapped_rows_correctable", 1.0),
    pynvml.NVML_FI_DEV_REMAPPED_UNC: ("remapped_rows_uncorrectable", 1.0),
    pynvml.NVML_FI_DEV_REMAPPED_PENDING: ("remapped_rows_pending", 1.0),
    pynvml.NVML_FI_DEV_REMAPPED_FAILURE: ("remapped_rows_failure", 1.0),
    pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL: ("nvlink_crc_errors_total", 1.0),
}


def _temperature(h) -> float:
    return pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)


def _sm_clock(h) -> float:
    return pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)


def _mem_clock(h) -> float:
    return pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM)


def _utilization(h) -> tuple[float, float]:
    u = pynvml.nvmlDeviceGetUtilizationRates(h)
    return _value(u.gpu) / 100.0, _value(u.memory) / 100.0


def _mem_used(h) -> float:
    return pynvml.nvmlDeviceGetMemoryInfo(h).used


def _reasons(h) -> float:
    try:
        return pynvml.nvmlDeviceGetCurrentClocksEventReasons(h)
    except pynvml.NVMLError_FunctionNotFound:  # a driver before R535: the same bits under their older name
        return pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(h)


def _power_usage(h) -> float:
    return _value(pynvml.nvmlDeviceGetPowerUsage(h)) / 1000.0  # mW


def _pstate(h) -> float:
    return pynvml.nvmlDeviceGetPerformanceState(h)


def _power_limit(h) -> float:
    return _value(pynvml.nvmlDeviceGetEnforcedPowerLimit(h)) / 1000.0  # mW


# Values without a field id: name -> (columns, call).
CALLS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "temperature": (("gpu_temp_c",), _temperature),
    "sm_clock": (("sm_clock_mhz",), _sm_clock),
    "mem_clock": (("mem_clock_mhz",), _mem_clock),
    "utilization": (("util_gpu", "util_mem"), _utilization),
    "memory": (("mem_used_bytes",), _mem_used),
    "clocks_event_reasons": (("clock_event_reasons",), _reasons),
    "pstate": (("pstate",), _pstate),
    "power_limit": (("power_limit_w",), _power_limit),
    "power_usage": (("power_w",), _power_usage),
}
# A field a GPU does not support -> the call that reads the same value (not asked otherwise).
FALLBACKS: dict[int, str] = {pynvml.NVML_FI_DEV_POWER_AVERAGE: "power_usage"}  # (GA100: no field 185)
DEFAULT_CALLS = [name for name in CALLS if name not in FALLBACKS.values()]
# A field's return codes that mean "not on this GPU or driver" (a field id an older driver does not know).
_NO_FIELD = (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_INVALID_ARGUMENT)
METRICS = list(GPU_METRICS)
COLUMNS = METRICS + list(GPU_SETTINGS)  # what a scrape reads
EVENT_TYPES = pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeDoubleBitEccError
_NO_DRIVER = {pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: "the NVML library (libnvidia-ml.so.1) is not installed",
              pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "the NVIDIA driver is not loaded",
              pynvml.NVML_ERROR_NO_PERMISSION: "this user may not open the GPUs (/dev/nvidia*): run the agent as "
                                               "root or a user the device files allow"}
REDISCOVER_S = 60.0          # a lost GPU, or one NVML could not open at start, is looked for again this often
RETRY_UNSUPPORTED_S = 600.0  # what answered NOT_SUPPORTED is asked again this often (MIG mode can change)
EVENTS_BACKOFF_MAX_S = 30.0  # the event thread after an NVML error: waits doubling up to this
HANG_S = 30.0                # an NVML call that has not answered in this long hangs in the driver
OPEN_HANG_S = 300.0          # ... but nvmlInit and discovery: without persistence mode, each GPU's state loads then
HANG_POLL_S = 1.0            # how often the agent looks for one


class NvmlUnavailable(ConfigError):
    """NVML cannot run on this host: a setup problem, exit status 2."""


class NvmlDriverNotLoaded(Unavailable):
    """The NVIDIA driver is not loaded now (module doc): exit status 75, tried again."""


class NvmlHung(Unavailable):
    """An NVML call hangs in the driver (module doc): exit status 75, started again."""


@dataclass
class Gpu:
    index: int
    handle: object
    uuid: str
    name: str
    fields: list[int] = field(default_factory=lambda: list(FIELDS))  # still asked for
    calls: list[str] = field(default_factory=lambda: list(DEFAULT_CALLS))
    unsupported: list[str] = field(default_factory=list)             # what answered NOT_SUPPORTED (said once)
    failing: str = ""                                                # the NVML error its reads answer; "" = read
    errors: dict[str, str] = field(default_factory=dict)             # a call or field -> the NVML error said
    energy_j: float = float("nan")                                   # last reading: resets show as a drop
    slowdown_temp_c: float = float("nan")                            # HW slowdown threshold; NaN if unknown
    pci_bus_id: str | None = None                                    # e.g. 00000000:18:00.0; None if unknown
    serial: str | None = None                                        # board serial; None if unknown
    mem_total_bytes: float = float("nan")                            # framebuffer size; NaN if unknown


@dataclass
class Scrape:
    samples: pa.RecordBatch | None  # one row per GPU that answered
    events: list[dict]              # GPU lost, GPU reset
    seconds: float                  # wall time the NVML calls took


class NvmlAgent:
    def __init__(self, cfg: AgentConfig, node: str, state_dir: Path | None = None) -> None:
        """`state_dir`: where the agent keeps what must outlive it (the own power limits of the
        GPUs it caps: sources/nvml_power.py); None: nothing kept."""
        self.cfg = cfg
        self.node = node
        self.gpus: list[Gpu] = []
        self.lost: set[str] = set()
        self.unopened: dict[int, str] = {}  # GPU index -> the NVML error opening it answered
        self.generation = 0  # moves when the GPUs or their handles change: the event thread's set is made again
        self.clock = time.monotonic  # (tests move it)
        self._next_rediscover = 0.0
        self._next_unsupported = 0.0
        self._said: set[str] = set()  # agent-wide NVML errors said once (device count, event registration)
        self._recap: set[int] = set()  # GPUs back from a reset or a loss: a cap held on them is set again
        self.scrapes = 0
        self.driver_version: str | None = None
        self._pool = DaemonThread("nvml-scrape")
        self._doing: tuple[str, float] | None = None  # the NVML thread's call in flight, and since when (clock)
        self.hung_in = ""  # the call found hung (NvmlHung): close() waits on nothing
        self._events_stop = threading.Event()
        self.power = PowerLimiter(self, state_dir / "power-limits.json" if state_dir else None)  # blocking:
        # through on_nvml_thread from async code
        self.opened = asyncio.Event()  # set once open() found the GPUs
        self.job_mapping = JobMapping(cfg.job_mapping_dir) if cfg.job_mapping_dir else None
        self.recovered: list = []  # CapResults of open()'s recovery: caps a stopped agent left, restored
        self.recapped: list = []   # CapResults of caps set again after a reset or a loss, not yet reported

    # ---- start-up ----------------------------------------------------------------

    def open(self) -> None:
        """Initialise NVML and discover the GPUs (blocking: call from a thread)."""
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            why = _NO_DRIVER.get(e.value)
            if why is None:
                raise
            kind = NvmlDriverNotLoaded if e.value == pynvml.NVML_ERROR_DRIVER_NOT_LOADED else NvmlUnavailable
            raise kind(
                f"NVML: {why} ({type(e).__name__}, NVML error {e.value}) on node {self.node!r}. `fleetwatch agent` "
                f"needs an NVIDIA GPU with its driver: check `nvidia-smi`. Without a GPU use `fleetwatch run` "
                f"(simulated fleet) or agent.replay = DIR (recorded NVML data).") from None
        try:
            self.driver_version = _text(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError as e:
            log.info("NVML: the driver version is not available (%s); null in the data", e)
        self.gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            try:
                self.gpus.append(self._discover(i))
            except pynvml.NVMLError as e:  # one GPU that cannot be opened: the others are read
                self.unopened[i] = _error(e)
                log.error("GPU %d: NVML cannot open it (%s): left out, looked for again every %g s; check "
                          "`nvidia-smi` and the kernel log (XIDs)", i, _error(e), REDISCOVER_S)
        now = self.clock()
        self._next_rediscover, self._next_unsupported = now + REDISCOVER_S, now + RETRY_UNSUPPORTED_S
        log.info("NVML agent on %s: driver %s, %d GPUs: %s", self.node, self.driver_version,
                 len(self.gpus), ", ".join(f"{g.index}: {g.name} {g.uuid} {g.pci_bus_id}" for g in self.gpus))
        # Caps an agent before this one left (killed, crashed) go back to the GPUs' own limits.
        self.recovered = self.power.recover()

    def _discover(self, index: int) -> Gpu:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        g = Gpu(index, handle, pynvml.nvmlDeviceGetUUID(handle), pynvml.nvmlDeviceGetName(handle))
        try:
            g.pci_bus_id = _text(pynvml.nvmlDeviceGetPciInfo(handle).busId)
        except pynvml.NVMLError as e:
            self._unsupported(g, f"PCI info ({e})")
        try:
            g.serial = _text(pynvml.nvmlDeviceGetSerial(handle))
        except pynvml.NVMLError as e:  # GeForce and some boards have none
            self._unsupported(g, f"serial number ({e})")
        try:  # what DCGM_FI_DEV_FB_FREE is served from (sources/dcgm_exposition.py)
            g.mem_total_bytes = float(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        except pynvml.NVMLError as e:
            self._unsupported(g, f"memory total ({e})")
        try:  # the detectors' thermal margin is to this GPU's own threshold (H100: 89 C)
            g.slowdown_temp_c = _sane("slowdown_temp_c", pynvml.nvmlDeviceGetTemperatureThreshold(
                handle, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN))
        except pynvml.NVMLError as e:
            self._unsupported(g, f"slowdown temperature threshold ({e})")
        return g

    def close(self) -> None:
        self._events_stop.set()
        restored = []
        try:  # a cap never outlives the agent: restored on the NVML thread, after any scrape in flight
            future = None if self.hung_in else self._pool.submit(self.power.restore_all)
        except RuntimeError:  # closed before: nothing runs on the pool any more
            future = None
        try:
            restored = future.result(timeout=HANG_S) if future is not None else []
        except TimeoutError:
            self.hung_in = self.hung_in or (self._doing or ("a call",))[0]
        except Exception:  # still shut NVML down; say which GPUs may stay capped
            log.exception("restoring power caps at shutdown failed: GPUs %s may stay capped (`nvidia-smi -q -d "
                          "POWER`)", sorted(self.power.capped))
        if self.hung_in:  # nothing more can run on the NVML thread, nor shut NVML down
            if self.power.capped:
                log.error("power caps on GPUs %s not restored at shutdown: NVML hangs (%s); the next agent restores "
                          "them %s once NVML answers (`nvidia-smi -q -d POWER`)", sorted(self.power.capped),
                          self.hung_in, f"from its ledger {self.power.ledger}" if self.power.ledger else
                          "only if told: no ledger is kept (set them back with `nvidia-smi -pl`)")
            self._pool.shutdown(wait=False)
            return
        for r in restored:
            if r.status != "restored":
                log.error("GPU %d (%s): power cap not restored at shutdown: %s", r.gpu, r.gpu_uuid, r.detail)
        self._pool.shutdown(wait=True)
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass

    # ---- scraping (worker thread) -------------------------------------------------

    def scrape(self) -> Scrape:
        """One scrape of every GPU: a row each, in base units, nulls for what is unsupported."""
        t0 = time.perf_counter()
        events = self._check_count()
        now = self.clock()
        if now >= self._next_rediscover:
            self._next_rediscover = now + REDISCOVER_S
            self._rediscover()
        if now >= self._next_unsupported:
            self._next_unsupported = now + RETRY_UNSUPPORTED_S
            for g in self.gpus:  # asked again; said again only if it now answers
                g.fields, g.calls = list(FIELDS), list(DEFAULT_CALLS)
        n = len(self.gpus)
        values = {m: np.full(n, np.nan) for m in COLUMNS}
        ts = np.zeros(n, np.int64)
        answered = np.zeros(n, bool)
        for i, g in enumerate(self.gpus):
            if g.uuid in self.lost:
                continue
            ts[i] = _now_ns()
            self._doing = (f"reading GPU {g.index} ({g.uuid})", self.clock())
            try:
                self._read(g, i, values)
            except pynvml.NVMLError_GpuIsLost:
                events.append(self._lost(g, "NVML_ERROR_GPU_IS_LOST"))
                continue
            except pynvml.NVMLError as e:  # this GPU's reads fail: no row (GpuNotReporting), the others go on
                if not g.failing:
                    log.error("GPU %d (%s): NVML answers %s: no samples from it until it answers; see "
                              "runbooks/GpuNotReporting.md", g.index, g.uuid, _error(e))
                g.failing = _error(e)
                continue
            if g.failing:
                log.warning("GPU %d (%s) answers again (after %s): its samples resume", g.index, g.uuid, g.failing)
                g.failing = ""
            answered[i] = True
            values["slowdown_temp_c"][i] = g.slowdown_temp_c
            energy = values["energy_j"][i]
            if energy < g.energy_j:  # counters restarted at zero: the GPU was reset
                events.append(self._event(g, ts[i], "gpu_reset", None,
                                          f"energy counter went back from {g.energy_j:.0f} J to {energy:.0f} J: "
                                          f"GPU reset, counters restart at zero"))
                self._recap.add(g.index)
            if np.isfinite(energy):
                g.energy_j = energy
            if self.power.reverted(g.index, values["power_limit_w"][i]):  # (a reset no counter showed)
                self._recap.add(g.index)
        if self._recap:
            self._doing = (f"setting the caps of GPUs {sorted(self._recap)} again", self.clock())
            self._cap_again(sorted(self._recap))
            self._recap.clear()
        self.scrapes += 1
        return Scrape(self._batch(values, ts, answered) if answered.any() else None, events,
                      time.perf_counter() - t0)

    def _read(self, g: Gpu, row: int, values: dict[str, np.ndarray]) -> None:
        """One GPU's values into `row`. Raises NVMLError where the GPU's reads fail as a whole."""
        if g.fields:
            try:
                answers = pynvml.nvmlDeviceGetFieldValues(g.handle, g.fields)
            except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound) as e:
                answers = []
                for fid in list(g.fields):
                    self._no_field(g, fid, _error(e))
            for fv in answers:
                column, divisor = FIELDS[fv.fieldId]
                what = f"field {fv.fieldId} ({column})"
                if fv.nvmlReturn == pynvml.NVML_SUCCESS:
                    values[column][row] = _sane(column, _field_value(fv)) / divisor
                    self._answers(g, what)
                elif fv.nvmlReturn in _NO_FIELD:
                    self._no_field(g, fv.fieldId, _error(pynvml.NVMLError(fv.nvmlReturn)))
                elif fv.nvmlReturn == pynvml.NVML_ERROR_GPU_IS_LOST:
                    raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
                else:
                    self._fails(g, what, _error(pynvml.NVMLError(fv.nvmlReturn)))
        for name in list(g.calls):
            columns, call = CALLS[name]
            try:
                got = call(g.handle)
            except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound) as e:
                self._unsupported(g, name, _error(e))
                g.calls.remove(name)
                continue
            except pynvml.NVMLError_GpuIsLost:
                raise
            except pynvml.NVMLError as e:
                self._fails(g, name, _error(e))
                continue
            self._answers(g, name)
            for column, value in zip(columns, got if isinstance(got, tuple) else (got,)):
                values[column][row] = _sane(column, value)

    def _no_field(self, g: Gpu, fid: int, why: str) -> None:
        """A field this GPU or driver does not have: not asked again; its older call, if any, is."""
        self._unsupported(g, f"field {fid} ({FIELDS[fid][0]})", why)
        g.fields.remove(fid)
        if (fallback := FALLBACKS.get(fid)) and fallback not in g.calls:
            g.calls.append(fallback)

    def _unsupported(self, g: Gpu, what: str, why: str = "NVML_ERROR_NOT_SUPPORTED") -> None:
        if what in g.unsupported:  # asked again after RETRY_UNSUPPORTED_S, and still not: said before
            return
        g.unsupported.append(what)
        log.info("GPU %d (%s): %s is not supported (%s); null in the data, asked again every %g s", g.index,
                 g.uuid, what, why, RETRY_UNSUPPORTED_S)

    def _fails(self, g: Gpu, what: str, why: str) -> None:
        """A call or field that answers an NVML error this scrape: null, said once until it answers."""
        if g.errors.get(what) != why:
            g.errors[what] = why
            log.warning("GPU %d (%s): %s answers %s: null in the data until it answers", g.index, g.uuid, what, why)

    def _answers(self, g: Gpu, what: str) -> None:
        if what in g.unsupported:
            g.unsupported.remove(what)
            log.info("GPU %d (%s): %s answers now (it was not supported)", g.index, g.uuid, what)
        if g.errors.pop(what, None) is not None:
            log.info("GPU %d (%s): %s answers again", g.index, g.uuid, what)

    def _rediscover(self) -> None:
        """Lost GPUs by their UUID, and those NVML could not open at start by their index: one that
        answers is read again (a reset GPU comes back; its handle may be new)."""
        for g in self.gpus:
            if g.uuid not in self.lost:
                continue
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(g.uuid)
                (energy,) = pynvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION])
            except pynvml.NVMLError:
                continue
            if energy.nvmlReturn == pynvml.NVML_ERROR_GPU_IS_LOST:  # (a field says so in its own return code: a
                continue                                             # GPU still lost had read as back every minute)
            g.handle, g.failing = handle, ""  # (its energy reading kept: a reset meanwhile shows as one)
            self.lost.discard(g.uuid)
            self._recap.add(g.index)  # whether it was reset or not, the cap held on it is what it must enforce
            self.generation += 1
            log.warning("GPU %d (%s) answers again after it was lost: its samples resume", g.index, g.uuid)
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError:
            return
        present = len(self.gpus) - len(self.lost)
        if not self.unopened and count <= present:  # (more than it reads: one replaced, or back under a new UUID)
            return
        # Every index again, not the ones that failed: the indices move when a GPU drops out.
        try:
            uuids, failing = _uuids(count)
        except pynvml.NVMLError:
            return
        known = {g.uuid for g in self.gpus}
        for index, uuid in uuids.items():
            if uuid in known:
                continue
            try:
                g = self._discover(index)
            except pynvml.NVMLError as e:
                failing[index] = _error(e)
                continue
            if any(x.index == g.index for x in self.gpus):  # its index moved onto one the agent has: the agent's
                g.index = max(x.index for x in self.gpus) + 1  # indices stay one per GPU (caps go by them)
            self.gpus.append(g)
            known.add(g.uuid)
            self.generation += 1
            log.warning("GPU %d (%s, %s) opens now: read from this scrape on", index, g.uuid, g.name)
        # (a GPU lost but still in the count is the agent's, not unopened: as one, it had made every scrape
        # read every index's UUID)
        self.unopened = {i: why for i, why in failing.items() if not why.startswith("NVMLError_GpuIsLost")}

    def _cap_again(self, gpus: list[int]) -> None:
        """A reset puts a GPU's power limit back to its default: a cap held here is set again (the GPUs
        together: one readback wait). Logged, and reported as power_action rows (cause `reset`, by the
        source after the scrape); the power role's lease renewals find it held."""
        capped = self.power.capped
        # (a GPU whose request ended while it was lost: its restore, not its cap again)
        asks = [(i, capped[i]) for i in gpus if i in capped] + [(i, None) for i in gpus if self.power.owed(i)]
        self.power.reset_happened([i for i, _ in asks])
        results = self.power.set_many(asks) if asks else []
        self.recapped += results
        for r in results:
            if r.gpu not in capped:  # (its request ended while it was lost)
                log.warning("GPU %d (%s) is back; the request that capped it ended meanwhile: its limit restored: "
                            "%s (%s)", r.gpu, r.gpu_uuid, r.status, r.detail)
                continue
            (log.warning if r.status == "ok" else log.error)(
                "GPU %d (%s) was reset or lost, which puts its power limit back to the default: its cap of %g W set "
                "again: %s (%s)", r.gpu, r.gpu_uuid, capped[r.gpu], r.status, r.detail)

    def _check_count(self) -> list[dict]:
        """A GPU that drops out of the device count is lost (cheap: one call a scrape)."""
        try:
            count = pynvml.nvmlDeviceGetCount()
        except (pynvml.NVMLError_Uninitialized, pynvml.NVMLError_DriverNotLoaded) as e:
            # The driver went away (unloaded, reloaded for an upgrade): this NVML session never answers again,
            # and every scrape had been empty until someone restarted the agent. Exit 75: started again, it
            # opens NVML afresh (its caps' ledger restores what it held).
            raise NvmlDriverNotLoaded(f"NVML on {self.node}: the driver went away ({_error(e)}); the agent exits "
                                      f"to be started again once it is back") from None
        except pynvml.NVMLError as e:
            self._say_once("count", "NVML: the device count is not available (%s): GPUs that drop out are found "
                                    "by their own reads", _error(e))
            return []
        if count >= len(self.gpus) + len(self.unopened):
            return []
        present = set(_uuids(count)[0].values())
        gone = [g for g in self.gpus if g.uuid not in present and g.uuid not in self.lost]
        return [self._lost(g, "NVML_ERROR_GPU_IS_LOST" if _is_lost(g) else "no longer in the device count")
                for g in gone]

    def _say_once(self, key: str, message: str, *args) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning(message, *args)

    def _lost(self, g: Gpu, why: str) -> dict:
        self.lost.add(g.uuid)
        self.generation += 1
        log.error("GPU %d (%s) is lost (%s): its samples stop; see runbooks/GpuFellOffBus.md", g.index, g.uuid, why)
        return self._event(g, _now_ns(), "gpu_lost", None, f"NVML: GPU is lost ({why})")

    def _event(self, g: Gpu, ts_ns: int, kind: str, code: int | None, text: str) -> dict:
        return {"ts": ts_ns, "site": self.cfg.site, "rack": self.cfg.rack, "node": self.node, "gpu": g.index,
                "gpu_uuid": g.uuid, "kind": kind, "code": code, "text": text}

    def _batch(self, values: dict[str, np.ndarray], ts: np.ndarray, answered: np.ndarray) -> pa.RecordBatch:
        rows = np.flatnonzero(answered)
        n = rows.size
        cols = {"ts": pa.array(ts[rows]).cast(GPU_SAMPLE.field("ts").type),
                "site": pa.array([self.cfg.site] * n), "rack": pa.array([self.cfg.rack] * n),
                "node": pa.array([self.node] * n),
                "gpu": pa.array(np.array([self.gpus[i].index for i in rows], np.int16)),
                "gpu_uuid": pa.array([self.gpus[i].uuid for i in rows])}
        for m in COLUMNS:
            v = values[m][rows]
            missing = np.isnan(v)
            typ = GPU_SAMPLE.field(m).type
            if pa.types.is_boolean(typ):
                cols[m] = pa.array(v == 1, mask=missing)
            elif pa.types.is_integer(typ):
                missing |= np.abs(v) >= 2.0 ** 63  # (past int64: one such value had ended the agent)
                cols[m] = pa.array(np.where(missing, 0, v).astype(np.int64), mask=missing).cast(typ, safe=False)
            else:
                cols[m] = pa.array(v, mask=missing)
        gpus = [self.gpus[i] for i in rows]
        info = {"model": [_text(g.name) for g in gpus], "pci_bus_id": [g.pci_bus_id for g in gpus],
                "driver_version": [self.driver_version] * n, "serial": [g.serial for g in gpus]}
        for name in GPU_INFO:
            cols[name] = pa.array(info[name], pa.string())
        for name in GPU_WORKLOAD:  # NVML does not know who uses a GPU
            cols[name] = pa.nulls(n, pa.string())
        if self.job_mapping is not None:  # the scheduler's job mapping says which job does
            cols["job"] = pa.array(self.job_mapping.jobs([g.index for g in gpus]), pa.string())
        return pa.RecordBatch.from_pydict(cols, schema=GPU_SAMPLE)

    # ---- events (their own thread) ---------------------------------------------------

    def watch_events(self, emit: Callable[[dict], None]) -> None:
        """Wait on NVML's event set until close(); emit each XID/ECC event as it comes. An NVML
        error backs off and makes the set again: this thread ends only at close()."""
        backoff = 1.0
        while not self._events_stop.is_set():
            try:
                self._watch(emit)
                backoff = 1.0
            except Exception as e:  # NVML's, or a binding's surprise: XIDs must not stop for good
                what = _error(e) if isinstance(e, pynvml.NVMLError) else f"{type(e).__name__}: {e}"
                self._say_once(f"events {what}", "NVML events: %s; waiting on them again in %g s (said once; the "
                               "ECC counters still show at each scrape)", what, backoff)
                self._events_stop.wait(backoff)
                backoff = min(backoff * 2, EVENTS_BACKOFF_MAX_S)

    def _watch(self, emit: Callable[[dict], None]) -> None:
        """One event set of the GPUs readable now, until they change (`generation`) or close()."""
        generation = self.generation
        gpus = [g for g in list(self.gpus) if g.uuid not in self.lost]
        event_set = pynvml.nvmlEventSetCreate()
        try:
            for g in gpus:
                try:
                    wanted = pynvml.nvmlDeviceGetSupportedEventTypes(g.handle) & EVENT_TYPES
                    pynvml.nvmlDeviceRegisterEvents(g.handle, wanted, event_set)
                except pynvml.NVMLError as e:
                    self._say_once(f"register {g.uuid}", "GPU %d (%s): cannot register for XID/ECC events (%s); "
                                   "they show at the next scrape through the ECC counters only", g.index, g.uuid,
                                   _error(e))
            by_uuid = {g.uuid: g for g in gpus}
            while not self._events_stop.is_set() and self.generation == generation:
                try:
                    data = pynvml.nvmlEventSetWait_v2(event_set, 500)
                except pynvml.NVMLError_Timeout:
                    continue
                except pynvml.NVMLError_GpuIsLost:
                    # NVML answers at once while a lost GPU is in the set: the scrape names it (generation
                    # moves, and the set is made again without it); no spinning meanwhile.
                    self._events_stop.wait(1.0)
                    continue
                try:
                    g = by_uuid.get(pynvml.nvmlDeviceGetUUID(data.device))
                except pynvml.NVMLError as e:  # the GPU went away between the event and now
                    log.warning("NVML event %#x (data %d) from a GPU that does not answer (%s): dropped; the scrape "
                                "reports the GPU", data.eventType, data.eventData, e)
                    continue
                if g is None:
                    continue
                if data.eventType & pynvml.nvmlEventTypeXidCriticalError:
                    emit(self._event(g, _now_ns(), "xid", int(data.eventData), f"XID {int(data.eventData)}"))
                elif data.eventType & pynvml.nvmlEventTypeDoubleBitEccError:  # what XID 48 reports
                    emit(self._event(g, _now_ns(), "xid", 48, "double-bit ECC error (NVML event)"))
        finally:
            pynvml.nvmlEventSetFree(event_set)

    # ---- the async face ---------------------------------------------------------------

    async def on_nvml_thread(self, fn: Callable[..., T], *args, hang_s: float | None = None) -> T:
        """`fn(*args)` on the agent's NVML thread, between scrapes: for the blocking NVML work
        of async callers, e.g. `await agent.on_nvml_thread(agent.power.apply, 3, 500.0)`.
        Raises NvmlHung where an NVML call has not answered in `hang_s` (HANG_S; module doc)."""
        hang_s = HANG_S if hang_s is None else hang_s
        done = asyncio.wrap_future(self._pool.submit(self._tracked, fn, *args))
        while not (await asyncio.wait({done}, timeout=HANG_POLL_S))[0]:
            doing = self._doing  # (once: the NVML thread clears it as the call answers)
            if doing is not None and (hung_s := self.clock() - doing[1]) >= hang_s:
                self.hung_in = doing[0]
                raise NvmlHung(
                    f"NVML has not answered for {hung_s:.0f} s ({self.hung_in}) on node {self.node!r}: the call hangs "
                    f"in the driver. The agent ends (status 75) to be started again; if it hangs again, check "
                    f"`nvidia-smi` and the kernel log (`dmesg`: an Xid 79 is a GPU fallen off the bus; "
                    f"runbooks/GpuFellOffBus.md)")
        return done.result()

    def _tracked(self, fn: Callable[..., T], *args) -> T:
        """(on the NVML thread) `fn(*args)`, known as the call in flight meanwhile."""
        self._doing = (getattr(fn, "__qualname__", "a call"), self.clock())
        try:
            return fn(*args)
        finally:
            self._doing = None

    async def run(self, publish_samples: Callable[[pa.RecordBatch], Awaitable[None]],
                  publish_events: Callable[[pa.RecordBatch], Awaitable[None]], stop: asyncio.Event) -> None:
        """Scrape every interval until `stop`; events as they come."""
        loop = asyncio.get_running_loop()
        await self.on_nvml_thread(self.open, hang_s=OPEN_HANG_S)
        self.opened.set()
        # Said of itself (detect: its interval, not learned from gaps alone; a stop on request is no outage)
        where = (self.cfg.site, self.cfg.rack, self.node)
        await publish_events(events_batch([node_event(where, COLLECTOR_STARTED, round(self.cfg.interval_s * 1000),
                                                      f"the NVML agent started: {len(self.gpus)} GPUs read "
                                                      f"every {self.cfg.interval_s:g} s")]))
        pending: asyncio.Queue[dict] = asyncio.Queue()
        watcher = threading.Thread(target=self.watch_events, name="nvml-events", daemon=True,
                                   args=(lambda e: loop.call_soon_threadsafe(pending.put_nowait, e),))
        if self.cfg.events:
            watcher.start()

        async def forward_events() -> None:
            while True:
                first = await pending.get()
                batch = [first] + [pending.get_nowait() for _ in range(pending.qsize())]
                await publish_events(events_batch(batch))
        forwarder = asyncio.create_task(forward_events())
        try:
            next_at = time.monotonic()
            while not stop.is_set():
                scrape = await self.on_nvml_thread(self.scrape)
                if scrape.samples is not None:
                    await publish_samples(scrape.samples)
                if scrape.events:
                    await publish_events(events_batch(scrape.events))
                next_at += self.cfg.interval_s
                delay = next_at - time.monotonic()
                if delay < 0:  # the scrape took longer than the interval: skip, do not pile up
                    next_at = time.monotonic()
                    continue
                await wait_set(stop, delay)
        finally:
            self._events_stop.set()
            if watcher.is_alive():  # (bounded: a wait hung in the driver holds a daemon thread, not the stop)
                await loop.run_in_executor(None, watcher.join, HANG_S)
            while not pending.empty():
                await publish_events(events_batch([pending.get_nowait() for _ in range(pending.qsize())]))
            if stop.is_set():  # (on request: a restart may follow; one that fails says nothing, and is found)
                await publish_events(events_batch([node_event(where, COLLECTOR_STOPPING, None,
                                                              "the NVML agent stops on request")]))
            forwarder.cancel()
            await loop.run_in_executor(None, self.close)


def _uuids(count: int) -> tuple[dict[int, str], dict[int, str]]:
    """The UUID of each device index below `count`, and the NVML error of those that do not say."""
    uuids, failing = {}, {}
    for index in range(count):
        try:
            uuids[index] = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
        except pynvml.NVMLError as e:
            failing[index] = _error(e)
    return uuids, failing


def _error(e: pynvml.NVMLError) -> str:
    """An NVML error as logs name it (no call into the library: it may be what fails)."""
    return f"{type(e).__name__} ({e.value})"


def _is_lost(g: Gpu) -> bool:
    try:
        pynvml.nvmlDeviceGetUUID(g.handle)
    except pynvml.NVMLError_GpuIsLost:
        return True
    except pynvml.NVMLError:
        pass
    return False


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _now_ns() -> int:
    """Wall clock at microsecond resolution (NVML's own; whole microseconds convert to datetime)."""
    return time.time_ns() // 1000 * 1000


def _text(value) -> str | None:
    """A string NVML returned (bytes from a ctypes structure, str from pynvml's wrappers); None if empty."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return value.strip() or None if isinstance(value, str) else None


# NVML's "no value" answers (an unsupported threshold, a counter it cannot read): UINT_MAX and ULLONG_MAX
NO_VALUE = (2 ** 32 - 1, 2 ** 64 - 1)
KNOWN_REASONS = sum(int(bit) for bit in ClockEventReason)  # every bit NVML documents


def _value(raw) -> float:
    """An NVML answer before it is scaled: its no-value sentinels are NaN (_sane, after the scaling, would
    not know them)."""
    return math.nan if raw in NO_VALUE else raw


def _sane(column: str, value) -> float:
    """A value as the data holds it: NVML's sentinels and what no GPU reads (a negative value, P-state 32:
    unknown) are no value (NaN), not readings (a 4294967295 C threshold had been served); the clocks-event
    reasons keep their known bits (an unknown one past 2**53, in float64, had cost the others and ended the
    agent)."""
    if column == "clock_event_reasons" and math.isfinite(value):
        return float(int(value) & KNOWN_REASONS)
    if value in NO_VALUE or value < 0 or (column == "pstate" and value > 15):
        return math.nan
    return float(value)


def _field_value(fv) -> float:
    t = fv.valueType
    if t == pynvml.NVML_VALUE_TYPE_DOUBLE:
        return fv.value.dVal
    if t == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT:
        return fv.value.uiVal
    if t in (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG, pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG):
        return fv.value.ullVal
    if t == pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG:
        return fv.value.sllVal
    return fv.value.siVal


def node_event(where: tuple[str, str, str], kind: str, code: int | None, text: str) -> dict:
    """An event row of a node (site, rack, node), no GPU's, stamped now: a collector's own."""
    site, rack, node = where
    return {"ts": _now_ns(), "site": site, "rack": rack, "node": node, "gpu": None, "gpu_uuid": None, "kind": kind,
            "code": code, "text": text}


def events_batch(rows: list[dict]) -> pa.RecordBatch:
    cols = {f.name: pa.array([r[f.name] for r in rows], pa.int64() if f.name == "ts" else f.type) for f in EVENT}
    cols["ts"] = cols["ts"].cast(EVENT.field("ts").type)
    return pa.RecordBatch.from_pydict(cols, schema=EVENT)


class NvmlSource:
    """The NVML agent as a Source (sources/base.py): this node's scrapes and its events,
    from the GPUs or, with a recording (sources/nvml_replay.py), from that instead. Its
    latest scrape is also served under dcgm-exporter's names (`exposition`, a collector
    for /metrics: sources/dcgm_exposition.py)."""

    def __init__(self, agent: NvmlAgent, replay=None, replay_name: str = "", caps=None,
                 lease_clock: Callable[[], float] = time.monotonic) -> None:
        from pipeline.sources.dcgm_exposition import GpuExposition
        self.agent, self.replay, self.replay_name = agent, replay, replay_name
        self.caps = caps  # the power role's caps for this node (bus.listen), or None
        self.lease_clock = lease_clock  # the caps' leases run on it: monotonic, an NTP step moves no lease
        self.gpu_samples = 0
        # (served while read within 10 of its intervals, and a minute at least)
        self.exposition = GpuExposition(stale_after_s=max(60.0, 10 * agent.cfg.interval_s))
        self.exposition_failed = False

    async def run(self, emit, stop: asyncio.Event) -> None:
        import contextlib

        from pipeline.bus.base import Topic

        async def samples(batch: pa.RecordBatch) -> None:
            if len(self.exposition.fb_total_bytes) < len(self.agent.gpus):
                self.exposition.fb_total_bytes.update((g.uuid, g.mem_total_bytes) for g in self.agent.gpus)
            try:
                self.exposition.update(batch)
            except Exception:  # /metrics is a view: a value it cannot serve ends no sample (it had ended the agent)
                if not self.exposition_failed:
                    log.warning("the agent's /metrics could not take a scrape (served as before; said once)",
                                exc_info=True)
                self.exposition_failed = True
            await emit(Topic.GPU, batch)
            self.gpu_samples += batch.num_rows

        async def events(batch: pa.RecordBatch) -> None:
            for e in batch.select(["gpu_uuid", "kind", "code"]).to_pylist():  # a few events, rarely
                if e["kind"] == "xid" and e["code"] is not None:
                    self.exposition.xid(e["gpu_uuid"], e["code"])
                elif e["kind"] == "gpu_lost":
                    self.exposition.forget(e["gpu_uuid"])
            await emit(Topic.EVENTS, batch)
        with self.replay.installed() if self.replay is not None else contextlib.nullcontext():
            if self.caps is None:
                await self.agent.run(samples, events, stop)
                return
            from pipeline.sources.nvml_power import NvmlCaps
            from pipeline.sources.power_caps import CapHolder, action_rows, alongside, follow_caps
            applier = NvmlCaps(self.agent, self.agent.cfg.site, self.agent.cfg.rack)
            holder = CapHolder()

            async def samples_and_recaps(batch: pa.RecordBatch) -> None:
                await samples(batch)
                if self.agent.recapped:  # (set by the scrape just done: nothing runs beside this)
                    results, self.agent.recapped = self.agent.recapped, []
                    await emit(Topic.POWER_ACTIONS, action_rows(applier, holder, results, "reset", _utc_now()))

            async def follow(stop: asyncio.Event) -> None:
                await self.agent.opened.wait()  # the GPUs are known
                if self.agent.recovered:  # caps a stopped agent left, restored at start: said like any other,
                    await emit(Topic.POWER_ACTIONS, action_rows(applier, CapHolder(), self.agent.recovered, "start",
                                                                _utc_now()))
                    self.agent.recovered = []  # once (follow runs again after a bus failure)
                try:
                    await follow_caps(self.caps, applier, emit, stop, _utc_now, holder, self.lease_clock)
                finally:
                    if (close := getattr(self.caps, "close", None)) is not None:
                        await close()
            await alongside(lambda source_stop: self.agent.run(samples_and_recaps, events, source_stop), follow, stop)

    def stats(self) -> dict[str, int]:
        return {"gpu_samples": self.gpu_samples}

    def describe(self) -> str:
        return f"NVML agent on {self.agent.node}" + (f" (replaying {self.replay_name})" if self.replay else "")


def preflight(cfg, env=None, warn: bool = True) -> None:
    """Before the agent starts: a replay names a recording that exists."""
    if cfg.agent.replay:
        from pipeline.sources.nvml_replay import recording_dir
        recording_dir(cfg.agent.replay)


def build(ctx, spec) -> NvmlSource:
    """The agent role: this node (agent.node, else the host name), replaying agent.replay if set."""
    import socket
    a = ctx.cfg.agent
    agent = NvmlAgent(a, a.node or socket.gethostname(), Path(ctx.cfg.data_dir) / "agent")
    replay = None
    if a.replay:
        from pipeline.sources.nvml_replay import NvmlReplay
        replay = NvmlReplay(a.replay, a.replay_gpus, interval_s=a.interval_s)  # played at its recorded speed
    from pipeline.bus.base import Topic
    from pipeline.bus.keys import rack_key
    source = NvmlSource(agent, replay, a.replay, ctx.bus.listen(Topic.POWER_CAPS, [rack_key(a.site, a.rack)]))
    ctx.collectors.append(source.exposition)  # /metrics under dcgm-exporter's names
    return source
