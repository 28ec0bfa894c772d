"""The Kubernetes remediation backend (pipeline/remediate/backends/kubernetes.py), through the
real Kubernetes Python client, against `StandInApiServer`: a stand-in for kube-apiserver: no
real API server can run here (none in Debian or on PyPI; kind, minikube and envtest need
Docker or downloaded binaries).

The stand-in is a real HTTP server on a loopback port that the client reaches through a
kubeconfig written for it (a bearer token, checked). It serves only what the backend uses:
GET and PATCH of /api/v1/nodes/NAME, PATCH of /api/v1/nodes/NAME/status and GET of
/api/v1/pods?fieldSelector=spec.nodeName=NAME. It applies patches as kube-apiserver does for a
Node: a strategic merge patch replaces spec.taints whole (an atomic list) and merges
status.conditions by type, a merge patch replaces every list; `null` deletes; a resourceVersion
in the patch must be the current one (409 otherwise); the main resource ignores status and the
status subresource ignores spec; `false` and empty lists are omitted (omitempty). Errors are
Status objects, as the API server's are. Every request is recorded, so the tests also say what
the client sends. What it does not do: validation of the objects, the node lifecycle controller
(its node.kubernetes.io/unschedulable taint), JSON patch, watches.
"""

from __future__ import annotations

import copy
import json
import socket
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from pipeline.config import ConfigError
from pipeline.remediate.backends import backend_for
from pipeline.remediate.backends.base import BackendError, Unsupported
from pipeline.remediate.backends.command import Command
from pipeline.remediate.backends.kubernetes import CONDITION, TAINT_KEY, Kubernetes
from tests.conftest import make_config

TOKEN = "fw-test-token-6f1c0d2e9a"  # the bearer token of the kubeconfig: no message may show it
CONTEXT = {"alertname": "GpuUncorrectableEcc", "fingerprint": "3f2a9c", "remediation": "reset_gpu",
           "severity": "critical", "summary": "GPU 3 of gpu-a1: uncorrectable ECC errors", "rack": "r01",
           "gpu": "GPU-3", "case": "gpu-a1@2026-01-05T10:00:00Z"}
SMP = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}  # a site's own, kept
OURS = {"key": TAINT_KEY, "value": "reset_gpu", "effect": "NoSchedule"}


@dataclass
class Request:
    method: str
    path: str           # with its query, as sent
    content_type: str
    body: object


def node_object(name: str, unschedulable: bool = False, taints: list[dict] | None = None) -> dict:
    """A GPU node as kube-apiserver returns it (shortened: no images, nodeInfo, daemonEndpoints)."""
    spec: dict = {"podCIDR": "10.244.3.0/24", "providerID": f"baremetal://{name}"}
    if unschedulable:
        spec["unschedulable"] = True
    if taints:
        spec["taints"] = copy.deepcopy(taints)
    since = "2026-01-05T09:00:00Z"
    kubelet = [("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
               ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
               ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
               ("Ready", "True", "KubeletReady", "kubelet is posting ready status")]
    return {"kind": "Node", "apiVersion": "v1",
            "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": "1", "creationTimestamp": since,
                         "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
            "spec": spec,
            "status": {"capacity": {"cpu": "192", "memory": "2113245708Ki", "nvidia.com/gpu": "8", "pods": "110"},
                       "allocatable": {"cpu": "191", "memory": "2111045708Ki", "nvidia.com/gpu": "8", "pods": "110"},
                       "conditions": [{"type": t, "status": s, "reason": r, "message": m, "lastHeartbeatTime": since,
                                       "lastTransitionTime": since} for t, s, r, m in kubelet],
                       "addresses": [{"type": "InternalIP", "address": "10.0.3.11"},
                                     {"type": "Hostname", "address": name}]}}


def pod_object(name: str, node: str, phase: str = "Running", owner: str = "ReplicaSet",
               annotations: dict | None = None, namespace: str = "training") -> dict:
    meta: dict = {"name": name, "namespace": namespace, "uid": f"uid-{name}", "resourceVersion": "7"}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner, "name": f"{name}-owner",
                                    "uid": f"uid-{name}-owner", "controller": True, "blockOwnerDeletion": True}]
    if annotations:
        meta["annotations"] = annotations
    return {"metadata": meta,
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "nvcr.io/nvidia/pytorch:24.05-py3"}]},
            "status": {"phase": phase}}


