"""The NVML agent's GPUs on /metrics under dcgm-exporter's names, units and labels, so that
DCGM dashboards and alert rules work on a node that runs only Fleetwatch (but for what NVML cannot
read: DCGM's profiling fields, DCGM_FI_PROF_*, and bandwidth and codec counters we keep no column of).

A prometheus_client collector (the agent's build adds it to ctx.collectors, which the
process's HTTP server serves). It renders the agent's latest scrape through the counters
table (sources/dcgm_fields.py), converting back to DCGM's units (J -> mJ, 0-1 -> %,
bytes -> MiB), one series per GPU with dcgm-exporter's labels `gpu`, `UUID`, `pci_bus_id`,
`device`, `modelName`, `Hostname`, `DCGM_FI_DRIVER_VERSION`. A null column (the GPU does not
support it) is no series, as dcgm-exporter leaves out what DCGM cannot read. With a job map
(agent.job_mapping_dir) a GPU's series carry `hpc_job` as dcgm-exporter's does with its
`--hpc-job-mapping-dir`: one series per job, so `sum by (hpc_job)` works on either; a GPU
without a job has it empty (to Prometheus, no label), and a node whose GPUs have no job at
all serves no `hpc_job` label.
`DCGM_FI_DEV_XID_ERRORS` is the last XID the agent saw (0 before any), `DCGM_EXP_XID_ERRORS_TOTAL`
how many of each it saw since it started (a series per `xid`, as dcgm-exporter's: an XID that
repeats shows there), `DCGM_FI_DEV_FB_FREE` the memory total NVML reported at start minus what
is used.

Every DCGM name is served as a gauge: prometheus_client's encoders would rename a counter's
series to NAME_total (and OpenMetrics requires it), which would break the names; PromQL's
rate() and increase() work on either type. Fleetwatch's own extras:

  fleetwatch_gpu_info{<DCGM labels>, site, rack, node, serial, hpc_job} 1
                                     (hpc_job: the GPU's jobs, comma-separated, from
                                     agent.job_mapping_dir; empty without one)
  fleetwatch_gpu_sample_timestamp_seconds{<DCGM labels>}       when the agent read the GPU
"""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from collections import Counter

from pipeline.sources.dcgm_fields import FB_FREE, FIELDS, LABELS, MIB, XID, XID_TOTAL

_SERVED = [f for f in FIELDS if f.column]
_FB_FREE_HELP = next(f.help for f in FIELDS if f.name == FB_FREE)
_XID_HELP = next(f.help for f in FIELDS if f.name == XID)
_XID_TOTAL_HELP = next(f.help for f in FIELDS if f.name == XID_TOTAL)
INFO_LABELS = (*LABELS, "site", "rack", "node", "serial", "hpc_job")


def _floats(batch: pa.RecordBatch, column: str) -> np.ndarray:
    """A column as float64, null -> NaN (booleans 0/1)."""
    col = batch.column(column)
    if pa.types.is_boolean(col.type):
        col = col.cast(pa.int8())
    return col.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)


def exposition_value(x: float) -> float:
    """A converted value without float noise (29.000000000000004 % -> 29): 15 significant
    digits, which keeps every reading the agent takes (the round trip is tested)."""
    return float(f"{x:.15g}")


