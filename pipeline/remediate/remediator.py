"""The remediation state machine: alert changes in, node cases driven through their states
(cases.py), events and the role's own alerts out (the breaker's, a drain overdue).

`step(now, changes)` is the one entry: it takes the alert changes since the last step, opens a
case for a node whose allowed alert asks for a remediation (unless a guardrail refuses:
guardrails.py), and moves each open case on by at most one state. It is synchronous and may
block on the backend (a subprocess): the role runs it in a worker thread, one step at a time;
the evaluation calls it directly. Nothing here reads a clock: `now` is given.

Dry-run (the default, and always without a backend) goes through the same states without
calling anything: a quarantined node counts as drained at once, the action as done, and a
case ends when the node's alerts have resolved (a person would have repaired it by then). The
guardrails, the breaker included, judge the plan as they would the real thing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from datetime import datetime, timezone

from pipeline.config import Config
from pipeline.detect.catalog import ALERTS_BY_NAME, raised
from pipeline.humanize import age
from pipeline.model import Alert
from pipeline.remediate.backends.base import Backend, BackendError, Unsupported, not_a_host_name
from pipeline.remediate.cases import (ACTION, DRAINED, HAND_OFF, HEALTHY, NEEDS_REPAIR, QUARANTINED, VALIDATING,
                                      AlertChange, Case, Event)
from pipeline.remediate.guardrails import Guardrails

log = logging.getLogger("pipeline.remediate")
BREAKER_ALERT = "RemediationBreakerOpen"
DRAIN_ALERT = "RemediationDrainOverdue"


class Remediator:
    def __init__(self, cfg: Config, backend: Backend | None = None, validation=None) -> None:
        self.cfg, self.rc = cfg, cfg.remediate
        self.site = cfg.fleet.site
        self.backend, self.validation = backend, validation
        self.dry_run = self.rc.dry_run or backend is None
        self.allowed = frozenset(self.rc.alertnames)
        self.guardrails = Guardrails(self.rc)
        self.nodes: dict[str, str] = {}              # node -> rack: the fleet, as seen
        self.firing: dict[str, AlertChange] = {}     # fingerprint -> firing alert (GPU, node and rack)
        self.cases: dict[str, Case] = {}             # node -> its open case
        self.breaker_alert: Alert | None = None
        self.overdue: dict[str, Alert] = {}          # node -> its RemediationDrainOverdue, firing
        self.refused: Counter[str] = Counter()       # guardrail -> refusals recorded (once per alert and rule)
        self._said: set[tuple[str, str, str]] = set()  # (node, fingerprint, guardrail) already recorded
        self._unapplied: dict[str, str] = {}            # node -> why its quarantine failed (said once)
        self._next_check = -float("inf")
        self.saved_at = 0.0                           # the last step's `now` (status reads it)

    # ---- inputs ------------------------------------------------------------------------

    def see(self, nodes: dict[str, str]) -> None:
        """Nodes and their racks that exist (the breaker's shares are of these)."""
        self.nodes.update(nodes)

    def step(self, now: float, changes: list[AlertChange]) -> tuple[list[Event], list[Alert]]:
        """One round: (events, breaker alert changes)."""
        events: list[Event] = []
        alerts: list[Alert] = []
        self.saved_at = now
        self._take(changes)
        self._open_cases(now, events)
        if self.guardrails.breaker.open and self.breaker_alert is None:
            self.breaker_alert = raised(BREAKER_ALERT, {"site": self.site, "rack": ""}, self.guardrails.evidence(),
                                        _dt(now), self.cfg.alerts.runbook_base_url)
            alerts.append(self.breaker_alert)
            log.warning("remediation: %s", self.breaker_alert.annotations["summary"])
        elif self.guardrails.quiet(now) and self.breaker_alert is not None:
            alerts.append(dataclasses.replace(self.breaker_alert, ends_at=_dt(now)))
            self.breaker_alert = None
            log.info("remediation: the circuit breaker closed: a whole window passed quietly")
        if self.dry_run or now >= self._next_check:
            self._next_check = now + self.rc.interval_s
            for case in list(self.cases.values()):
                self._advance(case, now, events)
            alerts += self._overdue(now)  # (as the cases were just found: a drain is seen at a check)
        for e in events:
            log.info("remediation: %s %s -> %s%s: %s", e.node, e.from_state, e.to_state,
                     " (dry-run)" if e.dry_run else "", e.detail)
        return events, alerts

    def _overdue(self, now: float) -> list[Alert]:
        """RemediationDrainOverdue's changes: firing for each case still quarantined (its work
        runs on) past remediate.drain_timeout_s while it waits for it; resolved once the case
        moves on or ends, however it does."""
        waiting = {} if self.dry_run or self.rc.on_drain_timeout != "wait" else {
            c.node: c for c in self.cases.values()
            if c.state == QUARANTINED and now - c.since >= self.rc.drain_timeout_s}
        changes = []
        for node, case in waiting.items():
            if node not in self.overdue:
                self.overdue[node] = self._drain_alert(case, case.since + self.rc.drain_timeout_s)
                changes.append(self.overdue[node])
                log.warning("remediation: %s", self.overdue[node].annotations["summary"])
        for node in [n for n in self.overdue if n not in waiting]:
            alert = self.overdue.pop(node)
            changes.append(dataclasses.replace(alert, ends_at=max(_dt(now), alert.starts_at)))
        return changes

    def _drain_alert(self, case: Case, at: float) -> Alert:
        return raised(DRAIN_ALERT, {"site": self.site, "rack": case.rack, "node": case.node},
                      {"trigger": case.trigger.alertname, "waited": age(self.rc.drain_timeout_s), "case": case.id},
                      _dt(at), self.cfg.alerts.runbook_base_url)

    def _take(self, changes: list[AlertChange]) -> None:
        for ch in changes:
            if ch.node:
                self.nodes.setdefault(ch.node, ch.rack)
            if not ch.firing:
                self.firing.pop(ch.fingerprint, None)
                self.guardrails.resolved(ch.fingerprint)
                self._said = {s for s in self._said if s[1] != ch.fingerprint}
                continue
            self.firing[ch.fingerprint] = ch
            case = self.cases.get(ch.node)
            if case is not None:
                case.fingerprints.add(ch.fingerprint)
                if ch.alertname in self.allowed and case.state in (QUARANTINED, DRAINED):
                    case.escalate(ch.remediation)  # a costlier alert before the action changes the action

    # ---- opening a case ----------------------------------------------------------------

    def _candidates(self) -> list[AlertChange]:
        return sorted((a for a in self.firing.values() if a.node and a.node not in self.cases
                       and a.alertname in self.allowed and a.remediation != "none"
                       and a.fingerprint not in self.guardrails.exempt), key=lambda a: (a.starts_at, a.node))

    def _rack_alert(self, rack: str) -> str:
        """A critical rack alert firing on `rack` ("" if none)."""
        return next((a.alertname for a in self.firing.values() if not a.node and a.rack == rack
                     and a.severity == "critical" and ALERTS_BY_NAME.get(a.alertname) is not None
                     and ALERTS_BY_NAME[a.alertname].scope == "rack"), "")

    def _open_cases(self, now: float, events: list[Event]) -> None:
        g = self.guardrails
        candidates = self._candidates()
        rack_nodes = Counter(self.nodes.values()) if candidates else Counter()
        for a in candidates:
            if a.node in self.cases:  # a second alert of a node opened this step
                continue
            refusal = ("node_name", why) if (why := not_a_host_name(a.node)) is not None else \
                g.refuse(a.node, a.rack, a.fingerprint, now, _bounded(len(self.nodes), self.rc.fleet_nodes),
                         _bounded(rack_nodes[a.rack], self.rc.rack_nodes), self._rack_alert(a.rack))
            if refusal is not None:
                guardrail, why = refusal
                if (a.node, a.fingerprint, guardrail) not in self._said:
                    self._said.add((a.node, a.fingerprint, guardrail))
                    self.refused[guardrail] += 1
                    events.append(self._event(now, a.node, a.rack, None, HEALTHY, HEALTHY, a, a.remediation,
                                              guardrail, False, f"not quarantined: {why}"))
                continue
            case = Case(f"{a.node}@{_dt(now).strftime('%Y-%m-%dT%H:%M:%SZ')}", a.site or self.site, a.rack, a.node,
                        QUARANTINED, now, now, a, a.remediation, {f for f, x in self.firing.items() if x.node == a.node})
            case.repeat_offender = g.repeat_offender(a.node, now)
            case.last_error = self._unapplied.get(a.node, "")
            if not self._call(case, now, events, HEALTHY, lambda: self.backend.quarantine(a.node, case.context())):
                self._unapplied[a.node] = case.last_error  # the case is not open: its error is kept here
                continue
            self._unapplied.pop(a.node, None)
            self.cases[a.node] = case
            g.quarantined(a.node, a.rack, now)
            events.append(self._transition(case, now, HEALTHY, QUARANTINED,
                                           f"{a.alertname}: {a.summary or a.alertname}; no new work on the node"
                                           + ("; a repeat offender: it goes to needs_repair after its action"
                                              if case.repeat_offender else "")))

    # ---- moving a case on --------------------------------------------------------------

    def _advance(self, case: Case, now: float, events: list[Event]) -> None:
        if not self.dry_run and self._resumed_by_hand(case, now, events):
            return
        if case.state == QUARANTINED:
            drained, why = True, "the work on it is done" if not self.dry_run else "drained (dry-run: at once)"
            if not self.dry_run:
                try:
                    drained = self.backend.drained(case.node)
                except BackendError as e:
                    self._failed(case, now, events, str(e))
                    return
            late = not drained and now - case.since >= self.rc.drain_timeout_s
            if late and self.rc.on_drain_timeout == "proceed":
                drained, why = True, (f"its work ran past remediate.drain_timeout_s ({self.rc.drain_timeout_s:g} s): "
                                      f"going on (remediate.on_drain_timeout = proceed)")
            elif late and case.last_error != "draining":  # said once: a person may end the work by hand
                case.last_error = "draining"
                events.append(self._event(now, case.node, case.rack, case.id, case.state, case.state, case.trigger,
                                          case.remediation, None, False,
                                          f"its work still runs after remediate.drain_timeout_s "
                                          f"({self.rc.drain_timeout_s:g} s): waiting (remediate.on_drain_timeout)"))
            if drained:
                events.append(self._move(case, now, DRAINED, why))
        elif case.state == DRAINED:
            if case.remediation in HAND_OFF:
                events.append(self._move(case, now, NEEDS_REPAIR, f"{case.remediation}: handed to a person for repair"))
                return
            try:
                if not self.dry_run:
                    self.backend.act(case.node, case.remediation, case.context())
            except Unsupported as e:
                events.append(self._move(case, now, NEEDS_REPAIR, f"cannot {case.remediation} here: {e}"))
                return
            except BackendError as e:
                self._failed(case, now, events, str(e))
                return
            events.append(self._move(case, now, ACTION, f"{case.remediation} {'planned' if self.dry_run else 'done'}",
                                     applied=not self.dry_run))
        elif case.state == ACTION:
            events.append(self._move(case, now, VALIDATING,
                                     "dry-run: it passes once its alerts resolve" if self.dry_run
                                     else f"checking: {self.rc.validate_command}" if self.validation is not None
                                     else "no check configured (remediate.validate_command): an operator returns it"))
        elif case.state == VALIDATING:
            if self.dry_run:
                if not self._still_firing(case):
                    self._finish(case, now, events, "its alerts resolved")
            elif self.validation is not None:
                ok, detail = self.validation.check(case.node, case.context())
                if ok:
                    self._finish(case, now, events, f"check passed: {detail}")
                else:
                    events.append(self._move(case, now, NEEDS_REPAIR, f"check failed: {detail}"))
        elif case.state == NEEDS_REPAIR and self.dry_run and not self._still_firing(case):
            self._close(case, now, events, None, "dry-run: its alerts resolved (a person would have repaired it)",
                        applied=False)

    def _resumed_by_hand(self, case: Case, now: float, events: list[Event]) -> bool:
        """An operator returned the node to service: the case ends, and the alerts it had
        then quarantine it no more while they fire."""
        try:
            held = self.backend.held(case.node)
        except BackendError:
            held = None
        if held is not False:
            return False
        firing = {f for f in case.fingerprints if f in self.firing}
        self.guardrails.operator_resumed(case.node, firing)
        self._close(case, now, events, "operator_resumed",
                    f"returned to service by hand in {case.state}: not quarantined again for the "
                    f"{len(firing)} alert(s) it has while they fire", applied=False)
        return True

    def _finish(self, case: Case, now: float, events: list[Event], why: str) -> None:
        """Validated: back in service, unless it is a repeat offender."""
        if case.repeat_offender:
            events.append(self._move(case, now, NEEDS_REPAIR, f"{why}; remediated more than "
                                     f"{self.rc.repeat_limit} times in 7 days: needs repair, not service",
                                     guardrail="repeat_offender"))
            return
        if not self.dry_run and not self._call(case, now, events, case.state,
                                                lambda: self.backend.resume(case.node, case.context())):
            return
        self._close(case, now, events, None, f"{why}; back in service", applied=not self.dry_run)

    def _close(self, case: Case, now: float, events: list[Event], guardrail: str | None, why: str,
               applied: bool) -> None:
        events.append(self._move(case, now, HEALTHY, why, guardrail=guardrail, applied=applied))
        del self.cases[case.node]
        self.guardrails.back_in_service(case.node, now)

    def _still_firing(self, case: Case) -> bool:
        return any(f in self.firing for f in case.fingerprints)

    def _call(self, case: Case, now: float, events: list[Event], state: str, call) -> bool:
        """A backend call (none in dry-run): False, with a failure event, when it failed."""
        if self.dry_run:
            return True
        try:
            call()
            return True
        except BackendError as e:
            self._failed(case, now, events, str(e), state)
            return False

    def _failed(self, case: Case, now: float, events: list[Event], error: str, state: str | None = None) -> None:
        """A step failed: it is tried again next round; an event only when the error changes."""
        if error == case.last_error:
            return
        case.last_error = error
        state = state or case.state
        events.append(self._event(now, case.node, case.rack, case.id if state != HEALTHY else None, state, state,
                                  case.trigger, case.remediation, None, False, f"failed, tried again: {error}"))

    # ---- events ------------------------------------------------------------------------

    def _move(self, case: Case, now: float, to: str, why: str, guardrail: str | None = None,
              applied: bool | None = None) -> Event:
        before = case.state
        case.state, case.since, case.last_error = to, now, ""
        return self._transition(case, now, before, to, why, guardrail, applied)

    def _transition(self, case: Case, now: float, before: str, to: str, why: str, guardrail: str | None = None,
                    applied: bool | None = None) -> Event:
        return self._event(now, case.node, case.rack, case.id, before, to, case.trigger, case.remediation, guardrail,
                           (not self.dry_run) if applied is None else applied, why)

    def _event(self, now: float, node: str, rack: str, case_id: str | None, before: str, to: str,
               alert: AlertChange, remediation: str, guardrail: str | None, applied: bool, detail: str) -> Event:
        return Event(now, self.site, rack, node, case_id, before, to, alert.alertname, alert.fingerprint, remediation,
                     guardrail, self.dry_run, applied, detail)

    # ---- state across restarts -----------------------------------------------------------

    def status(self, now: float) -> dict:
        """For `fleetwatch remediation status`: the cases, the breaker, what was refused."""
        b = self.guardrails.breaker
        return {"dry_run": self.dry_run, "backend": self.rc.backend, "nodes_seen": len(self.nodes),
                "as_of": _dt(now).isoformat(),
                "cases": [{"node": c.node, "rack": c.rack, "state": c.state, "case_id": c.id,
                           "alertname": c.trigger.alertname, "fingerprint": c.trigger.fingerprint,
                           "remediation": c.remediation, "since": _dt(c.since).isoformat(),
                           "in_state_s": round(now - c.since, 1), "repeat_offender": c.repeat_offender,
                           "failing": c.last_error or None} for c in sorted(self.cases.values(), key=lambda c: c.node)],
                "breaker": {"open": b.open, "where": b.where or None, "trips": b.trips,
                            "since": _dt(b.open_since).isoformat() if b.open_since is not None else None},
                "quarantines_last_hour": sum(1 for t, _, _ in self.guardrails.quarantines if now - t < 3600),
                "refused": dict(self.refused),
                "exempt_by_operator": sorted(set(self.guardrails.exempt.values()))}

    def snapshot(self) -> dict:
        """Everything restore() takes, and how it ran (dry-run, backend: what status shows)."""
        return {"dry_run": self.dry_run, "backend": self.rc.backend, "nodes": self.nodes, "firing": [dataclasses.asdict(a) for a in self.firing.values()],
                "cases": [{**dataclasses.asdict(c), "trigger": dataclasses.asdict(c.trigger),
                           "fingerprints": sorted(c.fingerprints)} for c in self.cases.values()],
                "guardrails": self.guardrails.snapshot(), "refused": dict(self.refused),
                "breaker_alert": None if self.breaker_alert is None else self.breaker_alert.starts_at.timestamp(),
                "overdue": {n: a.starts_at.timestamp() for n, a in sorted(self.overdue.items())},
                "saved_at": self.saved_at}

    def restore(self, snap: dict) -> None:
        self.nodes = dict(snap.get("nodes", {}))
        self.firing = {a["fingerprint"]: AlertChange(**a) for a in snap.get("firing", [])}
        self.cases = {}
        for c in snap.get("cases", []):
            case = Case(**{**c, "trigger": AlertChange(**c["trigger"]), "fingerprints": set(c["fingerprints"])})
            self.cases[case.node] = case
        self.guardrails.restore(snap.get("guardrails", {}))
        self.refused = Counter(snap.get("refused", {}))
        self.saved_at = snap.get("saved_at", 0.0)
        self.overdue = {n: self._drain_alert(self.cases[n], at)  # (the same alert as it was told: its start saved)
                        for n, at in dict(snap.get("overdue", {})).items() if n in self.cases}
        if snap.get("breaker_alert") is not None and self.guardrails.breaker.open:
            self.breaker_alert = raised(BREAKER_ALERT, {"site": self.site, "rack": ""}, self.guardrails.evidence(),
                                        _dt(snap["breaker_alert"]), self.cfg.alerts.runbook_base_url)


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc)


def _bounded(seen: int, trusted: int) -> int:
    """The breaker's denominator: the nodes seen, at most the inventory's count where one is set (names no
    inventory holds would dilute the share)."""
    return min(seen, trusted) if trusted > 0 else seen
