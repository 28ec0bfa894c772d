"""The Kubernetes backend, through the official Python client (`pip install
'fleetwatch[kubernetes]'`): a quarantine cordons the node (spec.unschedulable), adds the taint
`fleetwatch.io/remediation=<remediation>:NoSchedule` that marks the cordon as ours, and sets
the NodeCondition `FleetwatchRemediation` (status "True", the alert in its reason and message);
a resume removes the taint, uncordons, and sets the condition to "False". Fleetwatch's node
names must be the Kubernetes node names.

The cluster is the one remediate.kubeconfig names; empty: the pod's service account inside a
cluster (KUBERNETES_SERVICE_HOST set), else $KUBECONFIG or ~/.kube/config. Its identity needs,
in a ClusterRole: get and patch on nodes and nodes/status, list on pods.

- drained: the node is cordoned and no pod on it still needs it; DaemonSet pods (they stay on
  every node), mirror pods (the kubelet's static pods) and finished pods (Succeeded, Failed)
  do not count. Nothing is evicted: the policy is to wait for the work to end
  (remediate.drain_timeout_s and remediate.on_drain_timeout say for how long).
- held: the node is cordoned or carries our taint (NoSchedule: it alone keeps new pods off);
  neither: someone returned it to service (`kubectl uncordon NODE` and `kubectl taint node NODE
  fleetwatch.io/remediation-`).
- quarantine and resume never take over someone else's cordon (the node is unschedulable
  without our taint): the call fails, saying so, and changes nothing.

The taint list is replaced whole (a strategic merge patch does so for spec.taints), so each
change carries the resourceVersion it was computed from: a node changed meanwhile answers 409
and the step is tried again next round, never losing another's taint. The node lifecycle
controller's own node.kubernetes.io/unschedulable taint follows the cordon; it is left to it.

Kubernetes cannot reset a GPU or reboot a node for us: `actions` (remediate.action_command)
does, or the node goes to repair. Each API request waits at most `timeout_s` to connect and as
long for the answer; urllib3 does not retry it (a retry would multiply the wait): the role tries
the step again next round.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Callable

from pipeline.kube import connect, needs_node, said, unanswered
from pipeline.remediate.backends.base import REASON_PREFIX, BackendError, delegated_action, reason
from pipeline.remediate.backends.command import Command

TAINT_KEY = "fleetwatch.io/remediation"
CONDITION = "FleetwatchRemediation"
_RBAC = ("the identity fleetwatch uses (the pod's service account, or the kubeconfig's user) needs, in a "
         "ClusterRole bound to it: get and patch on nodes and nodes/status, list on pods")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ours(taint: Any) -> bool:
    return taint.key == TAINT_KEY


def _our_condition(node: Any) -> Any:
    return next((c for c in (node.status.conditions if node.status else None) or () if c.type == CONDITION), None)


class Kubernetes:
    name = "kubernetes"

    def __init__(self, kubeconfig: str = "", timeout_s: float = 60.0, actions: Command | None = None) -> None:
        self.kubeconfig, self.timeout_s, self.actions = kubeconfig, timeout_s, actions
        self.cluster = connect(kubeconfig, "remediate.kubeconfig", "remediate.backend = kubernetes")
        self.host, self.api = self.cluster.host, self.cluster.api

    # ---- the API, its errors said so that a person can act on them ----

    def _call(self, node: str, doing: str, request: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            # (connect, read): clients before 32 ignore a single float, waiting for ever
            return request(*args, _request_timeout=(self.timeout_s, self.timeout_s), **kwargs)
        except self.cluster.ApiException as e:
            raise BackendError(self._refused(node, doing, e)) from None
        except self.cluster.HTTPError as e:  # no answer at all
            raise BackendError(unanswered(self.cluster, e, self.timeout_s, f"while {doing} node {node}", self._where(),
                                          " (remediate.command_timeout_s sets the wait)")) from None

    def _where(self) -> str:
        return f"remediate.kubeconfig ({self.kubeconfig})" if self.kubeconfig else "the kubeconfig in use"

    def _refused(self, node: str, doing: str, e: Any) -> str:
        status = said(e)
        if e.status == 401:
            return (f"the Kubernetes API did not accept fleetwatch's credentials while {doing} node {node} ({status}): "
                    f"renew the token or client certificate of {self._where()} (in a pod: its service account)")
        if e.status == 403:
            return f"the Kubernetes API forbade {doing} node {node} ({status}): RBAC: {_RBAC}"
        if e.status == 404:
            return (f"no node {node} in the cluster while {doing} it ({status}): is it a node of this cluster "
                    f"(`kubectl get node {node}`)? fleetwatch's node names must be the Kubernetes ones")
        if e.status == 409:
            return (f"node {node} changed while fleetwatch was {doing} it ({status}): nothing was changed; it is "
                    f"tried again next round")
        return (f"the Kubernetes API failed while {doing} node {node} ({status}): is the API server healthy "
                f"(`kubectl get --raw /readyz`)?")

    def _read(self, node: str) -> Any:
        return self._call(node, "reading", self.api.read_node, node)

    def _set(self, node: str, now: Any, unschedulable: bool, taints: list[Any], doing: str) -> None:
        """spec.unschedulable and the whole taint list, if the node is still as read."""
        sent = [self.api.api_client.sanitize_for_serialization(t) for t in taints]
        self._call(node, doing, self.api.patch_node, node,
                   {"metadata": {"resourceVersion": now.metadata.resource_version},
                    "spec": {"unschedulable": unschedulable, "taints": sent}})

    def _condition(self, node: str, now: Any, status: str, why: str, message: str) -> Any:
        """Our NodeCondition, merged by type: the kubelet's and others' stay as they are, and
        so does our lastTransitionTime unless the status changes. Returns the node after it."""
        stamp = _now()
        condition = {"type": CONDITION, "status": status, "reason": why, "message": message,
                     "lastHeartbeatTime": stamp}
        old = _our_condition(now)
        if old is None or old.status != status:
            condition["lastTransitionTime"] = stamp
        return self._call(node, f"setting the {CONDITION} condition of", self.api.patch_node_status, node,
                   {"status": {"conditions": [condition]}})

    def _refuse_someone_elses_cordon(self, node: str, now: Any, doing: str) -> None:
        if now.spec.unschedulable and not any(_ours(t) for t in now.spec.taints or ()):
            raise BackendError(f"node {node} is cordoned by someone else (no {TAINT_KEY} taint): fleetwatch does not "
                               f"{doing} it; whoever cordoned it uncordons it (`kubectl uncordon {node}`)")

    # ---- the Backend protocol ----

    def quarantine(self, node: str, context: dict) -> None:
        now = self._read(node)
        self._refuse_someone_elses_cordon(node, now, "take over and later uncordon")
        # The condition first: without the right to write it (nodes/status) nothing that matters
        # changes, so no node is left cordoned without a case. Its answer is the node as it is now,
        # with the resourceVersion the cordon must be computed from (a status write changes it).
        why = re.sub(r"[^A-Za-z0-9]", "", str(context.get("alertname", ""))) or "Remediation"
        now = self._condition(node, now, "True", why, reason(context))
        self._refuse_someone_elses_cordon(node, now, "take over and later uncordon")  # cordoned meanwhile
        taint = {"key": TAINT_KEY, "value": str(context.get("remediation", "")), "effect": "NoSchedule"}
        keep = [t for t in now.spec.taints or () if not _ours(t)]  # a repeat replaces our own
        self._set(node, now, True, [*keep, taint], "cordoning and tainting")

    def drained(self, node: str) -> bool:
        if not self._read(node).spec.unschedulable:
            return False  # not cordoned: new pods may come (as Slurm's DRAINED needs DRAIN)
        pods = self._call(node, "listing the pods of", self.api.list_pod_for_all_namespaces,
                          field_selector=f"spec.nodeName={node}")
        return not any(needs_node(p) for p in pods.items)

    def held(self, node: str) -> bool | None:
        try:
            now = self._read(node)
        except BackendError:
            return None  # cannot tell now: the caller asks again later
        return bool(now.spec.unschedulable) or any(_ours(t) for t in now.spec.taints or ())

    def act(self, node: str, action: str, context: dict) -> None:
        delegated_action("Kubernetes", self.actions, node, action, context)

    def resume(self, node: str, context: dict) -> None:
        now = self._read(node)
        self._refuse_someone_elses_cordon(node, now, "uncordon")
        taints = now.spec.taints or []
        if now.spec.unschedulable or any(_ours(t) for t in taints):
            self._set(node, now, False, [t for t in taints if not _ours(t)], "uncordoning")
        elif getattr(_our_condition(now), "status", "False") == "False":
            return  # returned to service by hand, and our condition says so already (or never existed)
        self._condition(node, now, "False", "Remediated", f"{REASON_PREFIX} back in service after "
                        f"{context.get('alertname', '?')} fingerprint={context.get('fingerprint', '?')}")
