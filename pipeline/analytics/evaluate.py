"""`fleetwatch eval`: run the simulated fleet with faults injected, score the alerts
against the ground-truth labels.

A fault counts as detected when an alert named for its type (faults.py) fires on
its target (the GPU, the node, or the rack) between its start and its end plus
a grace period. Time to detect is from injection to the alert's start. An alert
that matches no fault is a false alert; one raised by a normal event (a GPU
reset; with the realistic normal, a node's rolling reboot or driver upgrade) is
false too, and counted by that event when it fires on the event's target during
it. Faults that started too close to the end of the run to be detectable (their
score window runs past the end) are left out, and counted; so are faults without a
signature, that nothing could have told from healthy by the simulator's own truth (a
stuck power sensor on a GPU whose draw never left the frozen reading by more than about
a watt: FleetSimulator.without_signature). An alert on one is explained, not false.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from pipeline.bus import Message, Topic
from pipeline.config import Config
from pipeline.detect.catalog import ALERTS
from pipeline.detect.engine import Engine
from pipeline.faults import FAULTS, FAULTS_BY_NAME
from pipeline.sources.simulate import FleetSimulator

EVAL_EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)
POWER_ALERTS = {spec.name for spec in ALERTS if spec.family == "power"}
GRACE_S = 60.0


@dataclass
class EvalRun:
    labels: list[dict[str, Any]]
    alerts: list[dict[str, Any]]   # alerts raised: labels, starts_at, ends_at (None while firing)
    end: datetime
    node_hours: float
    gpu_samples: int
    demand_response: dict[str, Any] | None = None
    normal: str = "simple"         # the simulator's normal (fleet.normal)
    without_signature: frozenset[int] = frozenset()  # fault ids: nothing could tell them from healthy
    nodes: dict[str, str] = field(default_factory=dict)  # node -> rack: the simulated fleet


# `fleetwatch eval --rack-cooling-loss`: a whole rack loses most of its cooling a quarter of the
# way in, for up to 30 min: every node of it runs hot (the remediation breaker's scenario).
RACK_COOLING_LOSS = {"kind": "rack_cooling_degraded", "rack": 0, "params": {"extra_c": 40.0, "rate_c_per_s": 0.2}}


def rack_cooling_loss(duration_s: float) -> tuple[float, dict]:
    return duration_s / 4, {**RACK_COOLING_LOSS, "duration_s": min(1800.0, duration_s / 2)}


def simulate(cfg: Config, duration_s: float, power_requests: int = 0,
             injections: tuple[tuple[float, dict], ...] = ()) -> EvalRun:
    """Drive simulator and engine in lock step, as fast as the CPU allows; with
    `power_requests`, demand-response events too (analytics/demand_response.py); each of
    `injections` (seconds in, FleetSimulator.inject's arguments) starts a fault then."""
    engine = Engine(cfg)
    sim = FleetSimulator(cfg.fleet, start=EVAL_EPOCH)
    pending = sorted(injections, key=lambda i: i[0])
    dr = None
    if power_requests:
        from pipeline.analytics.demand_response import DemandResponse
        dr = DemandResponse(cfg, sim, duration_s, power_requests)
    labels: list[dict[str, Any]] = []
    alerts: list[dict[str, Any]] = []
    firing: dict[str, dict[str, Any]] = {}  # fingerprint -> its alert while it fires
    for i in range(int(round(duration_s / cfg.fleet.sample_interval_s))):
        while pending and pending[0][0] <= i * cfg.fleet.sample_interval_s:
            sim.inject(**pending.pop(0)[1])
        tick = sim.step()
        if dr is not None:
            dr.tick(tick.gpu, tick.facility)
        if tick.labels is not None:
            labels.extend(tick.labels.to_pylist())
        for topic, batch in ((Topic.GPU, tick.gpu), (Topic.FACILITY, tick.facility), (Topic.EVENTS, tick.events)):
            if batch is None:
                continue
            changes = engine.process(Message(topic, batch)).alerts
            if dr is not None and changes:
                dr.alerts(alert for _, alert in changes)
            for _, alert in changes:
                if alert.ends_at is None:
                    firing[alert.fingerprint] = {"labels": dict(alert.labels), "starts_at": alert.starts_at,
                                                 "ends_at": None, "remediation": alert.annotations.get("remediation")}
                    alerts.append(firing[alert.fingerprint])
                elif alert.fingerprint in firing:
                    firing.pop(alert.fingerprint)["ends_at"] = alert.ends_at
    return EvalRun(labels, alerts, sim.now, sim.n_nodes * duration_s / 3600.0, engine.stats.gpu_samples,
                   dr.score() if dr is not None else None, cfg.fleet.normal, frozenset(sim.without_signature()),
                   sim.node_racks())


def _targets(label: dict[str, Any], alert_labels: dict[str, str]) -> bool:
    if alert_labels.get("rack") != label["rack"]:
        return False
    if label["node"] is not None and alert_labels.get("node") != label["node"]:
        return False
    if label["gpu"] is not None and alert_labels.get("gpu") != str(label["gpu"]):
        return False
    return True


def _window(label: dict[str, Any], end: datetime) -> tuple[datetime, datetime]:
    return label["start"], min(label["end"], end) + timedelta(seconds=GRACE_S)


def explains(fault: dict[str, Any], alert: dict[str, Any], end: datetime) -> bool:
    """The alert for the fault's type and target fired in its window, or was still firing
    when it started (a fault right after another on the same target is, to the operator,
    the alert they already have; a node's clock that runs behind starts it a little early)."""
    lo, hi = _window(fault, end)
    return (alert["labels"]["alertname"] in FAULTS_BY_NAME[fault["fault_type"]].alertnames
            and _targets(fault, alert["labels"]) and alert["starts_at"] <= hi
            and (alert["starts_at"] >= lo or alert["ends_at"] is None or alert["ends_at"] >= fault["start"]))


def score(run: EvalRun) -> dict[str, Any]:
    # Demand response's own alerts (a cap that saves nothing) are no fault's: scored with it.
    power = [a for a in run.alerts if a["labels"]["alertname"] in POWER_ALERTS]
    run = replace(run, alerts=[a for a in run.alerts if a["labels"]["alertname"] not in POWER_ALERTS])
    faults = [lab for lab in run.labels if not lab["normal"]]
    in_time = [f for f in faults
               if f["start"] + timedelta(seconds=FAULTS_BY_NAME[f["fault_type"]].score_window_s) <= run.end]
    scored = [f for f in in_time if f["fault_id"] not in run.without_signature]

    explained = [any(explains(f, a, run.end) for f in faults) for a in run.alerts]
    per_type: dict[str, Any] = {}
    for ftype in FAULTS:
        mine = [f for f in scored if f["fault_type"] == ftype.name]
        ttds = []
        for f in mine:
            hits = [(a["starts_at"] - f["start"]).total_seconds() for a in run.alerts if explains(f, a, run.end)]
            if hits:
                ttds.append(max(0.0, min(hits)))
        named = [(a, ok) for a, ok in zip(run.alerts, explained) if a["labels"]["alertname"] in ftype.alertnames]
        true_pos = sum(any(explains(f, a, run.end) for f in faults if f["fault_type"] == ftype.name) for a, _ in named)
        false_pos = sum(not ok for _, ok in named)
        per_type[ftype.name] = {
            "injected": len(mine),
            "without_signature": sum(f["fault_type"] == ftype.name for f in in_time) - len(mine),
            "detected": len(ttds),
            "recall": round(len(ttds) / len(mine), 4) if mine else None,
            "precision": round(true_pos / (true_pos + false_pos), 4) if true_pos + false_pos else None,
            "ttd_p50_s": round(float(np.percentile(ttds, 50)), 2) if ttds else None,
            "ttd_p99_s": round(float(np.percentile(ttds, 99)), 2) if ttds else None,
        }
    false_alerts = [a for a, ok in zip(run.alerts, explained) if not ok]
    by_name: dict[str, int] = {}
    for a in false_alerts:
        by_name[a["labels"]["alertname"]] = by_name.get(a["labels"]["alertname"], 0) + 1
    normal = [lab for lab in run.labels if lab["normal"]]
    by_event: dict[str, int] = {}
    for a in false_alerts:  # raised on a normal event's target while it lasted
        lab = next((lab for lab in normal if _targets(lab, a["labels"])
                    and _window(lab, run.end)[0] <= a["starts_at"] <= _window(lab, run.end)[1]), None)
        if lab is not None:
            by_event[lab["fault_type"]] = by_event.get(lab["fault_type"], 0) + 1
    events: dict[str, int] = {}
    for lab in normal:
        events[lab["fault_type"]] = events.get(lab["fault_type"], 0) + 1
    return {
        "normal": run.normal,
        "faults": per_type,
        "false_alerts": len(false_alerts),
        "false_alerts_by_alertname": dict(sorted(by_name.items())),
        "false_alerts_by_normal_event": dict(sorted(by_event.items())),
        "false_alerts_per_1000_node_hours": round(1000.0 * len(false_alerts) / run.node_hours, 3),
        "node_hours": round(run.node_hours, 3),
        "alerts": len(run.alerts),
        "faults_not_scored": len(faults) - len(in_time),
        "faults_without_signature": len(in_time) - len(scored),
        "normal_events": len(normal),
        "normal_events_by_type": dict(sorted(events.items())),
        "gpu_samples": run.gpu_samples,
        **({"demand_response": {**run.demand_response, "cap_not_binding_alerts": len(power)}}
           if run.demand_response is not None else {}),
    }


def table(result: dict[str, Any]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)
    lines = [f"{'fault type':22s} {'injected':>8s} {'detected':>8s} {'recall':>7s} {'precision':>9s} "
             f"{'ttd p50 s':>9s} {'ttd p99 s':>9s}"]
    for name, r in result["faults"].items():
        lines.append(f"{name:22s} {r['injected']:8d} {r['detected']:8d} {f(r['recall'], '.3f'):>7s} "
                     f"{f(r['precision'], '.3f'):>9s} {f(r['ttd_p50_s'], '.1f'):>9s} {f(r['ttd_p99_s'], '.1f'):>9s}")
    lines.append(f"false alerts: {result['false_alerts']} over {result['node_hours']:.1f} node-hours = "
                 f"{result['false_alerts_per_1000_node_hours']:.2f} per 1000 node-hours "
                 f"{json.dumps(result['false_alerts_by_alertname']) if result['false_alerts'] else ''}")
    by_type = ", ".join(f"{k} {v}" for k, v in result["normal_events_by_type"].items())
    lines.append(f"alerts raised: {result['alerts']}; faults too late to score: {result['faults_not_scored']}; "
                 f"without a signature (not scored): {result['faults_without_signature']}; "
                 f"normal events: {result['normal_events']}{f' ({by_type})' if by_type else ''}; "
                 f"normal: {result['normal']}")
    return "\n".join(lines)
