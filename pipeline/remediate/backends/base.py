"""What a remediation backend does to a node, and how it says it could not.

The remediation role (pipeline/remediate/) calls a backend from a worker thread, one call
at a time, and never while dry-run: each call may block (a subprocess, an API request) and
must end within its own timeout. `context` is what the role knows of the case, the same
keys for every backend (JSON on a command's stdin):

  alertname, fingerprint, remediation, severity, summary   the alert that started the case
  rack, gpu                                                 where (gpu: "" for a node alert)
  case                                                      the case id (node and its start)
"""

from __future__ import annotations

import re
from typing import Protocol

from pipeline.model import is_host_name

ACTIONS = ("reset_gpu", "reboot_node")  # what `act` may be asked; drain_inspect and replace hand off to repair
REASON_PREFIX = "fleetwatch:"           # every drain reason a backend sets starts so: ours, not an operator's


def not_a_host_name(node: str) -> str | None:
    """Why `node` reaches no backend, or None where it is one host name (model.is_host_name): a node's name
    comes from the samples (an exporter's Hostname label, a Kafka producer), and `-oProxyCommand=...` would
    reach a site's `ssh "$1"` as an option, `gpu[01-04]` or `a,b` scontrol as several nodes."""
    if is_host_name(node):
        return None
    return (f"{node!r} is not one host name (a letter or digit, then letters, digits, '.', '_' or '-'): a backend "
            f"is never called with it (a name from the samples would reach a command as an option, or a scheduler "
            f"as several nodes)")


def check_node(node: str) -> None:
    """BackendError unless `node` is one host name (not_a_host_name)."""
    if (why := not_a_host_name(node)) is not None:
        raise BackendError(why)


class BackendError(Exception):
    """A backend call failed: what was wrong and what to do (never a secret)."""


class Unsupported(BackendError):
    """The backend cannot do this action at all (Slurm cannot reset one GPU): the node is
    handed to repair instead."""


def reason(context: dict) -> str:
    """The scheduler-visible reason of a quarantine: names the alert and its fingerprint (each as
    one short word: they come from the alert rows)."""
    def word(key: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.:-]", "_", str(context.get(key, "?")))[:64] or "?"
    return f"{REASON_PREFIX} {word('alertname')} fingerprint={word('fingerprint')} remediation={word('remediation')}"


def delegated_action(scheduler: str, actions, node: str, action: str, context: dict) -> None:
    """A scheduler backend's `act`: the site's action command does it (Slurm and Kubernetes can
    neither reset a GPU nor reboot a node here); without one the node goes to repair."""
    if actions is None:
        raise Unsupported(f"{scheduler} cannot {action} (node {node}) on its own: set "
                          f"remediate.action_command to a script that does (`COMMAND NODE ACTION ALERTNAME`), "
                          f"or the node goes to repair for a person")
    actions.act(node, action, context)


class Backend(Protocol):
    name: str

    def quarantine(self, node: str, context: dict) -> None:
        """No new work on the node (Slurm: state=drain with `reason(context)`)."""

    def drained(self, node: str) -> bool:
        """Has the work on the quarantined node finished (Slurm: DRAINED, not DRAINING)?"""

    def held(self, node: str) -> bool | None:
        """Is the node still out of service by our quarantine? False: someone returned it to
        service (an operator's `scontrol update state=resume`); None: cannot tell now."""

    def act(self, node: str, action: str, context: dict) -> None:
        """Do `action` (one of ACTIONS) to the drained node; raise Unsupported if it cannot."""

    def resume(self, node: str, context: dict) -> None:
        """Back in service (Slurm: state=resume)."""