def _merge(target: dict, patch: dict, strategic: bool, at: str = "") -> None:
    for key, value in patch.items():
        here = f"{at}.{key}".lstrip(".")
        if key.startswith("$"):
            raise ValueError(f"strategic merge directive {key} at {here}: not in this stand-in")
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, strategic, here)
        elif strategic and here == "status.conditions" and isinstance(value, list):
            # patchStrategy=merge, patchMergeKey=type (k8s.io/api core/v1 NodeStatus)
            for condition in value:
                old = next((c for c in target.setdefault(key, []) if c["type"] == condition["type"]), None)
                if old is None:
                    target[key].append(copy.deepcopy(condition))
                else:
                    _merge(old, condition, strategic, here)
        else:  # scalars, and lists without a merge strategy (spec.taints is atomic) are replaced
            target[key] = copy.deepcopy(value)


def _status(code: int, reason: str, message: str, name: str = "", kind: str = "nodes") -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": {"name": name, "kind": kind}, "code": code}


class StandInApiServer:
    """A stand-in for kube-apiserver: no real API server can run here (see the module docstring)."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}
        self.pods: list[dict] = []
        self.requests: list[Request] = []
        self.forbidden: set[str] = set()  # RBAC verbs (get, list, patch) the identity lacks: 403
        self.lock = threading.Lock()
        self._version = 1
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet: pytest shows failures
                pass

            def do_GET(self) -> None:
                server._serve(self)

            def do_PATCH(self) -> None:
                server._serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def kubeconfig(self, path: Path, token: str = TOKEN) -> Path:
        path.write_text(json.dumps({  # JSON is YAML: a kubeconfig as kubectl writes one
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "fleetwatch", "user": {"token": token}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "fleetwatch"}}]}))
        return path

    def sent(self, method: str = "") -> list[Request]:
        return [r for r in self.requests if r.method == method or not method]

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length)) if length else None
        content_type = h.headers.get("Content-Type", "")
        with self.lock:
            self.requests.append(Request(h.command, h.path, content_type, body))
            code, answer = self._answer(h.command, url.path, parse_qs(url.query), content_type, body,
                                        h.headers.get("Authorization", ""))
        data = json.dumps(answer).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _answer(self, method: str, path: str, query: dict, content_type: str, body: object,
                auth: str) -> tuple[int, dict]:
        if auth != f"Bearer {TOKEN}":
            return 401, _status(401, "Unauthorized", "Unauthorized")
        parts = path.strip("/").split("/")
        one = len(parts) > 3
        verb = {"GET": "get" if one else "list", "PATCH": "patch"}[method]
        if verb in self.forbidden:  # kube-apiserver's words, for a ServiceAccount
            what = f'{parts[2]} "{parts[3]}"' if one else parts[2]
            return 403, _status(403, "Forbidden", f'{what} is forbidden: User "system:serviceaccount:fleetwatch:'
                                f'fleetwatch" cannot {verb} resource "{"/".join(parts[2:5:2])}" in API group "" at '
                                f'the cluster scope', parts[3] if one else "", parts[2])
        if method == "GET" and parts == ["api", "v1", "pods"]:
            selector = query.get("fieldSelector", [""])[0]
            if not selector.startswith("spec.nodeName="):
                return 400, _status(400, "BadRequest", f"this stand-in only selects by spec.nodeName: {selector!r}")
            on = selector.removeprefix("spec.nodeName=")
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._version)},
                         "items": [p for p in self.pods if p["spec"]["nodeName"] == on]}
        if parts[:3] != ["api", "v1", "nodes"] or len(parts) not in (4, 5) or parts[4:] not in ([], ["status"]):
            return 404, _status(404, "NotFound", f"the server could not find the requested resource ({path})")
        name = parts[3]
        if name not in self.nodes:
            return 404, _status(404, "NotFound", f'nodes "{name}" not found', name)
        if method == "GET":
            return 200, self.nodes[name]
        return self._patch(name, parts[4:] == ["status"], content_type, body)

    def _patch(self, name: str, status: bool, content_type: str, patch: object) -> tuple[int, dict]:
        if content_type not in (SMP, MERGE) or not isinstance(patch, dict):
            return 415, _status(415, "UnsupportedMediaType", f"this stand-in applies only {SMP} and {MERGE} objects, "
                                f"not {content_type}", name)
        old = self.nodes[name]
        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != old["metadata"]["resourceVersion"]:
            return 409, _status(409, "Conflict", f'Operation cannot be fulfilled on nodes "{name}": the object has '
                                f'been modified; please apply your changes to the latest version and try again', name)
        new = copy.deepcopy(old)
        try:
            _merge(new, patch, content_type == SMP)
        except ValueError as e:
            return 400, _status(400, "BadRequest", str(e), name)
        kept = "spec" if status else "status"  # a subresource changes only its part
        new[kept] = copy.deepcopy(old[kept])
        new["metadata"] = copy.deepcopy(old["metadata"])  # the backend sends only a precondition there
        for key in ("unschedulable", "taints"):  # omitempty
            if not new["spec"].get(key):
                new["spec"].pop(key, None)
        for taint in new["spec"].get("taints", ()):  # a metav1.Time is kept, and shown, in UTC seconds
            if "timeAdded" in taint:
                taint["timeAdded"] = datetime.fromisoformat(taint["timeAdded"]).astimezone(timezone.utc) \
                    .strftime("%Y-%m-%dT%H:%M:%SZ")
        if new != old:
            self._version += 1
            new["metadata"]["resourceVersion"] = str(self._version)
            self.nodes[name] = new
        return 200, new

    def operator(self, name: str, patch: dict) -> dict:
        """What a person's kubectl does (`kubectl uncordon` sends this strategic merge patch)."""
        req = urllib.request.Request(f"{self.url}/api/v1/nodes/{name}", json.dumps(patch).encode(), method="PATCH",
                                     headers={"Content-Type": SMP, "Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=5) as answer:
            return json.load(answer)


@pytest.fixture()
def api():
    server = StandInApiServer()
    server.nodes = {n: node_object(n, taints=[GPU_TAINT]) for n in ("gpu-a1", "gpu-a2")}
    yield server
    server.close()


@pytest.fixture()
def k8s(api, tmp_path) -> Kubernetes:
    return Kubernetes(str(api.kubeconfig(tmp_path / "kubeconfig")), timeout_s=5)


def sent(r: Request) -> tuple[str, str, str]:
    """What a request was; a GET's content type (none, or application/json before client 32) is no matter."""
    return r.method, r.path, r.content_type if r.method == "PATCH" else ""


def condition(node: dict) -> dict | None:
    return next((c for c in node["status"]["conditions"] if c["type"] == CONDITION), None)


def test_a_quarantine_cordons_taints_and_sets_a_condition_naming_the_alert(api, k8s):
    k8s.quarantine("gpu-a1", CONTEXT)
    node = api.nodes["gpu-a1"]
    assert node["spec"]["unschedulable"] is True
    assert node["spec"]["taints"] == [GPU_TAINT, OURS]  # the site's own taint kept
    ours = condition(node)
    assert (ours["status"], ours["reason"]) == ("True", "GpuUncorrectableEcc")
    assert ours["message"] == ("fleetwatch: GpuUncorrectableEcc fingerprint=3f2a9c remediation=reset_gpu")
    assert [c["type"] for c in node["status"]["conditions"]][:4] == ["MemoryPressure", "DiskPressure", "PIDPressure",
                                                                     "Ready"]  # the kubelet's, untouched
    # What the client sent: a read, then two strategic merge patches, the second one conditional.
    assert [sent(r) for r in api.requests] == [
        ("GET", "/api/v1/nodes/gpu-a1", ""),
        ("PATCH", "/api/v1/nodes/gpu-a1/status", SMP),
        ("PATCH", "/api/v1/nodes/gpu-a1", SMP)]
    assert api.requests[2].body == {"metadata": {"resourceVersion": "2"},  # as read, before the status patch
                                    "spec": {"unschedulable": True, "taints": [GPU_TAINT, OURS]}}
    assert list(api.requests[1].body["status"]["conditions"][0]) == [
        "type", "status", "reason", "message", "lastHeartbeatTime", "lastTransitionTime"]
    assert k8s.held("gpu-a1") is True
    since = ours["lastTransitionTime"]
    k8s.quarantine("gpu-a1", {**CONTEXT, "remediation": "reboot_node"})  # again (a restart, or a costlier alert)
    node = api.nodes["gpu-a1"]
    assert node["spec"]["taints"] == [GPU_TAINT, {**OURS, "value": "reboot_node"}]  # still one of ours
    assert condition(node)["lastTransitionTime"] == since  # still "True": no transition
    assert "lastTransitionTime" not in api.requests[-2].body["status"]["conditions"][0]
    assert api.nodes["gpu-a2"] == node_object("gpu-a2", taints=[GPU_TAINT])  # no other node touched


def test_drained_waits_for_every_pod_that_needs_the_node(api, k8s):
    api.pods = [pod_object("train-0", "gpu-a1"),
                pod_object("dcgm-exporter-x7k2p", "gpu-a1", owner="DaemonSet", namespace="gpu-operator"),
                pod_object("kube-proxy-gpu-a1", "gpu-a1", owner="Node", namespace="kube-system",
                           annotations={"kubernetes.io/config.mirror": "0b7c9e", "kubernetes.io/config.source": "file"}),
                pod_object("eval-done", "gpu-a1", phase="Succeeded", owner="Job"),
                pod_object("eval-crashed", "gpu-a1", phase="Failed", owner=""),
                pod_object("train-1", "gpu-a2")]  # elsewhere
    assert k8s.drained("gpu-a1") is False  # not cordoned: new pods may come
    k8s.quarantine("gpu-a1", CONTEXT)
    assert k8s.drained("gpu-a1") is False  # train-0 runs
    listed = api.sent("GET")[-1]
    assert listed.path == "/api/v1/pods?fieldSelector=spec.nodeName%3Dgpu-a1"
    api.pods[0]["status"]["phase"] = "Succeeded"
    assert k8s.drained("gpu-a1") is True  # only a DaemonSet's, a mirror pod and finished ones left
    api.pods.append(pod_object("notebook", "gpu-a1", phase="Pending", owner=""))  # bound, not started: counts
    assert k8s.drained("gpu-a1") is False
    assert [r.method for r in api.requests].count("PATCH") == 2  # nothing evicted, nothing deleted


def test_held_ends_only_when_an_operator_has_uncordoned_and_removed_our_taint(api, k8s):
    k8s.quarantine("gpu-a1", CONTEXT)
    api.operator("gpu-a1", {"spec": {"unschedulable": None}})  # `kubectl uncordon gpu-a1`
    assert "unschedulable" not in api.nodes["gpu-a1"]["spec"]
    assert k8s.held("gpu-a1") is True  # our NoSchedule taint still keeps new pods off
    api.operator("gpu-a1", {"spec": {"taints": [GPU_TAINT]}})  # `kubectl taint node gpu-a1 fleetwatch.io/remediation-`
    assert k8s.held("gpu-a1") is False  # returned to service by hand
    k8s.resume("gpu-a1", CONTEXT)  # nothing to undo but our condition
    assert api.sent("PATCH")[-1].path == "/api/v1/nodes/gpu-a1/status"
    assert condition(api.nodes["gpu-a1"])["status"] == "False"
    k8s.resume("gpu-a1", CONTEXT)  # and a second time nothing at all
    assert api.requests[-1].method == "GET"


def test_resume_removes_only_our_taint_and_uncordons(api, k8s):
    unreachable = {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "timeAdded": "2026-01-05T09:30:00Z"}
    api.nodes["gpu-a1"]["spec"]["taints"].append(unreachable)  # the node lifecycle controller's, with a time
    k8s.quarantine("gpu-a1", CONTEXT)
    theirs = api.sent("PATCH")[1].body["spec"]["taints"][1]  # the client writes the time its own way
    assert datetime.fromisoformat(theirs["timeAdded"]) == datetime.fromisoformat(unreachable["timeAdded"])
    assert api.nodes["gpu-a1"]["spec"]["taints"] == [GPU_TAINT, unreachable, OURS]
    began = len(api.requests)
    k8s.resume("gpu-a1", CONTEXT)
    node = api.nodes["gpu-a1"]
    assert "unschedulable" not in node["spec"] and node["spec"]["taints"] == [GPU_TAINT, unreachable]
    ours = condition(node)
    assert (ours["status"], ours["reason"]) == ("False", "Remediated")
    assert ours["message"] == "fleetwatch: back in service after GpuUncorrectableEcc fingerprint=3f2a9c"
    assert [sent(r) for r in api.requests[began:]] == [
        ("GET", "/api/v1/nodes/gpu-a1", ""), ("PATCH", "/api/v1/nodes/gpu-a1", SMP),
        ("PATCH", "/api/v1/nodes/gpu-a1/status", SMP)]
    assert api.requests[began + 1].body["spec"]["unschedulable"] is False
    assert k8s.held("gpu-a1") is False
    api.nodes["gpu-a2"]["spec"].pop("taints")
    k8s.quarantine("gpu-a2", CONTEXT)
    k8s.resume("gpu-a2", CONTEXT)
    assert api.nodes["gpu-a2"]["spec"] == {"podCIDR": "10.244.3.0/24", "providerID": "baremetal://gpu-a2"}


def test_someone_elses_cordon_is_never_taken_over(api, k8s):
    api.nodes["gpu-a2"] = node_object("gpu-a2", unschedulable=True, taints=[GPU_TAINT])  # `kubectl cordon gpu-a2`
    before = copy.deepcopy(api.nodes["gpu-a2"])
    with pytest.raises(BackendError, match=r"node gpu-a2 is cordoned by someone else \(no fleetwatch.io/remediation "
                                           r"taint\): fleetwatch does not take over and later uncordon it; whoever "
                                           r"cordoned it uncordons it \(`kubectl uncordon gpu-a2`\)"):
        k8s.quarantine("gpu-a2", CONTEXT)
    assert k8s.held("gpu-a2") is True  # out of service, by them
    k8s.quarantine("gpu-a1", CONTEXT)
    api.operator("gpu-a1", {"spec": {"taints": [GPU_TAINT]}})  # an operator keeps the cordon, drops our mark
    with pytest.raises(BackendError, match="node gpu-a1 is cordoned by someone else .* does not uncordon it"):
        k8s.resume("gpu-a1", CONTEXT)
    assert api.nodes["gpu-a2"] == before and api.nodes["gpu-a1"]["spec"]["unschedulable"] is True
    assert [r.path for r in api.sent("PATCH")] == ["/api/v1/nodes/gpu-a1/status", "/api/v1/nodes/gpu-a1",
                                                    "/api/v1/nodes/gpu-a1"]  # ours, then the operator's


def test_a_node_changed_since_it_was_read_is_not_overwritten(api, k8s):
    read = k8s._read("gpu-a1")
    api.operator("gpu-a1", {"spec": {"taints": [GPU_TAINT, {"key": "ops/fan", "effect": "NoSchedule"}]}})
    with pytest.raises(BackendError, match=r"node gpu-a1 changed while fleetwatch was cordoning and tainting it "
                                           r"\(HTTP 409 Conflict: Operation cannot be fulfilled.*tried again next"):
        k8s._set("gpu-a1", read, True, [*read.spec.taints], "cordoning and tainting")
    assert api.nodes["gpu-a1"]["spec"]["taints"][1]["key"] == "ops/fan"  # theirs not lost
    k8s.quarantine("gpu-a1", CONTEXT)  # the next round reads it anew
    assert [t["key"] for t in api.nodes["gpu-a1"]["spec"]["taints"]] == ["nvidia.com/gpu", "ops/fan", TAINT_KEY]


def test_api_errors_say_what_to_do_and_never_show_the_token(api, k8s, tmp_path):
    api.forbidden = {"patch"}
    with pytest.raises(BackendError) as e:
        k8s.quarantine("gpu-a1", CONTEXT)
    said = str(e.value)
    assert said.startswith("the Kubernetes API forbade setting the FleetwatchRemediation condition of node gpu-a1 "
                           '(HTTP 403 Forbidden: nodes "gpu-a1" is forbidden: User "system:serviceaccount:fleetwatch:'
                           'fleetwatch" cannot patch resource "nodes/status" in API group "" at the cluster scope): '
                           'RBAC: '), said  # the first write: nothing changed, no node left cordoned
    assert said.endswith("RBAC: the identity fleetwatch uses (the pod's service account, or the kubeconfig's user) "
                         "needs, in a ClusterRole bound to it: get and patch on nodes and nodes/status, list on pods")
    api.forbidden = {"get"}
    with pytest.raises(BackendError, match=r"forbade reading node gpu-a1 .*cannot get resource \"nodes\".*RBAC"):
        k8s.drained("gpu-a1")
    assert k8s.held("gpu-a1") is None  # cannot tell: asked again later
    api.forbidden = {"list"}
    api.nodes["gpu-a2"] = node_object("gpu-a2", unschedulable=True, taints=[OURS])
    with pytest.raises(BackendError, match=r"forbade listing the pods of node gpu-a2 \(HTTP 403 Forbidden: pods is "
                                           r"forbidden: .* cannot list resource \"pods\" in API group \"\" at the "
                                           r"cluster scope\): RBAC"):
        k8s.drained("gpu-a2")
    api.forbidden = set()
    with pytest.raises(BackendError, match=r"no node r09-n99 in the cluster while reading it \(HTTP 404 Not Found: "
                                           r"nodes \"r09-n99\" not found\): is it a node of this cluster"):
        k8s.quarantine("r09-n99", CONTEXT)
    stale = "fw-old-token-0000"
    with pytest.raises(BackendError, match=r"did not accept fleetwatch's credentials while reading node gpu-a1 "
                                           r"\(HTTP 401 Unauthorized: Unauthorized\): renew the token") as e:
        Kubernetes(str(api.kubeconfig(tmp_path / "stale", token=stale)), timeout_s=5).resume("gpu-a1", CONTEXT)
    assert stale not in str(e.value)
    assert all(TOKEN not in str(x) for x in (said, e.value))
    assert api.nodes["gpu-a1"] == node_object("gpu-a1", taints=[GPU_TAINT])  # nothing changed


def test_an_unreachable_or_silent_api_server_fails_fast(tmp_path):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    server = StandInApiServer()
    server.url = f"http://127.0.0.1:{port}"
    server.close()
    began = time.monotonic()
    with pytest.raises(BackendError, match=rf"cannot reach the Kubernetes API at http://127.0.0.1:{port} while "
                                           rf"reading node gpu-a1 \(.*Connection refused\): is the API server up"):
        Kubernetes(str(server.kubeconfig(tmp_path / "kubeconfig")), timeout_s=1).quarantine("gpu-a1", CONTEXT)
    assert time.monotonic() - began < 2
    with socket.socket() as silent:  # accepts (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        server.url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        k8s = Kubernetes(str(server.kubeconfig(tmp_path / "kubeconfig")), timeout_s=0.5)
        began = time.monotonic()
        with pytest.raises(BackendError, match=r"the Kubernetes API at http://127.0.0.1:\d+ did not answer within "
                                               r"0.5 s while reading node gpu-a1: is the API server up"):
            k8s.drained("gpu-a1")
        assert k8s.held("gpu-a1") is None
        assert time.monotonic() - began < 3  # 2 x 0.5 s: no retries (urllib3's 3 would make it 4 s)


def test_kubernetes_cannot_act_on_its_own_and_hands_actions_to_the_action_command(k8s, tmp_path):
    with pytest.raises(Unsupported, match=r"Kubernetes cannot reset_gpu \(node gpu-a1\) on its own: set "
                                          r"remediate.action_command"):
        k8s.act("gpu-a1", "reset_gpu", CONTEXT)
    seen = tmp_path / "args"
    script = tmp_path / "act.sh"
    script.write_text(f'#!/bin/bash\necho "$@" > {seen}\ncat > /dev/null\n')
    k8s.actions = Command(f"bash {script}", timeout_s=10)
    k8s.act("gpu-a1", "reboot_node", CONTEXT)
    assert seen.read_text() == "gpu-a1 reboot_node GpuUncorrectableEcc\n"


def test_the_kubernetes_backend_comes_from_the_config(api, tmp_path, monkeypatch):
    path = str(api.kubeconfig(tmp_path / "kubeconfig"))
    assert backend_for(make_config()) is None  # off by default
    k8s = backend_for(make_config(remediate={"backend": "kubernetes", "kubeconfig": path, "command_timeout_s": 30,
                                             "action_command": "bash /opt/site/act.sh"}))
    assert isinstance(k8s, Kubernetes) and (k8s.name, k8s.timeout_s, k8s.host) == ("kubernetes", 30, api.url)
    assert k8s.actions.argv == ["bash", "/opt/site/act.sh"]
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", path)  # empty remediate.kubeconfig: as kubectl finds one
    default = backend_for(make_config(remediate={"backend": "kubernetes"}))
    assert default.actions is None and default.held("gpu-a1") is False
    with pytest.raises(ConfigError, match=r"remediate.kubeconfig: no file '/nonexistent/kubeconfig': give the path"):
        Kubernetes("/nonexistent/kubeconfig")
    broken = tmp_path / "broken"
    broken.write_text(f"clusters:\n- name: x\n  token: {TOKEN}\n   bad: [\n")
    with pytest.raises(ConfigError, match=r"cannot read kubeconfig .*broken for remediate.backend = kubernetes "
                                          r"\(\w+Error\): check that it is a readable kubeconfig") as e:
        Kubernetes(str(broken))
    assert TOKEN not in str(e.value)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")  # in a pod, but no service account mounted here
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(ConfigError, match=r"cannot use the pod's service account for remediate.backend = kubernetes "
                                          r"\(Service token file does not exist.\): set remediate.kubeconfig"):
        Kubernetes()
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # the client not installed
    with pytest.raises(ConfigError, match=r"needs the Kubernetes Python client \(.*\): pip install 'fleetwatch\[kubernetes\]'"):
        Kubernetes(path)
