"""From detector hits to alerts and node states, with hysteresis.

A `Tracker` follows one alertname over its entities (GPU slots, nodes or racks):
a condition must hold `fire_after` evaluations in a row to fire and be clear
`resolve_after` evaluations in a row to resolve, so one problem is one alert, not
a flapping stream. A streak must also last as long as it would at the 1 s scrapes
the detectors are tuned at (`detect.streak_s` per evaluation after the first): at
0.2-s scrapes three evaluations are 0.4 s, shorter than a real H200's temperature
leads its 1 s power average at a load start. `NodeHealth` turns the firing alerts
into one state per node.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import numpy as np

from pipeline.detect.catalog import AlertSpec, costliest, remediation, runbook_url
from pipeline.detect.state import SlotArrays
from pipeline.model import Alert

Evidence = Callable[[int], dict]  # row of the evaluated batch -> evidence for an alert


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc)


class Tracker:
    def __init__(self, spec: AlertSpec, detector: str, fire_after: int, resolve_after: int,
                 labels_for: Callable[[int], dict[str, str]], runbook_base_url: str, streak_s: float = 0.0) -> None:
        self.spec = spec
        self.detector = detector
        self.fire_after = fire_after
        self.resolve_after = resolve_after
        # The least event time a streak spans; half a step less for the scrapes' jitter (an agent's
        # first scrapes ran 300-410 ms late on a real H200).
        self._fire_span_s, self._resolve_span_s = ((n - 1.5) * streak_s if n > 1 else 0.0
                                                   for n in (fire_after, resolve_after))
        self._labels_for = labels_for
        self._runbook = runbook_url(runbook_base_url, spec.name)
        # When the entity's streak (of hits or of clears: one is 0) began; -inf (no bound) for a
        # streak restored from a checkpoint written before it was kept.
        self.arrays = SlotArrays({"hits": (np.int32, 0), "clears": (np.int32, 0), "firing": (np.bool_, False),
                                  "since": (np.float64, -np.inf)})
        self.active: dict[int, Alert] = {}
        self._pending = False  # some entity has a hit streak that has not fired (yet)

    def pending_or_firing(self, n: int) -> np.ndarray:
        self.arrays.ensure(n)
        return (self.arrays.hits[:n] > 0) | self.arrays.firing[:n]

    def update(self, entities: np.ndarray, hit: np.ndarray, t: float, score: np.ndarray,
               evidence: Evidence) -> list[tuple[datetime, Alert]]:
        """Evaluate the condition for `entities` at time t; return state changes. An entity judged twice
        (two rows of a rack's A and B feeds) is one judgement: hit where any of its rows hit, with that
        row's score and evidence."""
        if entities.size == 0 or not (self._pending or self.active or hit.any()):
            return []  # the common case: nothing hit, nothing pending, nothing firing
        if entities.size > 1:
            unique, of_row = np.unique(entities, return_inverse=True)
            if unique.size < entities.size:
                rows = np.arange(entities.size)
                chosen = np.full(unique.size, -1)  # each entity's last row that hit, or else its last row
                np.maximum.at(chosen, of_row, np.where(hit, rows + entities.size, rows))
                chosen %= entities.size
                entities, hit, score = unique, hit[chosen], score[chosen]
                evidence = (lambda of: lambda i: of(int(chosen[i])))(evidence)
        s = self.arrays
        s.ensure(int(entities.max()) + 1)
        hits = np.where(hit, s.hits[entities] + 1, 0)
        clears = np.where(hit, 0, s.clears[entities] + 1)
        # (a batch stamped before the streak's start, which one partition's lag can bring, pulls it
        # back: the streak then spans from the earliest of its evaluations)
        since = np.where((hits == 1) | (clears == 1), t, np.minimum(s.since[entities], t))
        firing = s.firing[entities]
        s.hits[entities], s.clears[entities], s.since[entities] = hits, clears, since
        self._pending = bool((s.hits > 0).any())
        start = np.flatnonzero(hit & ~firing & (hits >= self.fire_after) & (t - since >= self._fire_span_s))
        stop = np.flatnonzero(firing & (clears >= self.resolve_after) & (t - since >= self._resolve_span_s))
        if start.size == 0 and stop.size == 0:
            return []
        changes = []
        now = _dt(t)
        for i in start:  # transitions are rare: plain Python from here on
            e = int(entities[i])
            s.firing[e] = True
            alert = self._new_alert(e, now, float(score[i]), evidence(int(i)))
            self.active[e] = alert
            changes.append((now, alert))
        for i in stop:
            e = int(entities[i])
            s.firing[e] = False
            # A new snapshot: the firing change already handed out must stay as it was.
            changes.append((now, dataclasses.replace(self.active.pop(e), ends_at=now)))
        return changes

    def adopt(self, entity: int, alert: Alert) -> None:
        """Take over an alert firing elsewhere (a restored checkpoint); call refresh() after."""
        self.arrays.ensure(entity + 1)
        self.arrays.firing[entity] = True
        self.active[entity] = alert

    def forget(self, entities: np.ndarray) -> None:
        self.arrays.ensure(int(entities.max()) + 1)
        self.arrays.reset(entities, self.arrays.fields)
        for e in entities.tolist():
            self.active.pop(e, None)
        self.refresh()

    def shift(self, seconds: float) -> None:
        """Move the streaks' start times by `seconds`: after a restart, the downtime is no time a
        condition held (or was clear)."""
        self.arrays.since += seconds  # (-inf stays)

    def refresh(self) -> None:
        """Recompute what update() keeps incrementally, after state was set from outside."""
        self._pending = bool((self.arrays.hits > 0).any())

    def _new_alert(self, entity: int, now: datetime, score: float, evidence: dict) -> Alert:
        spec = self.spec
        labels = {"alertname": spec.name, "severity": spec.severity, **self._labels_for(entity)}
        fields = {**labels, **{k: v for k, v in evidence.items() if v is not None}}
        try:
            summary = spec.summary.format(**fields)
        except (KeyError, ValueError):  # evidence lacks a field: still say what and where
            summary = f"{spec.name} on {labels.get('node') or labels.get('rack')}"
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in evidence.items())
        return Alert(labels=labels,
                     annotations={"summary": summary,
                                  "description": f"{spec.action} Evidence ({self.detector}): {shown}.",
                                  "runbook_url": self._runbook,
                                  "remediation": remediation(spec.name, evidence)},
                     starts_at=now, detector=self.detector, score=score, evidence=evidence)


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


