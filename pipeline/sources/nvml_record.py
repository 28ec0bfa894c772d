"""A real GPU's NVML answers, recorded in the format the replay reads (sources/nvml_replay.py;
the format: recordings/h100/README.md). `scripts/gpu-check --record NAME` writes a recording
with these on a GPU node:

- `inventory(handle)`: each call the agent or the replay makes (and a few that describe the
  GPU), with its answer or its exact NVMLError and its latency; the field values in one batched
  call; the event types the GPU supports;
- `trace_row(handle)`: one row of the 10 Hz load trace (the replay plays its GPUs from it);
- `timed_scrapes(agent, n)`: the agent's own scrapes, every NVML function in them timed: where
  a slow scrape spends its time.

Blocking, as NVML is: run it off any event loop."""

from __future__ import annotations

import contextlib
import ctypes
import re
import socket
import statistics
import time
from collections import defaultdict
from typing import Any

import numpy as np
import pynvml

from pipeline.sources.nvml import NvmlAgent, _field_value


def _const(name: str) -> int | None:
    return getattr(pynvml, name, None)


# key in the inventory -> (pynvml function, the names of its constant arguments)
CALLS: dict[str, tuple[str, tuple[str, ...]]] = {
    "name": ("nvmlDeviceGetName", ()),
    "uuid": ("nvmlDeviceGetUUID", ()),
    "serial": ("nvmlDeviceGetSerial", ()),
    "board_part_number": ("nvmlDeviceGetBoardPartNumber", ()),
    "vbios": ("nvmlDeviceGetVbiosVersion", ()),
    "pci_info": ("nvmlDeviceGetPciInfo", ()),
    "architecture": ("nvmlDeviceGetArchitecture", ()),
    "cuda_compute_capability": ("nvmlDeviceGetCudaComputeCapability", ()),
    "temperature_gpu": ("nvmlDeviceGetTemperature", ("NVML_TEMPERATURE_GPU",)),
    "temp_threshold_slowdown": ("nvmlDeviceGetTemperatureThreshold", ("NVML_TEMPERATURE_THRESHOLD_SLOWDOWN",)),
    "temp_threshold_shutdown": ("nvmlDeviceGetTemperatureThreshold", ("NVML_TEMPERATURE_THRESHOLD_SHUTDOWN",)),
    "temp_threshold_gpu_max": ("nvmlDeviceGetTemperatureThreshold", ("NVML_TEMPERATURE_THRESHOLD_GPU_MAX",)),
    "temp_threshold_mem_max": ("nvmlDeviceGetTemperatureThreshold", ("NVML_TEMPERATURE_THRESHOLD_MEM_MAX",)),
    "clock_sm": ("nvmlDeviceGetClockInfo", ("NVML_CLOCK_SM",)),
    "clock_mem": ("nvmlDeviceGetClockInfo", ("NVML_CLOCK_MEM",)),
    "clock_graphics": ("nvmlDeviceGetClockInfo", ("NVML_CLOCK_GRAPHICS",)),
    "max_clock_sm": ("nvmlDeviceGetMaxClockInfo", ("NVML_CLOCK_SM",)),
    "max_clock_mem": ("nvmlDeviceGetMaxClockInfo", ("NVML_CLOCK_MEM",)),
    "utilization": ("nvmlDeviceGetUtilizationRates", ()),
    "memory_info": ("nvmlDeviceGetMemoryInfo", ()),
    "bar1_memory_info": ("nvmlDeviceGetBAR1MemoryInfo", ()),
    "clocks_event_reasons": ("nvmlDeviceGetCurrentClocksEventReasons", ()),
    "supported_clocks_event_reasons": ("nvmlDeviceGetSupportedClocksEventReasons", ()),
    "pstate": ("nvmlDeviceGetPerformanceState", ()),
    "fan_speed": ("nvmlDeviceGetFanSpeed", ()),
    "power_usage_mw": ("nvmlDeviceGetPowerUsage", ()),
    "total_energy_mj": ("nvmlDeviceGetTotalEnergyConsumption", ()),
    "power_limit_constraints_mw": ("nvmlDeviceGetPowerManagementLimitConstraints", ()),
    "power_limit_default_mw": ("nvmlDeviceGetPowerManagementDefaultLimit", ()),
    "power_limit_mw": ("nvmlDeviceGetPowerManagementLimit", ()),
    "enforced_power_limit_mw": ("nvmlDeviceGetEnforcedPowerLimit", ()),
    "violation_power": ("nvmlDeviceGetViolationStatus", ("NVML_PERF_POLICY_POWER",)),
    "violation_thermal": ("nvmlDeviceGetViolationStatus", ("NVML_PERF_POLICY_THERMAL",)),
    "pcie_replay_counter": ("nvmlDeviceGetPcieReplayCounter", ()),
    "pcie_link_gen": ("nvmlDeviceGetCurrPcieLinkGeneration", ()),
    "pcie_link_width": ("nvmlDeviceGetCurrPcieLinkWidth", ()),
    "pcie_max_link_gen": ("nvmlDeviceGetMaxPcieLinkGeneration", ()),
    "pcie_max_link_width": ("nvmlDeviceGetMaxPcieLinkWidth", ()),
    "pcie_tx_kbps": ("nvmlDeviceGetPcieThroughput", ("NVML_PCIE_UTIL_TX_BYTES",)),
    "pcie_rx_kbps": ("nvmlDeviceGetPcieThroughput", ("NVML_PCIE_UTIL_RX_BYTES",)),
    "remapped_rows": ("nvmlDeviceGetRemappedRows", ()),
    "ecc_mode": ("nvmlDeviceGetEccMode", ()),
    "ecc_volatile_corrected": ("nvmlDeviceGetTotalEccErrors", ("NVML_MEMORY_ERROR_TYPE_CORRECTED", "NVML_VOLATILE_ECC")),
    "ecc_volatile_uncorrected": ("nvmlDeviceGetTotalEccErrors",
                                 ("NVML_MEMORY_ERROR_TYPE_UNCORRECTED", "NVML_VOLATILE_ECC")),
    "ecc_aggregate_corrected": ("nvmlDeviceGetTotalEccErrors",
                                ("NVML_MEMORY_ERROR_TYPE_CORRECTED", "NVML_AGGREGATE_ECC")),
    "ecc_aggregate_uncorrected": ("nvmlDeviceGetTotalEccErrors",
                                  ("NVML_MEMORY_ERROR_TYPE_UNCORRECTED", "NVML_AGGREGATE_ECC")),
    "retired_pages_dbe": ("nvmlDeviceGetRetiredPages", ("NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR",)),
    "persistence_mode": ("nvmlDeviceGetPersistenceMode", ()),
    "compute_mode": ("nvmlDeviceGetComputeMode", ()),
    "mig_mode": ("nvmlDeviceGetMigMode", ()),
    "numa_node": ("nvmlDeviceGetNumaNodeId", ()),
    "nvlink0_state": ("nvmlDeviceGetNvLinkState", ("0",)),
}

