"""What the power role says about each request: its report row, and the requests' status.

Each request, when over (its caps all restored), is one `power_request_report` row
(model.POWER_REQUEST_REPORT: `report_row`, from the role's `Tracked` record of it), sent on
fleetwatch.power.reports and archived as `power_requests`; `fleetwatch power report` reads
them back, a row in one line each (`summary`, as the role logs it). Also one that never ran:
cancelled before its start, or over while the role was down (null where nothing was
measured). `status_doc` is every stored request with its state and the role's live numbers
(power/store.py), for `fleetwatch power status --json` and GET /power/requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.model import POWER_REQUEST_REPORT
from pipeline.power.controller import Outcome
from pipeline.power.request import PowerRequest
from pipeline.power.store import Entry, RequestStore

TFLOPS_PER_GPU = 989.0  # H100 SXM dense BF16 at full work: a full-load GPU-hour is 989 x 3600 TFLOP


@dataclass
class Tracked:
    """A request the role judged, and what it measures of it beyond the controller's Outcome."""
    entry: Entry
    req: PowerRequest | None = None
    outcome: Outcome | None = None
    state: str = "pending"
    reason: str = ""
    cancelled: bool = False
    lost_gpu_h: float = 0.0       # the caps' cost, integrated over the request's steps
    uniform_gpu_h: float = 0.0    # one cap on every covered GPU for the same watts, same steps
    alert: Any = None             # the firing PowerTargetMissed
    reported: bool = False
    unseen: bool = False          # over while the role was down: neither what it achieved nor what it cost is known
    final: dict[str, Any] | None = None  # its live numbers when reported (the outcome is dropped then)
    extra: dict[str, Any] = field(default_factory=dict)


def report_row(t: Tracked, now: datetime, dry_run: bool) -> dict[str, Any]:
    """One request's power_request_report row (model.POWER_REQUEST_REPORT): null where nothing was
    measured (not started: no reduction; over while the role was down, `unseen`: nor its cost)."""
    req, o = t.req, t.outcome
    held = [kw for _, kw in o.hold()] if o is not None else []
    every = (o.shed_kw or o.achieved_kw) if o is not None else []  # the energy: every reading from the start
    times = np.array([s for s, _ in every])
    energy = None
    if every:
        spacing = np.diff(times, append=times[-1] + (float(np.median(np.diff(times))) if len(times) > 1 else 1.0))
        energy = float(np.sum(np.array([kw for _, kw in every]) * spacing)) / 3600.0
    means = o.minute_means() if o is not None else []
    started = o is not None and o.baseline_kw is not None and not math.isnan(o.baseline_kw)
    met = bool(started and o.met and not t.cancelled and "silent" not in t.extra)  # (a gap: not verified)
    return {
        "ts": now, "id": req.id, "site": req.site, "racks": ",".join(req.racks) or None, "source": req.source,
        "start": t.extra.get("asked_start", req.start), "end": req.end, "ramp_s": req.ramp_s, "target_kw": req.target_kw,
        "requested_kw": o.requested_kw if started else None, "baseline_kw": o.baseline_kw if started else None,
        "reached_s": o.reached_s if o is not None else None,
        "reduction_p50_kw": float(np.median(held)) if held else None,
        "reduction_min_kw": min(means) if means else None, "energy_curtailed_kwh": energy,
        "gpus_capped": None if t.unseen else o.gpus_capped if started else 0,
        "throughput_lost_gpu_h": None if t.unseen else t.lost_gpu_h,
        "throughput_lost_tflop": None if t.unseen else t.lost_gpu_h * 3600.0 * TFLOPS_PER_GPU,
        "uniform_lost_gpu_h": None if t.unseen else t.uniform_gpu_h,
        "restore_peak_kw": max(o.restoring_kw) if o is not None and o.restoring_kw else None,
        "met": met, "state": "cancelled" if t.state == "cancelled" else "done",
        "missed_reason": None if met else (t.reason or None), "dry_run": dry_run,
    }


def report_batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(rows, schema=POWER_REQUEST_REPORT)


def summary(row: dict[str, Any]) -> str:
    """A report row in one line (the log, `fleetwatch power report`)."""
    def f(x, unit, digits=1):
        return "-" if x is None else f"{x:.{digits}f}{unit}"
    return (f"{'met' if row['met'] else 'NOT met'}; asked {f(row['requested_kw'], ' kW')} from "
            f"{f(row['baseline_kw'], ' kW')}, reached in {f(row['reached_s'], ' s', 0)}, held p50 "
            f"{f(row['reduction_p50_kw'], ' kW')} min {f(row['reduction_min_kw'], ' kW')}, "
            f"{f(row['energy_curtailed_kwh'], ' kWh', 2)} curtailed, {f(row['gpus_capped'], '', 0)} GPUs capped, "
            f"{f(row['throughput_lost_gpu_h'], ' GPU-h', 2)} lost (uniform capping "
            f"{f(row['uniform_lost_gpu_h'], ' GPU-h', 2)}), restore peak {f(row['restore_peak_kw'], ' kW')}"
            + (f"; {row['missed_reason']}" if row.get("missed_reason") else ""))


def status_doc(store: RequestStore) -> dict[str, Any]:
    """Every stored request with its state, and the role's live numbers where it wrote them
    (`fleetwatch power status --json`, GET /power/requests)."""
    store.refresh()
    live = store.status()
    numbers = live.get("requests", {})
    requests = []
    for e in store.entries():
        row = {"id": e.id, **e.request, "state": e.state, "reason": e.reason, "submitted": e.submitted,
               "cancelled": e.cancelled or None}
        row.update({k: v for k, v in numbers.get(e.id, {}).items() if k not in ("state", "reason")})
        requests.append(row)
    return {"role": {k: v for k, v in live.items() if k != "requests"} or None, "requests": requests}
