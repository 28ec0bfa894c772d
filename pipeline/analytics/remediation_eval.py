"""The remediation role in an evaluation: its dry-run plan for the alerts of a run, scored
against the faults injected (`fleetwatch eval`'s `remediation` JSON).

The role acts on nothing in dry-run, so its plan is replayed from the run's alerts after
the fact, one step per sample interval, with the configuration's guardrails: the same for
the in-process and the Kafka evaluation.

- quarantines: nodes taken out of service (planned).
- time to quarantine: from the fault's start to the quarantine, for quarantines a fault on
  the node (or one of its GPUs) explains.
- false_quarantines: quarantines no fault on the node or its rack explains (the alert was
  false, or a normal event raised it). A rack fault's quarantines are counted apart: the
  node is not what is broken (`quarantines_for_rack_faults`).
- breaker_trips: times the circuit breaker opened.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import numpy as np

from pipeline.analytics.evaluate import EVAL_EPOCH
from pipeline.config import Config
from pipeline.model import fingerprint
from pipeline.remediate.cases import HEALTHY, QUARANTINED, AlertChange, Event
from pipeline.remediate.remediator import Remediator

GRACE_S = 60.0


def plan(run, cfg: Config) -> tuple[Remediator, list[Event]]:
    """The dry-run remediator over the run's alerts: (its final state, every event)."""
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
    i, t = 0, start
    while t <= run.end.timestamp() + 1e-9:
        due = []
        while i < len(changes) and changes[i][0] <= t:
            due.append(changes[i][2])
            i += 1
        events.extend(rem.step(t, due)[0])
        t += step
    return rem, events


def score(run, cfg: Config) -> dict[str, Any]:
    rem, events = plan(run, cfg)
    faults = [lab for lab in run.labels if not lab["normal"]]
    starts = {fingerprint(a["labels"]): [] for a in run.alerts}
    for a in run.alerts:
        starts[fingerprint(a["labels"])].append(a["starts_at"])
    quarantines = [e for e in events if e.from_state == HEALTHY and e.to_state == QUARANTINED]
    ttq, false, for_rack = [], 0, 0
    for q in quarantines:
        when = max((s for s in starts.get(q.fingerprint, []) if s.timestamp() <= q.ts), default=None)
        if when is None:
            false += 1
            continue

        def covers(f, node_level: bool) -> bool:
            return (f["rack"] == q.rack and (f["node"] == q.node if node_level else f["node"] is None)
                    and f["start"] <= when <= f["end"] + timedelta(seconds=GRACE_S))
        mine = [f for f in faults if covers(f, True)]
        if mine:
            ttq.append(max(0.0, q.ts - min(f["start"] for f in mine).timestamp()))
        elif any(covers(f, False) for f in faults):
            for_rack += 1
        else:
            false += 1
    refused: dict[str, int] = {}
    for e in events:
        if e.guardrail and e.from_state == e.to_state:
            refused[e.guardrail] = refused.get(e.guardrail, 0) + 1
    return {
        "quarantines": len(quarantines),
        "time_to_quarantine_p50_s": round(float(np.percentile(ttq, 50)), 2) if ttq else None,
        "time_to_quarantine_p99_s": round(float(np.percentile(ttq, 99)), 2) if ttq else None,
        "false_quarantines": false,
        "quarantines_for_rack_faults": for_rack,
        "breaker_trips": rem.guardrails.breaker.trips,
        "refused_by_guardrail": dict(sorted(refused.items())),
        "needs_repair": sum(1 for e in events if e.to_state == "needs_repair" and e.from_state != e.to_state),
        "returned_to_service": sum(1 for e in events if e.to_state == HEALTHY and e.from_state != HEALTHY),
        "open_at_end": len(rem.cases),
    }
