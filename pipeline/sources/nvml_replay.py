"""Recorded NVML behind pynvml's own functions: the agent's real code path, without a GPU.

`NvmlReplay(recording)` reads a recording of one H100 (`h100`, shipped in
`pipeline/sources/recordings/h100/`, or a directory of the same files): which
calls it supports, the value or the exact NVMLError code of each, the measured
latency of each call, and a 10 Hz trace under load. `with replay.installed():`
replaces the pynvml functions the agent calls with ones that answer from the
recording, as if `gpus` copies of that GPU were installed, each replaying the trace
from its own starting row. Values come back in pynvml's own ctypes structures,
errors as pynvml's own exception classes, and each call blocks for its recorded
latency (the agent must keep that off the event loop).

Each `nvmlDeviceGetFieldValues` call on a GPU starts its next recorded scrape: the
agent calls it first in every scrape, and the other calls of that scrape read the
same trace row. Given the agent's interval (`interval_s`), a scrape moves as many rows as
the trace recorded in that time, so the GPU runs at its own speed (a part of a row is carried
to the next scrape: 0.25-s scrapes of a 10 Hz trace move 2, 3, 2, 3 rows); without it, one row.
Cumulative counters keep counting when the trace wraps around.

Power limits, from the power-cap recording (`NAME_powercap_*`): each GPU starts at the
default limit and `nvmlDeviceSetPowerManagementLimit` changes it (outside the constraints:
NVML_ERROR_INVALID_ARGUMENT, as the real library). The enforced limit follows the set
`enforce_lag_s` later, as a real GPU's does (read back at once, it still says the old one). A limit below the default the trace was
recorded at holds the GPU down once it has settled (`settle_s` after the set, wall clock):
power is min(trace, limit), the SM clock the measured curve's at that power
(power/curve.py) where that is lower, the clocks event reasons gain 0x4 (SW power cap), and
the energy counter rises by the capped power. Without a cap the trace plays as recorded.

Scripted events for tests: `xid(gpu, code)` queues an XID event, `lose(gpu)` makes
the GPU answer NVML_ERROR_GPU_IS_LOST (and an event set it is registered in answer it at once,
as a real driver's does after XID 79), `vanish(gpu)` removes it from the device
count, `recover(gpu)` brings a lost or vanished GPU back under a new handle, `reset(gpu)` zeroes
its energy and error counters and puts its power limit back to the default, as a GPU reset does,
`deny_caps(gpu)` makes setting its power limit answer NVML_ERROR_NO_PERMISSION (an agent not
running as root). What a real fleet answers that the recording does not: `fail(gpu, function,
code)` makes one function answer an NVML error for one GPU (`code` None: answer again; for
nvmlDeviceGetHandleByIndex `gpu` is the index asked), `missing` names functions this driver
lacks (NVML_ERROR_FUNCTION_NOT_FOUND, as a driver before R535 for
nvmlDeviceGetCurrentClocksEventReasons), `field_errors` gives field ids the return code of
another GPU (an A100 answers NVML_FI_DEV_POWER_AVERAGE with NOT_SUPPORTED).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import queue
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pynvml

from pipeline.config import ConfigError
from pipeline.resources import RECORDINGS, recording_name, recordings

# Trace columns -> what each call returns (the recording's own names).
_TRACE_FIELDS = {  # field id -> (trace column, NVML value type)
    pynvml.NVML_FI_DEV_MEMORY_TEMP: ("fv_82", pynvml.NVML_VALUE_TYPE_UNSIGNED_INT),
    pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION: ("energy_mj", pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG),
    pynvml.NVML_FI_DEV_POWER_AVERAGE: ("power_mw", pynvml.NVML_VALUE_TYPE_UNSIGNED_INT),
    pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER: ("pcie_replay", pynvml.NVML_VALUE_TYPE_UNSIGNED_INT),
    pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL: ("ecc_sbe_vol", pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG),
    pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL: ("ecc_dbe_vol", pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG),
    pynvml.NVML_FI_DEV_REMAPPED_UNC: ("fv_143", pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG),
}
_COUNTERS = ("energy_mj", "pcie_replay", "ecc_sbe_vol", "ecc_dbe_vol")  # cumulative: offset on wrap, zero on reset
_CALL_KEYS = {  # pynvml function -> the recording's key for its support and latency
    "nvmlDeviceGetTemperature": "temperature_gpu", "nvmlDeviceGetUtilizationRates": "utilization",
    "nvmlDeviceGetMemoryInfo": "memory_info", "nvmlDeviceGetCurrentClocksEventReasons": "clocks_event_reasons",
    "nvmlDeviceGetPerformanceState": "pstate", "nvmlDeviceGetName": "name", "nvmlDeviceGetUUID": "uuid",
    "nvmlDeviceGetFanSpeed": "fan_speed", "nvmlDeviceGetPciInfo": "pci_info", "nvmlDeviceGetSerial": "serial",
}
_CLOCK_KEYS = {pynvml.NVML_CLOCK_SM: ("clock_sm", "sm_mhz"), pynvml.NVML_CLOCK_MEM: ("clock_mem", "mem_mhz")}
_ERRORS = {"Not Supported": pynvml.NVML_ERROR_NOT_SUPPORTED}
SW_POWER_CAP = 0x4  # nvmlClocksEventReasonSwPowerCap
SETTLE_S = 0.3  # the recording: power settled under a new limit 0.2-0.4 s after the set
# The enforced limit follows a set 30-120 ms after the call began (the H100 recording's 20 Hz trace
# and a real H200's, scripts/gpu-check): read back at once, it still says the old limit.
ENFORCE_LAG_S = 0.1
_POWERCAP_FILES = ("_powercap_summary.json", "_powercap_trace.jsonl", "_powercap_load.jsonl")  # after NAME


@dataclass
class _Gpu:
    index: int
    handle: object
    uuid: str
    row: int                   # trace row of the current scrape
    rows_owed: float = 0.0     # the part of a row its scrapes have moved without a whole row yet
    offsets: dict[str, float] = field(default_factory=dict)  # counter offsets (wraps, resets)
    lost: bool = False
    vanished: bool = False
    limit_mw: int | None = None  # the power management limit (None: no power-cap recording, as recorded)
    old_limit_mw: int | None = None  # what holds the power until the new limit settles
    settles_at: float = 0.0          # time.monotonic() when limit_mw takes over from old_limit_mw
    enforced_before_mw: int | None = None  # the enforced limit until enforces_at (None: as recorded)
    enforces_at: float = 0.0               # time.monotonic() when the enforced limit becomes limit_mw
    caps_denied: bool = False


_RECORDING_FILES = ("_inventory.json", "_load_trace.jsonl")  # after the recording's NAME (h100)


def recording_dir(recording: Path | str, key: str = "agent.replay") -> Path:
    """The folder of a recording: a shipped one by name (`h100`), or a directory
    holding the same files. ConfigError, naming `key`, for anything else."""
    d = RECORDINGS / str(recording) if str(recording) in recordings() else Path(recording)
    name = recording_name(d)
    several = sorted(x.name for x in d.glob("*_inventory.json")) if d.is_dir() else []
    if name is None and len(several) > 1:
        raise ConfigError(f"config error: {key} = {str(recording)!r}: several recordings in one directory "
                          f"({', '.join(several)}): give each its own")
    missing = [f"{name or 'NAME'}{suffix}" for suffix in _RECORDING_FILES
               if name is None or not (d / f"{name}{suffix}").is_file()]
    if missing:
        raise ConfigError(f"config error: {key} = {str(recording)!r}: not a shipped recording "
                          f"({', '.join(recordings())}) nor a directory holding one recording's "
                          f"{' and '.join('NAME' + x for x in _RECORDING_FILES)}, as the shipped h100's "
                          f"h100_inventory.json (missing {', '.join(missing)})")
    return d


class NvmlReplay:
    def __init__(self, recording: Path | str = "h100", gpus: int = 8, latency: bool = True,
                 init_error: int | None = None, settle_s: float = SETTLE_S,
                 enforce_lag_s: float = ENFORCE_LAG_S, interval_s: float | None = None) -> None:
        """`interval_s`: the agent's scrape interval, for the trace to play at the speed it was
        recorded (a 10 Hz trace scraped every second moves 10 rows a scrape); None: a row a
        scrape, whatever the interval (tests step through the trace row by row)."""
        d = recording_dir(recording)
        name = recording_name(d)
        self.inventory = json.loads((d / f"{name}_inventory.json").read_text())
        self.trace = [json.loads(line) for line in (d / f"{name}_load_trace.jsonl").read_text().splitlines() if line]
        self.latency = latency
        self.settle_s = settle_s
        # Slow motion is not harmless: an H200's temperature jumps 13 C in the first 0.1 s of a load,
        # while its 1 s power average takes a second to follow; stretched tenfold, that read as a
        # thermal runaway on every replayed GPU.
        self.rows_per_scrape = 1.0
        if interval_s is not None:
            steps = [b["t"] - a["t"] for a, b in zip(self.trace, self.trace[1:])]
            period_s = statistics.median(steps) if steps else 0.0
            if not period_s > 0:
                raise ConfigError(f"config error: agent.replay = {str(recording)!r}: its load trace has no time step "
                                  f"(`t` must rise row by row)")
            # (0.25-s scrapes of a 10 Hz trace: 2, 3, 2, 3, ...; rounded, for a period of 0.1000000000000014 s)
            self.rows_per_scrape = round(interval_s / period_s, 6)
        self.enforce_lag_s = enforce_lag_s
        # A recording of one's own may lack the power-cap files: its limits are then read-only.
        self.powercap: dict | None = None
        self.curve = None
        if all((d / f"{name}{suffix}").is_file() for suffix in _POWERCAP_FILES):
            from pipeline.power.curve import from_recording
            self.powercap = json.loads((d / f"{name}_powercap_summary.json").read_text())
            try:
                self.curve = from_recording(d, name)
            except (ValueError, OSError) as e:
                raise ConfigError(f"config error: agent.replay = {str(recording)!r}: {e}") from None
            spent = [s["call_us"] for s in self.powercap["set_log"] if s.get("call_us") is not None]
            if not spent:
                raise ConfigError(f"config error: agent.replay = {str(recording)!r}: its power-cap summary times no "
                                  f"set (`call_us` in set_log): a recording whose caps were all refused cannot replay one")
            self.set_limit_us = statistics.median(spent)
        self.init_error = init_error  # e.g. NVML_ERROR_DRIVER_NOT_LOADED: nvmlInit fails with it
        self.failures: dict[tuple[int, str], int] = {}  # (GPU index, function) -> the NVML error it answers
        self.missing: set[str] = set()                  # functions this driver lacks
        self.field_errors: dict[int, int] = {}          # field id -> the return code every GPU gives it
        self.failed: dict[str, int] = {}                # how often each function answered a scripted failure
        self.calls: dict[str, int] = {}  # how often each function was called (tests: unsupported not retried)
        self.field_requests: dict[int, int] = {}  # how often each field id was asked for
        self.threads: set[str] = set()  # names of the threads that called NVML
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        stride = max(1, len(self.trace) // max(gpus, 1))
        uuid = self.inventory["support"]["uuid"]["value"]
        default = self.powercap["default_mw"] if self.powercap else None
        self.gpus = [_Gpu(i, ctypes.pointer(pynvml.struct_c_nvmlDevice_t()), f"{uuid[:-2]}{i + 1:02d}",
                          row=(i * stride) - 1, limit_mw=default, old_limit_mw=default) for i in range(gpus)]

    # ---- scripted events -----------------------------------------------------------

    def xid(self, gpu: int, code: int) -> None:
        self._events.put((self.gpus[gpu].handle, pynvml.nvmlEventTypeXidCriticalError, code))

    def lose(self, gpu: int) -> None:
        self.gpus[gpu].lost = True

    def vanish(self, gpu: int) -> None:
        self.gpus[gpu].vanished = True

    def recover(self, gpu: int) -> None:
        """A lost or vanished GPU answers again, under a new handle (the old one is stale)."""
        g = self.gpus[gpu]
        g.lost = g.vanished = False
        g.handle = ctypes.pointer(pynvml.struct_c_nvmlDevice_t())

    def deny_caps(self, gpu: int) -> None:
        self.gpus[gpu].caps_denied = True

    def fail(self, gpu: int, function: str, code: int | None) -> None:
        if code is None:
            self.failures.pop((gpu, function), None)
        else:
            self.failures[gpu, function] = code

    def reset(self, gpu: int) -> None:
        g = self.gpus[gpu]
        with self._lock:
            row = self._row(g)  # (after a wrap too)
            g.offsets = {c: -float(row[c]) for c in _COUNTERS}
            if self.powercap is not None:  # a reset reinitialises the GPU: a limit that was set is gone
                g.limit_mw = g.old_limit_mw = self.powercap["default_mw"]
                g.enforced_before_mw, g.settles_at, g.enforces_at = None, 0.0, 0.0

    # ---- the recording -------------------------------------------------------------

    def _support(self, key: str) -> dict:
        return self.inventory["support"][key]

    def _block(self, us: float) -> None:
        if self.latency:
            time.sleep(us / 1e6)

    def _call(self, name: str, key: str) -> dict:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.threads.add(threading.current_thread().name)
        s = self._support(key)
        self._block(s["us"])
        if not s["ok"]:
            raise pynvml.NVMLError(_ERRORS.get(s["value"].removeprefix("NVMLError: "), pynvml.NVML_ERROR_UNKNOWN))
        return s

    def _gpu(self, handle) -> _Gpu:
        g = self._find(handle)
        if g is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if g.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return g

    def _find(self, handle) -> _Gpu | None:
        try:
            address = ctypes.addressof(handle.contents)  # handles are pointers: copies point to the same device
        except (AttributeError, TypeError, ValueError):  # not a device handle (an index, an event set)
            return None
        return next((g for g in self.gpus if ctypes.addressof(g.handle.contents) == address), None)

    def _answering(self, name: str, fn):
        """`fn` as this driver and these GPUs answer it (missing, fail)."""
        def call(*args, **kw):
            if name in self.missing:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            if self.failures and args:
                gpu = args[0] if name == "nvmlDeviceGetHandleByIndex" else getattr(self._find(args[0]), "index", None)
                if (code := self.failures.get((gpu, name))) is not None:
                    self.failed[name] = self.failed.get(name, 0) + 1
                    raise pynvml.NVMLError(code)
            return fn(*args, **kw)
        return call

    def _row(self, g: _Gpu) -> dict:
        return self.trace[max(g.row, 0) % len(self.trace)]

    def _value(self, g: _Gpu, column: str) -> float:
        return self._row(g)[column] + g.offsets.get(column, 0.0)

    def _visible(self) -> list[_Gpu]:
        return [g for g in self.gpus if not g.vanished]

    def _held_mw(self, g: _Gpu) -> int | None:
        """The limit holding this GPU's power below the trace's now, if one does."""
        if self.powercap is None:
            return None
        limit = g.limit_mw if time.monotonic() >= g.settles_at else g.old_limit_mw
        # the trace ran at the default limit: only a lower one changes what it shows
        if limit < self.powercap["default_mw"] and self._row(g)["power_mw"] > limit:
            return limit
        return None

    def _capped_energy(self, g: _Gpu) -> None:
        """The energy counter rises by the capped power over the row just entered (under the lock)."""
        held = self._held_mw(g)
        if held is None or g.row % len(self.trace) == 0:  # (a wrap adds no energy of its own)
            return
        row, before = self._row(g), self.trace[g.row % len(self.trace) - 1]
        g.offsets["energy_mj"] = g.offsets.get("energy_mj", 0.0) - (row["energy_mj"] - before["energy_mj"]) * (
            1 - held / row["power_mw"])

    # ---- pynvml's functions ----------------------------------------------------------

    def nvmlInit(self) -> None:  # noqa: N802 (pynvml's names)
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:  # noqa: N802
        pass

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        return self.inventory["driver"]

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self._visible())

    def nvmlDeviceGetHandleByIndex(self, index: int):  # noqa: N802
        visible = self._visible()
        if index >= len(visible):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return visible[index].handle

    def nvmlDeviceGetHandleByUUID(self, uuid: str):  # noqa: N802
        g = next((g for g in self._visible() if g.uuid == uuid), None)
        if g is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        if g.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return g.handle

    def nvmlDeviceGetUUID(self, handle) -> str:  # noqa: N802
        g = self._gpu(handle)
        self._call("nvmlDeviceGetUUID", "uuid")
        return g.uuid

    def nvmlDeviceGetName(self, handle) -> str:  # noqa: N802
        self._gpu(handle)
        return self._call("nvmlDeviceGetName", "name")["value"]

    def nvmlDeviceGetPciInfo(self, handle):  # noqa: N802
        """The recorded PCI info; copy i sits i devices further along the recorded bus."""
        g = self._gpu(handle)
        rec = self._call("nvmlDeviceGetPciInfo", "pci_info")["value"]
        device = rec["device"] + g.index
        bus_id = f"{rec['busId'].rsplit(':', 1)[0]}:{device:02X}.{rec['busId'].rsplit('.', 1)[1]}"
        return pynvml.nvmlPciInfo_t(busIdLegacy=bus_id[4:].encode(), domain=rec["domain"], bus=rec["bus"],
                                    device=device, pciDeviceId=rec["pciDeviceId"],
                                    pciSubSystemId=rec["pciSubSystemId"], busId=bus_id.encode())

    def nvmlDeviceGetSerial(self, handle) -> str:  # noqa: N802
        """The recorded serial, its last two digits the copy's number (as the UUIDs)."""
        g = self._gpu(handle)
        serial = self._call("nvmlDeviceGetSerial", "serial")["value"]
        return f"{serial[:-2]}{g.index + 1:02d}"

    def nvmlDeviceGetFieldValues(self, handle, field_ids):  # noqa: N802
        g = self._gpu(handle)
        self.calls["nvmlDeviceGetFieldValues"] = self.calls.get("nvmlDeviceGetFieldValues", 0) + 1
        self.threads.add(threading.current_thread().name)
        for fid in field_ids:
            self.field_requests[fid] = self.field_requests.get(fid, 0) + 1
        self._block(self.inventory["field_values_call_us"])
        with self._lock:
            g.rows_owed += self.rows_per_scrape
            rows = int(g.rows_owed)
            g.rows_owed -= rows
            for _ in range(rows):
                g.row += 1
                if g.row > 0 and g.row % len(self.trace) == 0:  # the trace wraps: counters keep counting
                    last, first = self.trace[-1], self.trace[0]
                    for c in _COUNTERS:
                        g.offsets[c] = g.offsets.get(c, 0.0) + last[c] - first[c]
                self._capped_energy(g)
        held = self._held_mw(g)
        recorded = {getattr(pynvml, name): v for name, v in self.inventory["field_values"].items()
                    if hasattr(pynvml, name)}
        out = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        now_us = int(time.time() * 1e6)
        for i, fid in enumerate(field_ids):
            out[i].fieldId = fid
            rec = recorded.get(fid)
            if fid in _TRACE_FIELDS and rec is not None and rec["ret"] == 0 and fid not in self.field_errors:
                column, vtype = _TRACE_FIELDS[fid]
                out[i].nvmlReturn, out[i].valueType, out[i].timestamp = 0, vtype, now_us
                value = int(self._value(g, column))
                if column == "power_mw" and held is not None:
                    value = held
                if vtype == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT:
                    out[i].value.uiVal = value
                else:
                    out[i].value.ullVal = value
            elif fid in self.field_errors:
                out[i].nvmlReturn = self.field_errors[fid]
            elif rec is not None:  # as recorded: the value, or its error code (3 = NOT_SUPPORTED)
                out[i].nvmlReturn, out[i].valueType, out[i].timestamp = rec["ret"], rec["type"], now_us
                if rec["ret"] == 0:
                    out[i].value.ullVal = int(rec["value"] or 0)
            else:
                out[i].nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return out

    def nvmlDeviceGetPowerUsage(self, handle) -> int:  # noqa: N802
        """The 1 s average, as the field NVML_FI_DEV_POWER_AVERAGE (the trace's `power_mw`)."""
        g = self._gpu(handle)
        self._call("nvmlDeviceGetPowerUsage", "power_usage_mw")
        held = self._held_mw(g)
        return int(self._value(g, "power_mw") if held is None else held)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle) -> int:  # noqa: N802
        g = self._gpu(handle)
        self._call("nvmlDeviceGetTotalEnergyConsumption", "total_energy_mj")
        return int(self._value(g, "energy_mj"))

    def nvmlDeviceGetPcieReplayCounter(self, handle) -> int:  # noqa: N802
        g = self._gpu(handle)
        self._call("nvmlDeviceGetPcieReplayCounter", "pcie_replay_counter")
        return int(self._value(g, "pcie_replay"))

    def nvmlDeviceGetTemperature(self, handle, sensor: int) -> int:  # noqa: N802
        g = self._gpu(handle)
        self._call("nvmlDeviceGetTemperature", "temperature_gpu")
        return int(self._value(g, "temp_c"))

    def nvmlDeviceGetTemperatureThreshold(self, handle, threshold: int) -> int:  # noqa: N802
        self._gpu(handle)
        key = {pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: "temp_threshold_slowdown",
               pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: "temp_threshold_shutdown",
               pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX: "temp_threshold_gpu_max",
               pynvml.NVML_TEMPERATURE_THRESHOLD_MEM_MAX: "temp_threshold_mem_max"}.get(threshold)
        if key is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return int(self._call("nvmlDeviceGetTemperatureThreshold", key)["value"])

    def nvmlDeviceGetClockInfo(self, handle, clock: int) -> int:  # noqa: N802
        g = self._gpu(handle)
        if clock not in _CLOCK_KEYS:  # a clock the recording did not trace
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        key, column = _CLOCK_KEYS[clock]
        self._call("nvmlDeviceGetClockInfo", key)
        mhz = int(self._value(g, column))
        held = self._held_mw(g) if clock == pynvml.NVML_CLOCK_SM else None
        if held is not None:  # the clock the GPU ran at when held to that power (the measured curve)
            mhz = min(mhz, int(round(float(self.curve.clock_at(held / 1000.0)))))
        return mhz

    def nvmlDeviceGetUtilizationRates(self, handle):  # noqa: N802
        g = self._gpu(handle)
        self._call("nvmlDeviceGetUtilizationRates", "utilization")
        return pynvml.c_nvmlUtilization_t(gpu=int(self._value(g, "util_gpu")), memory=int(self._value(g, "util_mem")))

    def nvmlDeviceGetMemoryInfo(self, handle):  # noqa: N802
        g = self._gpu(handle)
        total = self._call("nvmlDeviceGetMemoryInfo", "memory_info")["value"]["total"]
        used = int(self._value(g, "mem_used_b"))
        return pynvml.c_nvmlMemory_t(total=total, free=total - used, used=used)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle) -> int:  # noqa: N802
        g = self._gpu(handle)
        self._call("nvmlDeviceGetCurrentClocksEventReasons", "clocks_event_reasons")
        reasons = int(self._value(g, "throttle"))
        return reasons | SW_POWER_CAP if self._held_mw(g) is not None else reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle) -> int:  # noqa: N802
        """The same bits under their name before R535 (the newer name's key in the recording)."""
        return self.nvmlDeviceGetCurrentClocksEventReasons(handle)

    def nvmlDeviceGetPerformanceState(self, handle) -> int:  # noqa: N802
        g = self._gpu(handle)
        self._call("nvmlDeviceGetPerformanceState", "pstate")
        return int(self._value(g, "pstate"))

    def nvmlDeviceGetFanSpeed(self, handle) -> int:  # noqa: N802
        self._gpu(handle)
        return self._call("nvmlDeviceGetFanSpeed", "fan_speed")["value"]

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle) -> list[int]:  # noqa: N802
        self._gpu(handle)
        s = self._call("nvmlDeviceGetPowerManagementLimitConstraints", "power_limit_constraints_mw")
        return list(self.powercap["constraints_mw"] if self.powercap else s["value"])

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle) -> int:  # noqa: N802
        self._gpu(handle)
        s = self._call("nvmlDeviceGetPowerManagementDefaultLimit", "power_limit_default_mw")
        return int(self.powercap["default_mw"] if self.powercap else s["value"])

    def nvmlDeviceGetPowerManagementLimit(self, handle) -> int:  # noqa: N802
        g = self._gpu(handle)
        s = self._call("nvmlDeviceGetPowerManagementLimit", "power_limit_mw")
        return int(s["value"] if g.limit_mw is None else g.limit_mw)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle) -> int:  # noqa: N802
        """The limit in force: a set's, `enforce_lag_s` after it (the power takes `settle_s`)."""
        g = self._gpu(handle)
        s = self._call("nvmlDeviceGetEnforcedPowerLimit", "enforced_power_limit_mw")
        with self._lock:
            return int(self._enforced_mw(g, s["value"]))

    def _enforced_mw(self, g: _Gpu, recorded: int) -> int:
        if g.limit_mw is None:
            return recorded
        if time.monotonic() < g.enforces_at:
            return recorded if g.enforced_before_mw is None else g.enforced_before_mw
        return g.limit_mw

    def nvmlDeviceSetPowerManagementLimit(self, handle, limit: int) -> None:  # noqa: N802
        g = self._gpu(handle)
        self.calls["nvmlDeviceSetPowerManagementLimit"] = self.calls.get("nvmlDeviceSetPowerManagementLimit", 0) + 1
        self.threads.add(threading.current_thread().name)
        if self.powercap is None:  # nothing recorded of setting a limit on this GPU
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        began = time.monotonic()  # the enforced limit's lag counts from here, as it was measured
        self._block(self.set_limit_us)
        if g.caps_denied:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
        low, high = self.powercap["constraints_mw"]
        if not low <= limit <= high:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        with self._lock:
            now = time.monotonic()
            g.old_limit_mw = g.limit_mw if now >= g.settles_at else g.old_limit_mw  # a set before the last settled
            rec = self._support("enforced_power_limit_mw")
            g.enforced_before_mw = self._enforced_mw(g, rec["value"]) if rec["ok"] else None
            g.limit_mw, g.settles_at = int(limit), now + self.settle_s
            g.enforces_at = began + self.enforce_lag_s

    def nvmlDeviceGetSupportedEventTypes(self, handle) -> int:  # noqa: N802
        self._gpu(handle)
        return int(self.inventory["supported_event_types"])

    def nvmlEventSetCreate(self):  # noqa: N802
        return []  # the GPUs registered in it

    def nvmlDeviceRegisterEvents(self, handle, event_types: int, event_set) -> None:  # noqa: N802
        event_set.append(self._gpu(handle))

    def nvmlEventSetWait_v2(self, event_set, timeout_ms: int):  # noqa: N802
        self.threads.add(threading.current_thread().name)
        self.calls["nvmlEventSetWait_v2"] = self.calls.get("nvmlEventSetWait_v2", 0) + 1
        if any(g.lost for g in event_set):  # at once, as a real driver's after XID 79 (no wait)
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        try:
            handle, kind, data = self._events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT) from None
        return pynvml.c_nvmlEventData_t(device=handle, eventType=kind, eventData=data)

    def nvmlEventSetFree(self, event_set) -> None:  # noqa: N802
        pass

    @contextlib.contextmanager
    def installed(self) -> Iterator["NvmlReplay"]:
        """pynvml's functions answer from this recording inside the block."""
        names = [n for n in dir(type(self)) if n.startswith("nvml")]
        saved = {n: getattr(pynvml, n) for n in names}
        try:
            for n in names:
                setattr(pynvml, n, self._answering(n, getattr(self, n)))
            yield self
        finally:
            for n, f in saved.items():
                setattr(pynvml, n, f)
