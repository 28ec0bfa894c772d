"""What keeps remediation from doing harm: each rule says no to a quarantine, or sends a
node to repair instead of back to service, and names itself in the event (`guardrail`).

- breaker: no new quarantine once more than `breaker_fleet_pct` of the fleet's nodes, or
  `breaker_rack_pct` of one rack's, asked to be quarantined within `breaker_window_s` (the
  rules below may have refused some: the storm of requests is the sign), and at least
  `breaker_min_nodes` did (a share of a small fleet can be under one node). It opens
  (RemediationBreakerOpen fires) and closes once a whole window passes without a new request.
  Many nodes at once is one cause upstream, not many broken nodes.
- rate_limit: at most `max_per_hour` quarantines in any hour.
- cooldown: a node back in service is not quarantined again for `cooldown_s`.
- rack_alert: a critical rack alert (cooling, power) explains its nodes' symptoms: the rack
  is fixed, its nodes are not drained one by one.
- operator_resumed: a node an operator returned to service by hand is not quarantined again
  for the alerts it had then, while they keep firing (a new firing is a new alert).
- repeat_offender: a node remediated more than `repeat_limit` times in 7 days goes to
  needs_repair after its action instead of back to service.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from pipeline.config import RemediateConfig

WEEK_S = 7 * 86400.0
HOUR_S = 3600.0


@dataclass
class Breaker:
    open_since: float | None = None
    quiet_from: float = 0.0       # the last new request: it closes a window after
    where: str = ""               # "the fleet" or "rack r01": what tripped it
    count: int = 0                # nodes that asked within the window when it tripped ...
    nodes: int = 0                # ... of this many
    trips: int = 0

    @property
    def open(self) -> bool:
        return self.open_since is not None


@dataclass
class Guardrails:
    cfg: RemediateConfig
    quarantines: list[tuple[float, str, str]] = field(default_factory=list)  # (t, node, rack), the last 7 days
    requests: list[tuple[float, str, str]] = field(default_factory=list)     # nodes that asked, the breaker's window
    asked: set[str] = field(default_factory=set)                   # alerts (fingerprints) that asked, while they fire
    returned: dict[str, float] = field(default_factory=dict)     # node -> back in service at
    exempt: dict[str, str] = field(default_factory=dict)         # fingerprint -> node an operator resumed
    breaker: Breaker = field(default_factory=Breaker)

    def refuse(self, node: str, rack: str, fingerprint: str, now: float, fleet_nodes: int, rack_nodes: int,
               rack_alerted: str) -> tuple[str, str] | None:
        """(guardrail, why) when a quarantine of `node` for alert `fingerprint` must not happen now;
        None when it may. The breaker counts each alert's first ask, whatever refused it after: a
        storm of new requests is what it is for, even when the rules below hold each one back; an
        alert that keeps asking (refused by the cooldown, say) is no new request."""
        c = self.cfg
        new = fingerprint not in self.asked
        self.asked.add(fingerprint)
        if self.breaker.open:
            if new:  # the storm goes on: the breaker stays open a window longer
                self.breaker.quiet_from = now
            return "breaker", f"the circuit breaker is open ({self.breaker.where}): no new quarantine"
        if new:
            self.requests = [q for q in self.requests if now - q[0] < c.breaker_window_s] + [(now, node, rack)]
        recent = {n: r for t, n, r in self.requests if now - t < c.breaker_window_s}
        recent.setdefault(node, rack)
        in_rack = sum(1 for r in recent.values() if r == rack)
        if len(recent) >= c.breaker_min_nodes and len(recent) * 100.0 > c.breaker_fleet_pct * max(fleet_nodes, 1):
            return self._trip(now, "the fleet", len(recent), fleet_nodes)
        if in_rack >= c.breaker_min_nodes and in_rack * 100.0 > c.breaker_rack_pct * max(rack_nodes, 1):
            return self._trip(now, f"rack {rack}", in_rack, rack_nodes)
        if rack_alerted:
            return "rack_alert", (f"rack {rack} has {rack_alerted} firing: the rack's problem, not the node's; "
                                  f"fix the rack (its nodes are not drained one by one)")
        if now - self.returned.get(node, -math.inf) < c.cooldown_s:
            return "cooldown", (f"back in service {now - self.returned[node]:.0f} s ago, under remediate.cooldown_s "
                                f"({c.cooldown_s:g} s)")
        if c.max_per_hour and sum(1 for t, _, _ in self.quarantines if now - t < HOUR_S) >= c.max_per_hour:
            return "rate_limit", f"{c.max_per_hour} quarantines in the last hour (remediate.max_per_hour)"
        return None

    def _trip(self, now: float, where: str, count: int, nodes: int) -> tuple[str, str]:
        b = self.breaker
        b.open_since, b.quiet_from, b.where, b.count, b.nodes = now, now, where, count, nodes
        b.trips += 1
        return "breaker", (f"circuit breaker tripped: {count} of {nodes} nodes of {where} within "
                           f"{self.cfg.breaker_window_s / 60:g} min is over "
                           f"remediate.breaker_{'fleet' if where == 'the fleet' else 'rack'}_pct")

    def evidence(self) -> dict:
        """The open breaker's alert evidence (catalog: RemediationBreakerOpen)."""
        b = self.breaker
        return {"asking": b.count, "nodes": b.nodes, "where": b.where, "window_min": self.cfg.breaker_window_s / 60}

    def quiet(self, now: float) -> bool:
        """Close the breaker once a whole window passed quietly; True when it closed now."""
        b = self.breaker
        if b.open and now - b.quiet_from >= self.cfg.breaker_window_s:
            b.open_since, b.where = None, ""
            return True
        return False

    def quarantined(self, node: str, rack: str, now: float) -> None:
        self.quarantines = [q for q in self.quarantines if now - q[0] < WEEK_S] + [(now, node, rack)]

    def repeat_offender(self, node: str, now: float) -> bool:
        """Remediated more than repeat_limit times in 7 days, counting the quarantine about to be made."""
        return sum(1 for t, n, _ in self.quarantines if n == node and now - t < WEEK_S) + 1 > self.cfg.repeat_limit

    def back_in_service(self, node: str, now: float) -> None:
        self.returned[node] = now

    def operator_resumed(self, node: str, fingerprints: set[str]) -> None:
        self.exempt.update({fp: node for fp in fingerprints})

    def resolved(self, fingerprint: str) -> None:
        self.exempt.pop(fingerprint, None)
        self.asked.discard(fingerprint)

    def snapshot(self) -> dict:
        b = self.breaker
        return {"quarantines": self.quarantines, "requests": self.requests, "asked": sorted(self.asked),
                "returned": self.returned,
                "exempt": self.exempt, "breaker": dataclasses.asdict(b)}

    def restore(self, snap: dict) -> None:
        self.quarantines = [tuple(q) for q in snap.get("quarantines", [])]
        self.requests = [tuple(q) for q in snap.get("requests", [])]
        self.asked = set(snap.get("asked", []))
        self.returned = dict(snap.get("returned", {}))
        self.exempt = dict(snap.get("exempt", {}))
        self.breaker = Breaker(**snap.get("breaker", {}))
