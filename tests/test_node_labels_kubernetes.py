"""What Kubernetes says about nodes (power/node_labels.py, `power.node_labels` and `power.jobs`
= kubernetes), through the official client against `StandInApiServer` (tests/kube_apiserver.py:
no real API server runs here): each node's labels as key=value set the classes of a rule's
`feature`, the running pods' controllers group the nodes for the firm capacity, and an API
that refuses or does not answer keeps what was last read, saying what to do, never a token."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from pipeline.config import ConfigError, FlexRule, PowerConfig
from pipeline.power.classes import FlexClasses
from pipeline.power.node_labels import (JobPoller, LabelPoller, LabelsUnavailable, job_poller_for, kubernetes_jobs,
                                        kubernetes_labels, poller_for)
from tests.kube_apiserver import TOKEN, StandInApiServer, node_object, pod_object
from tests.test_node_labels import poll_reads


@pytest.fixture()
def api():
    server = StandInApiServer()
    yield server
    server.close()


def labelled(name: str, **labels: str) -> dict:
    node = node_object(name)
    node["metadata"]["labels"].update(labels)
    return node


def test_node_labels_set_the_classes_of_feature_rules(api, tmp_path):
    api.nodes = {"gpu-a1": labelled("gpu-a1", **{"fleetwatch.io/flex": "0"}),
                 "gpu-a2": labelled("gpu-a2", **{"fleetwatch.io/flex": "3"}), "gpu-a3": labelled("gpu-a3")}
    classes = FlexClasses(PowerConfig(classes=[FlexRule(feature="fleetwatch.io/flex=0", flex_class=0),
                                               FlexRule(feature="fleetwatch.io/flex=[1-3]", flex_class=3)],
                                      default_class=1, node_labels="kubernetes"))
    source = kubernetes_labels(str(api.kubeconfig(tmp_path / "kubeconfig")), timeout_s=5)
    assert classes.of("gpu-a2") == 0  # not read yet: nothing is capped on a guess
    labels = asyncio.run(source.fetch())
    assert "fleetwatch.io/flex=3" in labels["gpu-a2"] and "kubernetes.io/hostname=gpu-a2" in labels["gpu-a2"]
    classes.set_node_labels(labels)
    assert [classes.of(n) for n in ("gpu-a1", "gpu-a2", "gpu-a3", "gpu-a3.example.org")] == [0, 3, 1, 1]
    assert [r.path for r in api.sent("GET")] == ["/api/v1/nodes"]


def test_a_node_the_api_does_not_list_is_not_capped_on_a_guess_and_said_once(api, tmp_path, caplog):
    """dcgm-exporter without NODE_NAME names its pod, not the node: the labels never list it."""
    from pipeline.model import GPU_SAMPLE
    from tests.test_batching import of_schema
    api.nodes = {"gpu-a1": labelled("gpu-a1", **{"fleetwatch.io/flex": "3"})}
    classes = FlexClasses(PowerConfig(classes=[FlexRule(feature="fleetwatch.io/flex=0", flex_class=0),
                                               FlexRule(feature="fleetwatch.io/flex=3", flex_class=3)],
                                      default_class=2, node_labels="kubernetes"))
    classes.set_node_labels(asyncio.run(kubernetes_labels(str(api.kubeconfig(tmp_path / "kubeconfig")),
                                                          timeout_s=5).fetch()))
    with caplog.at_level(logging.WARNING, logger="pipeline.power"):
        for _ in range(2):
            got = classes.of_rows(of_schema(GPU_SAMPLE, node=["gpu-a1", "dcgm-exporter-x7k2"]))
    assert got.tolist() == [3, 0]  # flex=0 could be its label: never capped (not the default, 2)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "(dcgm-exporter-x7k2)" in warned[0] and "NODE_NAME" in warned[0], warned


def test_the_job_on_a_node_is_the_controller_of_the_pods_holding_most_of_its_gpus(api, tmp_path):
    api.pods = [
        pod_object("llama-worker-0", "gpu-a1", owner="PyTorchJob", owner_name="llama", gpus=8),
        pod_object("dcgm-exporter-x1", "gpu-a1", owner="DaemonSet", namespace="gpu-operator", gpus=8),
        pod_object("bert-0", "gpu-a2", owner="Job", owner_name="bert", gpus=2),
        pod_object("vllm-7d9f-1", "gpu-a2", owner="ReplicaSet", owner_name="vllm-7d9f", namespace="serve", gpus=3),
        pod_object("vllm-7d9f-2", "gpu-a2", owner="ReplicaSet", owner_name="vllm-7d9f", namespace="serve", gpus=3),
        pod_object("queued", "gpu-a3", phase="Pending", owner="Job", gpus=8),
        pod_object("cpu-only", "gpu-a3", owner="Job"),
        pod_object("notebook", "gpu-a4", owner="", namespace="alice", gpus=4),
        pod_object("llama-worker-1", "gpu-a5", owner="PyTorchJob", owner_name="llama", gpus=8)]
    source = kubernetes_jobs(str(api.kubeconfig(tmp_path / "kubeconfig")), timeout_s=5)
    seen: list = []
    poller = JobPoller(source, seen.append, 60.0)

    async def one_read() -> None:
        await poll_reads(poller)
        await poller.close()
    asyncio.run(one_read())
    assert seen == [{"gpu-a1": "training/PyTorchJob/llama", "gpu-a2": "serve/ReplicaSet/vllm-7d9f",
                     "gpu-a4": "alice/Pod/notebook", "gpu-a5": "training/PyTorchJob/llama"}]
    assert poller.status()["jobs"] == 3
    assert [r.path for r in api.sent("GET")] == ["/api/v1/pods?fieldSelector=status.phase%3DRunning"]


def test_the_firm_capacity_groups_nodes_by_their_kubernetes_job(api, tmp_path):
    """The power role with power.jobs = kubernetes: the largest job is the PyTorchJob on two
    nodes, and `power status` names it."""
    from tests.test_power_role import Harness
    h = Harness(tmp_path, jobs="kubernetes", kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
                node_labels_interval_s=1)
    nodes = h.sim.node_names
    api.pods = [pod_object(f"w{i}", n, owner="PyTorchJob", owner_name="llama", gpus=8) for i, n in enumerate(nodes[:6])]

    async def scenario() -> None:
        for _ in range(600):
            await h.advance(1)
            if h.role.jobs.reads:
                break
            await asyncio.sleep(0.05)
        await h.advance(5)
        await h.role.close()
    asyncio.run(scenario())
    firm = h.role.ctl.firm()
    assert firm.largest == "job training/PyTorchJob/llama" and firm.largest_gpus == 6 * 8
    assert firm.kw < firm.flexible_kw


def test_an_api_that_refuses_or_does_not_answer_keeps_what_was_read_and_says_what_to_do(api, tmp_path, caplog):
    api.nodes = {"gpu-a1": labelled("gpu-a1", **{"fleetwatch.io/flex": "0"})}
    kubeconfig = str(api.kubeconfig(tmp_path / "kubeconfig"))
    classes = FlexClasses(PowerConfig(classes=[FlexRule(feature="fleetwatch.io/flex=0", flex_class=0)],
                                      default_class=3, node_labels="kubernetes"))
    poller = LabelPoller(kubernetes_labels(kubeconfig, timeout_s=5), classes, 0.0)

    async def reads() -> None:
        await poll_reads(poller)
        api.forbidden = {"list"}
        await poll_reads(poller, 2)
        await poller.close()
    with caplog.at_level(logging.WARNING, "pipeline.power"):
        asyncio.run(reads())
    assert classes.of("gpu-a1") == 0 and poller.status()["failures"] == 2
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1, warned  # once until it changes
    assert "forbade listing nodes (HTTP 403 Forbidden" in warned[0] and "RBAC" in warned[0]
    assert "the labels last read stand" in warned[0]

    wrong = kubernetes_labels(str(api.kubeconfig(tmp_path / "wrong", token="not-" + TOKEN)), timeout_s=5)
    with pytest.raises(LabelsUnavailable, match="did not accept fleetwatch's credentials listing nodes") as refused:
        asyncio.run(wrong.fetch())
    assert TOKEN not in str(refused.value)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api.url = f"http://127.0.0.1:{port}"
    gone = kubernetes_labels(str(api.kubeconfig(tmp_path / "gone")), timeout_s=5)
    with pytest.raises(LabelsUnavailable, match=f"cannot reach the Kubernetes API at http://127.0.0.1:{port} "
                                                "listing nodes"):
        asyncio.run(gone.fetch())


def test_a_kubeconfig_that_is_not_there_is_a_config_error_at_start(tmp_path):
    settings = PowerConfig(node_labels="kubernetes", jobs="kubernetes", kubeconfig=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="power.kubeconfig: no file .*nope"):
        poller_for(settings, FlexClasses(settings))
    with pytest.raises(ConfigError, match="power.kubeconfig: no file"):
        job_poller_for(settings, lambda jobs: None)