# The field ids of the H100 recording's inventory (the agent's, the DCGM counters' and a few more).
FIELDS = ("NVML_FI_DEV_MEMORY_TEMP", "NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "NVML_FI_DEV_POWER_INSTANT",
          "NVML_FI_DEV_POWER_AVERAGE", "NVML_FI_DEV_PCIE_REPLAY_COUNTER", "NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
          "NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", "NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL",
          "NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", "NVML_FI_DEV_NVLINK_BANDWIDTH_C0_TOTAL",
          "NVML_FI_DEV_REMAPPED_COR", "NVML_FI_DEV_REMAPPED_UNC", "NVML_FI_DEV_REMAPPED_PENDING",
          "NVML_FI_DEV_REMAPPED_FAILURE", "NVML_FI_DEV_ECC_SBE_VOL_TOTAL", "NVML_FI_DEV_ECC_DBE_VOL_TOTAL",
          "NVML_FI_DEV_ECC_SBE_AGG_TOTAL", "NVML_FI_DEV_ECC_DBE_AGG_TOTAL", "NVML_FI_DEV_PERF_POLICY_POWER",
          "NVML_FI_DEV_PERF_POLICY_THERMAL", "NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP",
          "NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN", "NVML_FI_DEV_NVLINK_LINK_COUNT",
          "NVML_FI_DEV_PCIE_COUNT_CORRECTABLE_ERRORS", "NVML_FI_DEV_PCIE_COUNT_NAKS_RECEIVED", "NVML_FI_DEV_RETIRED_SBE",
          "NVML_FI_DEV_RETIRED_DBE", "NVML_FI_DEV_RETIRED_PENDING", "NVML_FI_DEV_C2C_LINK_COUNT",
          "NVML_FI_DEV_POWER_CURRENT_LIMIT")

