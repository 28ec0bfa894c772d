"""A stand-in for kube-apiserver: no real API server can run here (none in Debian or on PyPI;
kind, minikube and envtest need Docker or downloaded binaries).

`StandInApiServer` is a real HTTP server on a loopback port that the official client reaches
through a kubeconfig written for it (a bearer token, checked). It serves only what Fleetwatch
uses: GET of /api/v1/nodes (a list) and /api/v1/nodes/NAME, PATCH of /api/v1/nodes/NAME and
/api/v1/nodes/NAME/status, and GET of /api/v1/pods with the field selector
spec.nodeName=NAME or status.phase=Running. It applies patches as kube-apiserver does for a
Node: a strategic merge patch replaces spec.taints whole (an atomic list) and merges
status.conditions by type, a merge patch replaces every list; `null` deletes; a resourceVersion
in the patch must be the current one (409 otherwise); the main resource ignores status and the
status subresource ignores spec; `false` and empty lists are omitted (omitempty). Errors are
Status objects, as the API server's are. Every request is recorded, so the tests also say what
the client sends. What it does not do: validation of the objects, the node lifecycle controller
(its node.kubernetes.io/unschedulable taint), label selectors, JSON patch, watches.
"""

from __future__ import annotations

import copy
import json
import threading
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

TOKEN = "fw-test-token-6f1c0d2e9a"  # the bearer token of the kubeconfig: no message may show it
SMP = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"


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
               annotations: dict | None = None, namespace: str = "training", owner_name: str = "",
               gpus: int = 0) -> dict:
    """A pod on `node`; `owner`: its controller's kind (none: ""), named `owner_name` (default
    "<name>-owner"); `gpus`: the nvidia.com/gpu its container is limited to (none: no resources)."""
    meta: dict = {"name": name, "namespace": namespace, "uid": f"uid-{name}", "resourceVersion": "7"}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner, "name": owner_name or f"{name}-owner",
                                    "uid": f"uid-{name}-owner", "controller": True, "blockOwnerDeletion": True}]
    if annotations:
        meta["annotations"] = annotations
    container: dict = {"name": "main", "image": "nvcr.io/nvidia/pytorch:24.05-py3"}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"nvidia.com/gpu": str(gpus)}}
    return {"metadata": meta, "spec": {"nodeName": node, "containers": [container]}, "status": {"phase": phase}}


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
            field, _, wanted = selector.partition("=")
            if field not in ("spec.nodeName", "status.phase"):
                return 400, _status(400, "BadRequest", f"this stand-in selects only by spec.nodeName or status.phase: "
                                    f"{selector!r}")
            key = ("spec", "nodeName") if field == "spec.nodeName" else ("status", "phase")
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._version)},
                         "items": [p for p in self.pods if p[key[0]].get(key[1]) == wanted]}
        if method == "GET" and parts == ["api", "v1", "nodes"]:
            return 200, {"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._version)},
                         "items": list(self.nodes.values())}
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