class GpuExposition:
    def __init__(self, stale_after_s: float = 60.0, clock=time.time) -> None:
        # A GPU read longer ago than this is served no more: when no GPU answers at all no scrape replaces the
        # snapshot, and the last readings had been served for ever (a lost GPU goes at once: forget())
        self.stale_after_s, self.clock = stale_after_s, clock
        # (labels, values, ts, info, uuids, jobs), swapped whole: collect() may run on another thread
        # (no GPUs read yet: every family empty; /metrics is scraped from the daemon's start)
        self._snapshot: tuple = ([], {name: np.empty(0) for name in (*(f.name for f in _SERVED), FB_FREE)}, [], [], [],
                                 [])
        self._xid: dict[str, int] = {}
        self._xid_total: Counter[tuple[str, int]] = Counter()  # (UUID, XID) -> XIDs seen
        self.fb_total_bytes: dict[str, float] = {}  # per UUID, from NVML at start

    def update(self, batch: pa.RecordBatch) -> None:
        """The agent's latest scrape (one row per GPU that answered)."""
        n = batch.num_rows
        gpu = batch.column("gpu").to_pylist()
        uuids = batch.column("gpu_uuid").to_pylist()
        text = {c: pc.fill_null(batch.column(c), "").to_pylist() for c in ("pci_bus_id", "model", "driver_version",
                                                                          "node", "site", "rack", "serial", "job")}
        labels = [(str(gpu[i]), uuids[i], text["pci_bus_id"][i], f"nvidia{gpu[i]}", text["model"][i],
                   text["node"][i], text["driver_version"][i]) for i in range(n)]
        info = [(*labels[i], text["site"][i], text["rack"][i], text["node"][i], text["serial"][i], text["job"][i])
                for i in range(n)]
        values = {f.name: f.from_column(_floats(batch, f.column)) for f in _SERVED}
        used = _floats(batch, "mem_used_bytes")
        total = np.array([self.fb_total_bytes.get(u, np.nan) for u in uuids], np.float64)
        values[FB_FREE] = (total - used) / MIB
        ts = (batch.column("ts").cast(pa.int64()).to_numpy() / 1e9).tolist()
        jobs = [[j for j in text["job"][i].split(",") if j] for i in range(n)]
        self._snapshot = (labels, values, ts, info, uuids, jobs)

    def xid(self, uuid: str, code: int) -> None:
        self._xid[uuid] = int(code)
        self._xid_total[uuid, int(code)] += 1

    def forget(self, uuid: str) -> None:
        """A GPU that is lost: its series go (the agent no longer reads it)."""
        labels, values, ts, info, uuids, jobs = self._snapshot
        keep = [i for i, u in enumerate(uuids) if u != uuid]
        self._snapshot = ([labels[i] for i in keep], {k: v[keep] for k, v in values.items()},
                          [ts[i] for i in keep], [info[i] for i in keep], [uuids[i] for i in keep],
                          [jobs[i] for i in keep])

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        labels, values, ts, info, uuids, jobs = self._snapshot
        if ts and min(ts) < self.clock() - self.stale_after_s:
            keep = [i for i, t in enumerate(ts) if t >= self.clock() - self.stale_after_s]
            labels, values, ts, info, uuids, jobs = ([labels[i] for i in keep], {k: v[keep] for k, v in values.items()},
                                                     [ts[i] for i in keep], [info[i] for i in keep],
                                                     [uuids[i] for i in keep], [jobs[i] for i in keep])
        # Each GPU's series: one per job when any GPU here has one (dcgm-exporter's hpc_job), else one.
        mapped = any(jobs)
        names = (*LABELS, "hpc_job") if mapped else LABELS
        series = [[(*lv, j) for j in (js or [""])] if mapped else [lv] for lv, js in zip(labels, jobs)]

        def family(name: str, help_: str, per_gpu) -> GaugeMetricFamily:
            out = GaugeMetricFamily(name, help_, labels=names)
            for ls, x in zip(series, per_gpu):
                if math.isfinite(x):
                    for lv in ls:
                        out.add_metric(lv, exposition_value(x))
            return out
        out = [family(f.name, f.help, values[f.name].tolist()) for f in _SERVED]
        out.append(family(FB_FREE, _FB_FREE_HELP, values[FB_FREE].tolist()))
        out.append(family(XID, _XID_HELP, [float(self._xid.get(u, 0)) for u in uuids]))
        totals = GaugeMetricFamily(XID_TOTAL, _XID_TOTAL_HELP, labels=(*names, "xid"))
        row = {u: i for i, u in enumerate(uuids)}
        for (uuid, code), n in sorted(self._xid_total.items()):
            for lv in series[row[uuid]] if uuid in row else ():
                totals.add_metric((*lv, str(code)), n)
        out.append(totals)
        gpu_info = GaugeMetricFamily("fleetwatch_gpu_info", "the GPU's identity and place in Fleetwatch's data",
                                     labels=INFO_LABELS)
        for lv in info:
            gpu_info.add_metric(lv, 1)
        stamp = GaugeMetricFamily("fleetwatch_gpu_sample_timestamp_seconds",
                                  "when the agent last read the GPU (unix seconds)", labels=LABELS)
        for lv, t in zip(labels, ts):
            stamp.add_metric(lv, t)
        return [*out, gpu_info, stamp]
