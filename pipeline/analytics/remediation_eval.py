"""The remediation role in an evaluation: its dry-run plan for the alerts of a run, scored
against the faults injected (`fleetwatch eval`'s `remediation` JSON).

The role acts on nothing in dry-run, so its plan is replayed from the run's alerts after
the fact, one step per sample interval, with the configuration's guardrails: the same for
the in-process and the Kafka evaluation.

- quarantines: nodes taken out of service (planned).
- time to quarantine: from the fault's start to the quarantine, for quarantines a fault on
  the node (or one of its GPUs) explains.
- false_quarantines: quarantines whose alert no fault on the node or its rack explains, by
  the alerts' own score (evaluate.explains): the alert was false, or a normal event raised
  it. A rack fault's quarantines are counted apart: the node is not what is broken
  (`quarantines_for_rack_faults`).
- breaker_trips: times the circuit breaker opened.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from pipeline.analytics.evaluate import EVAL_EPOCH, GRACE_S, explains
from pipeline.config import Config
from pipeline.model import fingerprint
from pipeline.remediate.cases import HEALTHY, QUARANTINED, AlertChange, Event
from pipeline.remediate.remediator import Remediator


def plan(run, cfg: Config) -> tuple[Remediator, list[Event], list[tuple[float, float]]]:
    """The dry-run remediator over the run's alerts: (its final state, every event, the spans
    its breaker was open)."""
    rem = Remediator(replace(cfg, remediate=replace(cfg.remediate, dry_run=True)))
    rem.see(run.nodes)
    changes: list[tuple[float, int, AlertChange]] = []
    for a in run.alerts:
        labels = a["labels"]
        base = dict(fingerprint=fingerprint(labels), alertname=labels["alertname"], severity=labels["severity"],
                    site=labels.get("site", ""), rack=labels.get("rack", ""), node=labels.get("node", ""),
                    gpu=labels.get("gpu", ""), starts_at=a["starts_at"].timestamp(),
                    remediation=a.get("remediation") or "none")
        changes.append((base["starts_at"], 1, AlertChange(firing=True, **base)))
        if a["ends_at"] is not None:
            changes.append((a["ends_at"].timestamp(), 0, AlertChange(firing=False, **base)))
    changes.sort(key=lambda c: (c[0], c[1]))
    step = cfg.fleet.sample_interval_s
    start = EVAL_EPOCH.timestamp()
    events: list[Event] = []
    spans: list[tuple[float, float]] = []
    i, t, opened = 0, start, None
    while t <= run.end.timestamp() + 1e-9:
        due = []
        while i < len(changes) and changes[i][0] <= t:
            due.append(changes[i][2])
            i += 1
        events.extend(rem.step(t, due)[0])
        if rem.guardrails.breaker.open and opened is None:
            opened = t
        elif not rem.guardrails.breaker.open and opened is not None:
            spans.append((opened, t))
            opened = None
        t += step
    if opened is not None:
        spans.append((opened, t))
    return rem, events, spans


def score(run, cfg: Config, rack_loss: tuple[float, dict] | None = None) -> dict[str, Any]:
    """The `remediation` JSON; with `rack_loss` (evaluate.rack_cooling_loss: seconds in, the
    injection), what the remediator did to that rack while it was hot."""
    rem, events, spans = plan(run, cfg)
    faults = [lab for lab in run.labels if not lab["normal"]]
    raised: dict[str, list[dict]] = {}
    for a in run.alerts:
        raised.setdefault(fingerprint(a["labels"]), []).append(a)
    quarantines = [e for e in events if _quarantined(e)]
    ttq, false, for_rack = [], 0, 0
    for q in quarantines:
        alert = max((a for a in raised.get(q.fingerprint, []) if a["starts_at"].timestamp() <= q.ts),
                    key=lambda a: a["starts_at"], default=None)
        why = [f for f in faults if alert is not None and explains(f, alert, run.end)]
        mine = [f for f in why if f["node"] == q.node]
        if mine:
            ttq.append(max(0.0, q.ts - min(f["start"] for f in mine).timestamp()))
        elif why:
            for_rack += 1
        else:
            false += 1
    return {
        "quarantines": len(quarantines),
        "time_to_quarantine_p50_s": round(float(np.percentile(ttq, 50)), 2) if ttq else None,
        "time_to_quarantine_p99_s": round(float(np.percentile(ttq, 99)), 2) if ttq else None,
        "false_quarantines": false,
        "quarantines_for_rack_faults": for_rack,
        "breaker_trips": rem.guardrails.breaker.trips,
        "refused_by_guardrail": _refused(events),
        "needs_repair": sum(1 for e in events if e.to_state == "needs_repair" and e.from_state != e.to_state),
        "returned_to_service": sum(1 for e in events if e.to_state == HEALTHY and e.from_state != HEALTHY),
        "open_at_end": len(rem.cases),
        **({"rack_cooling_loss": _rack_loss(run, cfg, rack_loss, events, spans)} if rack_loss else {}),
    }


def _rack_loss(run, cfg: Config, rack_loss: tuple[float, dict], events: list[Event],
               spans: list[tuple[float, float]]) -> dict[str, Any]:
    """The rack that lost its cooling: its nodes that asked for a quarantine while it was hot
    (and a minute after), how many were quarantined (target 0), what refused the others, and
    whether the breaker was open meanwhile (target: it was)."""
    at, spec = rack_loss
    start = EVAL_EPOCH.timestamp() + at
    label = next(lab for lab in run.labels if lab["fault_type"] == spec["kind"] and lab["node"] is None
                 and abs(lab["start"].timestamp() - start) <= cfg.fleet.sample_interval_s)
    lo, hi = label["start"].timestamp(), label["end"].timestamp() + GRACE_S
    mine = [e for e in events if e.rack == label["rack"] and lo <= e.ts <= hi]
    return {
        "rack": label["rack"],
        "nodes": sum(1 for r in run.nodes.values() if r == label["rack"]),
        "nodes_asking": len({e.node for e in mine}),
        "nodes_quarantined": len({e.node for e in mine if _quarantined(e)}),
        "breaker_open": any(a < hi and b > lo for a, b in spans),
        "refused_by_guardrail": _refused(mine),
    }


def _quarantined(e: Event) -> bool:
    return e.from_state == HEALTHY and e.to_state == QUARANTINED


def _refused(events: list[Event]) -> dict[str, int]:
    """Steps a guardrail refused, by guardrail."""
    refused: dict[str, int] = {}
    for e in events:
        if e.guardrail and e.from_state == e.to_state:
            refused[e.guardrail] = refused.get(e.guardrail, 0) + 1
    return dict(sorted(refused.items()))
