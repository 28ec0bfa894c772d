"""What remediation works with: the alert changes it reads, a node's case, and the events
it writes (model.REMEDIATION_EVENT rows, archived as remediation_events).

A case is one remediation of one node, from its quarantine to its return to service:

    healthy -> quarantined -> drained -> action -> validating -> healthy
                                  \\-> needs_repair (drain_inspect, replace, a failed check,
                                                    a repeat offender) -> healthy by an operator
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa

from pipeline.detect.catalog import costliest
from pipeline.model import REMEDIATION_EVENT, python_rows

HEALTHY, QUARANTINED, DRAINED, ACTION, VALIDATING, NEEDS_REPAIR = (
    "healthy", "quarantined", "drained", "action", "validating", "needs_repair")
STATES = (HEALTHY, QUARANTINED, DRAINED, ACTION, VALIDATING, NEEDS_REPAIR)
HAND_OFF = ("drain_inspect", "replace")  # remediations a person does: the node waits in needs_repair


@dataclass(frozen=True)
class AlertChange:
    """An alert's state change, as remediation needs it (a row of the alerts topic)."""
    fingerprint: str
    firing: bool
    alertname: str
    severity: str
    site: str
    rack: str
    node: str          # "" for rack and site alerts
    gpu: str           # "" for node alerts
    starts_at: float   # epoch seconds
    remediation: str
    summary: str = ""

    @classmethod
    def rows(cls, batch: pa.RecordBatch) -> list["AlertChange"]:
        """From an alert batch (model.ALERT): a handful of rows per tick."""
        return [cls(r["fingerprint"], r["status"] == "firing", r["alertname"], r["severity"], r["site"] or "",
                    r["rack"] or "", r["node"] or "", r["gpu"] or "", r["starts_at"].timestamp(),
                    r["remediation"] or "none", r["summary"] or "")
                for r in python_rows(batch.select(["fingerprint", "status", "alertname", "severity", "site", "rack",
                                                   "node", "gpu", "starts_at", "remediation", "summary"]))]


@dataclass
class Case:
    """One node's remediation while it is out of service."""
    id: str
    site: str
    rack: str
    node: str
    state: str
    since: float                   # when it entered `state`
    started: float                 # when it was quarantined
    trigger: AlertChange           # the alert that started it
    remediation: str               # the costliest of its alerts' (it may grow before the action)
    fingerprints: set[str] = field(default_factory=set)  # every alert of the node seen while it is open
    repeat_offender: bool = False
    last_error: str = ""           # the last failed step's message (an event only when it changes)

    def context(self) -> dict:
        """What a backend and a validation command get (backends/base.py)."""
        t = self.trigger
        return {"case": self.id, "node": self.node, "rack": self.rack, "site": self.site, "state": self.state,
                "alertname": t.alertname, "fingerprint": t.fingerprint, "severity": t.severity,
                "summary": t.summary, "gpu": t.gpu, "remediation": self.remediation}

    def escalate(self, remediation: str) -> None:
        self.remediation = costliest((self.remediation, remediation))


@dataclass(frozen=True)
class Event:
    """A transition, or a step refused or failed (to_state == from_state)."""
    ts: float
    site: str
    rack: str
    node: str
    case_id: str | None
    from_state: str
    to_state: str
    alertname: str | None
    fingerprint: str | None
    remediation: str | None
    guardrail: str | None
    dry_run: bool
    applied: bool
    detail: str

    def row(self) -> dict:
        return {**self.__dict__, "ts": datetime.fromtimestamp(self.ts, timezone.utc)}


def events_to_batch(events: list[Event]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([e.row() for e in events], schema=REMEDIATION_EVENT)
