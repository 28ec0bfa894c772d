"""`fleetwatch remediation status`: the open cases, the breaker and what the guardrails
refused, from the state the remediation role saved last (store.py)."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.remediate import store
from pipeline.remediate.remediator import Remediator


def read(cfg: Config) -> dict | None:
    """The status as of the role's last round; None when no role has run with this data_dir."""
    rem = Remediator(cfg)
    saved = store.load(cfg, rem)  # how the role ran, not how this command is configured
    if saved is None:
        return None
    return {"state_file": str(store.state_path(cfg)), **rem.status(rem.saved_at),
            "dry_run": saved.get("dry_run", True), "backend": saved.get("backend", "none")}


def text(status: dict) -> str:
    b = status["breaker"]
    lines = [f"remediation: {'dry-run (plans only)' if status['dry_run'] else 'applying'}, backend "
             f"{status['backend']}, {status['nodes_seen']} nodes seen, as of {status['as_of']}",
             f"circuit breaker: {'OPEN since ' + b['since'] + ' (' + b['where'] + ')' if b['open'] else 'closed'}; "
             f"tripped {b['trips']} times; {status['quarantines_last_hour']} quarantines in the last hour"]
    if status["refused"]:
        lines.append("refused by guardrail: " + ", ".join(f"{k} {v}" for k, v in sorted(status["refused"].items())))
    if status["exempt_by_operator"]:
        lines.append("returned by an operator (not quarantined again for the same alerts): "
                     + ", ".join(status["exempt_by_operator"]))
    if not status["cases"]:
        lines.append("no open cases")
        return "\n".join(lines)
    lines.append(f"{'node':14s} {'state':13s} {'for':>8s} {'remediation':13s} alert")
    for c in status["cases"]:
        lines.append(f"{c['node']:14s} {c['state']:13s} {c['in_state_s']:7.0f}s {c['remediation']:13s} "
                     f"{c['alertname']} ({c['fingerprint']})" + (" repeat offender" if c["repeat_offender"] else "")
                     + (f"\n{'':14s} failing: {c['failing']}" if c["failing"] else ""))
    return "\n".join(lines)
