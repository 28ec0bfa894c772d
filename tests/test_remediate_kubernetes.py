"""The Kubernetes remediation backend (pipeline/remediate/backends/kubernetes.py), through the
real Kubernetes Python client, against `StandInApiServer` (tests/kube_apiserver.py): a stand-in
for kube-apiserver, since no real API server can run here. Every request is recorded, so the
tests also say what the client sends.
"""

from __future__ import annotations

import copy
import socket
import sys
import time
from datetime import datetime

import pytest

from pipeline.config import ConfigError
from pipeline.remediate.backends import backend_for
from pipeline.remediate.backends.base import BackendError, Unsupported
from pipeline.remediate.backends.command import Command
from pipeline.remediate.backends.kubernetes import CONDITION, TAINT_KEY, Kubernetes
from tests.conftest import make_config
from tests.kube_apiserver import SMP, TOKEN, Request, StandInApiServer, node_object, pod_object

CONTEXT = {"alertname": "GpuUncorrectableEcc", "fingerprint": "3f2a9c", "remediation": "reset_gpu",
           "severity": "critical", "summary": "GPU 3 of gpu-a1: uncorrectable ECC errors", "rack": "r01",
           "gpu": "GPU-3", "case": "gpu-a1@2026-01-05T10:00:00Z"}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}  # a site's own, kept
OURS = {"key": TAINT_KEY, "value": "reset_gpu", "effect": "NoSchedule"}


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