# The load trace's field-value columns (the replay's names: sources/nvml_replay.py's _TRACE_FIELDS).
_TRACE_FIELDS = {"fv_82": "NVML_FI_DEV_MEMORY_TEMP", "fv_143": "NVML_FI_DEV_REMAPPED_UNC",
                 "ecc_sbe_vol": "NVML_FI_DEV_ECC_SBE_VOL_TOTAL", "ecc_dbe_vol": "NVML_FI_DEV_ECC_DBE_VOL_TOTAL"}


def scrub(text: str, host: str | None = None) -> str:
    """A GPU's identifiers and the host's name replaced by placeholders, as in the shipped
    recordings: what a recording or a check writes can be shared."""
    text = re.sub(r"GPU-[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", "GPU-00000000-0000-4000-8000-000000000001",
                  text)
    text = re.sub(r"(Serial Number\s*:\s*)\S+", r"\g<1>0000000000001", text)
    text = re.sub(r'("serial": )"[^"]*"', r'\g<1>"0000000000001"', text)
    text = re.sub(r"(GPU PDI\s*:\s*)\S+", r"\g<1>0x0000000000000000", text)
    host = socket.gethostname() if host is None else host
    for name in {host, host.split(".")[0]} - {""}:  # where a host's name is written: never a bare word, which may
        h = re.escape(name)                          # be any word ("gpu", "node") of the text
        text = re.sub(rf'Hostname="{h}"', 'Hostname="gpu-node"', text)
        text = re.sub(rf'("(node|host|hostname)": ?)"{h}"', r'\g<1>"gpu-node"', text)
        text = re.sub(rf"\b(on|host|node) {h}(?=[\s:/,.)]|$)", r"\g<1> gpu-node", text)
    return text


def jsonable(v: Any) -> Any:
    """An NVML answer as JSON: structures as objects of their fields, bytes as text."""
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, ctypes.Structure):
        return {f[0]: jsonable(getattr(v, f[0])) for f in v._fields_}
    if isinstance(v, (ctypes.Array, list, tuple)):
        return [jsonable(x) for x in v]
    return v


def _args(names: tuple[str, ...]) -> tuple | None:
    out = []
    for n in names:
        value = int(n) if n.isdigit() else _const(n)
        if value is None:
            return None
        out.append(value)
    return tuple(out)


def _answer(fn, handle, args: tuple, tries: int = 3) -> dict:
    """{ok, value, us}: the answer (or the error as the replay reads it) and the median latency."""
    spent, value, ok = [], None, True
    for _ in range(tries):
        t0 = time.perf_counter()
        try:
            value = jsonable(fn(handle, *args))
            ok = True
        except pynvml.NVMLError as e:
            value, ok = f"NVMLError: {e}", False
        spent.append((time.perf_counter() - t0) * 1e6)
    return {"ok": ok, "value": value, "us": round(statistics.median(spent), 1)}


def inventory(handle) -> dict:
    """Everything the replay reads of one GPU but its traces (`scrape_us` and `trace_rows` are
    the caller's to add)."""
    support: dict[str, dict] = {}
    errors: list[str] = []
    for key, (name, arg_names) in CALLS.items():
        fn, args = getattr(pynvml, name, None), _args(arg_names)
        if fn is None or args is None:
            errors.append(f"{key}: {name} or its arguments are not in this nvidia-ml-py")
            continue
        support[key] = _answer(fn, handle, args)
    ids = [(n, _const(n)) for n in FIELDS if _const(n) is not None]
    t0 = time.perf_counter()
    values = pynvml.nvmlDeviceGetFieldValues(handle, [fid for _, fid in ids])
    call_us = (time.perf_counter() - t0) * 1e6
    fields = {}
    for (n, _), fv in zip(ids, values):
        fields[n] = {"ret": int(fv.nvmlReturn), "type": int(fv.valueType),
                     "value": _field_value(fv) if fv.nvmlReturn == 0 else None,
                     "ts_us": int(fv.timestamp), "latency_us": int(fv.latencyUsec)}
    return {"errors": errors, "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
            "nvml_version": _or_error(lambda: _text(pynvml.nvmlSystemGetNVMLVersion())),
            "cuda_driver_version": _or_error(pynvml.nvmlSystemGetCudaDriverVersion),
            "count": pynvml.nvmlDeviceGetCount(),
            "support": support, "field_values": fields, "field_values_call_us": round(call_us, 1),
            "supported_event_types": pynvml.nvmlDeviceGetSupportedEventTypes(handle),
            "event_wait": _event_wait(handle)}