STATES = ("healthy", "suspect", "failing")
_RANK = {"warning": 1, "critical": 2}


@dataclass
class NodeIdentity:
    site: str
    rack: str
    node: str


class NodeHealth:
    """Node state = worst firing alert on the node (or its GPUs): critical -> failing,
    warning -> suspect. Alerts carry the hysteresis, so states do not flap."""

    def __init__(self) -> None:
        self.state = np.zeros(0, np.int8)

    def ensure(self, n: int) -> None:
        if self.state.shape[0] < n:
            self.state = np.concatenate([self.state, np.zeros(n - self.state.shape[0], np.int8)])

    def update(self, n_nodes: int, firing_by_node: list[tuple[np.ndarray, str, str]],
               identity: Callable[[int], NodeIdentity], t: float) -> list[dict]:
        """firing_by_node: (node indices with a firing alert, severity, alertname, each alert's
        remediation) per tracker."""
        self.ensure(n_nodes)
        new = np.zeros(n_nodes, np.int8)
        for nodes, severity, _, _ in firing_by_node:
            if nodes.size:
                np.maximum.at(new, nodes, _RANK.get(severity, 0))
        changed = np.flatnonzero(new != self.state[:n_nodes])
        out = []
        for n in changed:
            who = identity(int(n))
            mine = [(name, [r for node, r in zip(nodes, rems) if node == n])
                    for nodes, _, name, rems in firing_by_node if np.any(nodes == n)]
            out.append({"ts": _dt(t), "site": who.site, "rack": who.rack, "node": who.node,
                        "state": STATES[new[n]], "previous": STATES[self.state[n]],
                        "reasons": ",".join(sorted({name for name, _ in mine})),
                        "remediation": costliest(r for _, rems in mine for r in rems)})
        self.state[:n_nodes] = new
        return out

    def counts(self, n_nodes: int) -> dict[str, int]:
        """Nodes per state; nodes that never had an alert are healthy."""
        known = self.state[:n_nodes]
        out = {name: int(np.count_nonzero(known == i)) for i, name in enumerate(STATES)}
        out["healthy"] += n_nodes - known.shape[0]
        return out