def _or_error(call):
    try:
        return call()
    except pynvml.NVMLError as e:
        return f"NVMLError: {e}"


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _event_wait(handle) -> str:
    """What a 100 ms wait for an XID event answers (no event: a timeout)."""
    events = pynvml.nvmlEventSetCreate()
    try:
        pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, events)
        data = pynvml.nvmlEventSetWait_v2(events, 100)
        return f"event {data.eventType}: {data.eventData}"
    except pynvml.NVMLError as e:
        return f"NVMLError: {e}"
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlEventSetFree(events)


def trace_row(handle) -> dict:
    """One row of the load trace, in the replay's columns (the H100 recording's)."""
    util = pynvml.nvmlDeviceGetUtilizationRates(handle)
    row = {"power_mw": pynvml.nvmlDeviceGetPowerUsage(handle),
           "energy_mj": pynvml.nvmlDeviceGetTotalEnergyConsumption(handle),
           "temp_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
           "util_gpu": util.gpu, "util_mem": util.memory,
           "mem_used_b": pynvml.nvmlDeviceGetMemoryInfo(handle).used,
           "sm_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
           "mem_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
           "throttle": pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle),
           "pstate": pynvml.nvmlDeviceGetPerformanceState(handle),
           "pcie_replay": pynvml.nvmlDeviceGetPcieReplayCounter(handle)}
    names = list(_TRACE_FIELDS)
    for key, fv in zip(names, pynvml.nvmlDeviceGetFieldValues(handle, [getattr(pynvml, _TRACE_FIELDS[k])
                                                                       for k in names])):
        row[key] = int(_field_value(fv)) if fv.nvmlReturn == 0 else 0
    return {k: int(v) for k, v in row.items()}


def timed_scrapes(agent: NvmlAgent, n: int, period_s: float) -> dict:
    """`n` of the agent's scrapes, each NVML function it calls timed: the scrape's latency (the
    inventory's `scrape_us`) and, for the slowest scrapes, which calls took the time."""
    spent: dict[str, list[float]] = defaultdict(list)
    per_scrape: list[dict[str, float]] = []
    originals = {name: getattr(pynvml, name) for name in dir(pynvml)
                 if name.startswith("nvmlDevice") and callable(getattr(pynvml, name))}

    def timed(name, fn):
        def call(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                us = (time.perf_counter() - t0) * 1e6
                spent[name].append(us)
                per_scrape[-1][name] = per_scrape[-1].get(name, 0.0) + us
        return call

    scrape_us = []
    try:
        for name, fn in originals.items():
            setattr(pynvml, name, timed(name, fn))
        for _ in range(n):
            per_scrape.append({})
            t0 = time.perf_counter()
            agent.scrape()
            scrape_us.append((time.perf_counter() - t0) * 1e6)
            time.sleep(period_s)
    finally:
        for name, fn in originals.items():
            setattr(pynvml, name, fn)
    xs = np.array(scrape_us)
    slowest = sorted(range(n), key=lambda i: -scrape_us[i])[:3]
    return {"scrape_us": {"min": float(xs.min()), "p50": float(np.percentile(xs, 50)),
                          "p99": float(np.percentile(xs, 99)), "max": float(xs.max()),
                          "calls_per_scrape": round(sum(len(v) for v in spent.values()) / n, 1)},
            "calls_us": {k: {"count": len(v), "p50": round(float(np.percentile(v, 50)), 1),
                             "p99": round(float(np.percentile(v, 99)), 1), "max": round(max(v), 1)}
                         for k, v in sorted(spent.items())},
            "slowest": [{"scrape": i, "us": round(scrape_us[i], 1),
                         "calls_us": {k: round(v, 1) for k, v in sorted(per_scrape[i].items(), key=lambda x: -x[1])[:3]}}
                        for i in slowest]}
