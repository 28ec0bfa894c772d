"""What the scheduler says about nodes (power/node_labels.py): Slurm's node features, read
by sinfo from a real slurmctld, set the classes of a rule's `feature`; the labels follow
`scontrol update`; a scheduler that cannot answer keeps the labels last read, and before the
first read every GPU is class 0. Its running jobs, read by squeue from a real slurmctld and
slurmd, group the nodes for the firm capacity."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time

import numpy as np
import pytest

from pipeline.config import FlexRule, PowerConfig
from pipeline.model import GPU_SAMPLE
from pipeline.power.actuator import Actuator
from pipeline.power.classes import FlexClasses
from pipeline.power.controller import Controller
from pipeline.power.curve import from_recording
from pipeline.power.node_labels import (JobPoller, LabelPoller, LabelsUnavailable, Poller, SlurmQuery,
                                        expand_hostlist, gpus_of_tres, parse_sinfo, parse_squeue, slurm_features,
                                        slurm_jobs)
from tests.conftest import fleetwatch, make_config
from tests.services import Slurmctld, slurm_binary
from tests.test_batching import of_schema

async def poll_reads(poller: Poller, times: int = 1) -> None:
    """`times` reads of the poller's source, each handed over as the role's loop does it: a
    poll starts the fetch, the next after it finished takes the result."""
    for _ in range(times):
        poller.poll()
        while poller._task is not None and not poller._task.done():
            await asyncio.sleep(0.02)
        poller.poll()


RULES = [FlexRule(feature="noflex", flex_class=0), FlexRule(feature="flex[1-3]", flex_class=3),
         FlexRule("r02-*", 1)]
NODES = {"r01-n01": "noflex", "r01-n02": "flex3,ib", "r01-n03": "", "r02-n01": "flex1", "r02-n02": ""}


def test_sinfo_lines_become_each_nodes_labels():
    text = "r01-n01|flex3\nr01-n02|(null)\nr01-n01|flex3,ib\nr02-n01|gpu, flex1\n\n"  # a node per partition
    assert parse_sinfo(text) == {"r01-n01": frozenset({"flex3", "ib"}), "r01-n02": frozenset(),
                                 "r02-n01": frozenset({"gpu", "flex1"})}


def test_a_feature_rule_matches_a_label_of_the_node_and_nothing_is_capped_before_they_are_read():
    c = FlexClasses(PowerConfig(default_class=2, classes=RULES, node_labels="slurm"))
    assert [c.of(n) for n in NODES] == [0, 0, 0, 0, 0]  # not read yet: never capped on a guess
    assert c.set_node_labels(parse_sinfo("\n".join(f"{n}|{f}" for n, f in NODES.items())))
    assert [c.of(n) for n in NODES] == [0, 3, 2, 3, 1]
    assert c.of("r01-n02.dc1.example.com") == 3  # samples with the full host name, Slurm with the short one
    assert not c.set_node_labels(c.node_labels)  # the same labels again: nothing to take again
    without = FlexClasses(PowerConfig(default_class=2, classes=RULES[2:]))  # no source: labels are none, known
    assert [without.of(n) for n in NODES] == [2, 2, 2, 1, 1]


def test_a_node_the_labels_do_not_list_is_not_capped_on_a_guess():
    """Labels read, but not the sample's node (Slurm's NodeName is not its host name): it takes
    the most protective class a feature rule could give it, not the default."""
    c = FlexClasses(PowerConfig(default_class=2, classes=RULES, node_labels="slurm"))
    c.set_node_labels(parse_sinfo("r01-n01|noflex\nr01-n03|(null)\n"))
    assert c.of("r09-n01") == 0  # noflex could be its: never capped (was the default, 2)
    assert c.of("r01-n03") == 2 and c.of("r01-n03.dc1.example.com") == 2  # listed with no labels: the default
    ordered = FlexClasses(PowerConfig(default_class=2, node_labels="slurm", classes=[
        FlexRule(feature="flex3", flex_class=3), FlexRule("r02-*", 1), FlexRule(feature="noflex", flex_class=0)]))
    ordered.set_node_labels({})
    # the feature rules down to the first rule that matches without one (r02-*: 1), else the default
    assert ordered.of("r09-n01") == 0 and ordered.of("r02-n01") == 1
    deeper = FlexClasses(PowerConfig(default_class=2, node_labels="slurm", classes=[FlexRule(feature="flex3",
                                                                                             flex_class=3)]))
    deeper.set_node_labels({})
    assert deeper.of("r09-n01") == 2  # no feature rule protects more than the default


@pytest.fixture()
def slurm(tmp_path):
    ctl = Slurmctld(NODES, tmp_path / "slurm").start(timeout_s=60)
    yield ctl
    ctl.close()


async def _read(source: SlurmQuery, tries: int = 100):
    """sinfo, until slurmctld (listening) answers."""
    for _ in range(tries):
        try:
            return await source.fetch()
        except LabelsUnavailable:
            await asyncio.sleep(0.1)
    return await source.fetch()


def test_slurm_features_are_read_from_slurmctld_and_follow_scontrol_update(slurm):
    source = slurm_features(env=slurm.env)
    labels = asyncio.run(_read(source))
    assert labels == {n: frozenset(f.split(",")) if f else frozenset() for n, f in NODES.items()}
    slurm.scontrol("update", "NodeName=r01-n03", "AvailableFeatures=flex2", "ActiveFeatures=flex2")
    assert asyncio.run(source.fetch())["r01-n03"] == {"flex2"}


def test_a_slurmctld_that_does_not_answer_keeps_the_labels_last_read_and_says_so_once(slurm, caplog):
    class Nowhere(Actuator):
        def apply(self, caps):
            pass
    cfg = make_config(power={"node_labels": "slurm", "classes": [{"feature": "noflex", "flex_class": 0},
                                                                 {"feature": "flex3", "flex_class": 3}]}).power
    ctl = Controller("site-a", from_recording(), Nowhere(), cfg)
    now = [0.0]
    poller = LabelPoller(slurm_features(env=slurm.env, timeout_s=2), ctl.classes, 60.0, clock=lambda: now[0])
    batch = of_schema(GPU_SAMPLE, node=list(NODES), gpu_uuid=[f"GPU-{i}" for i in range(len(NODES))],
                      power_w=[650.0] * len(NODES), util_gpu=[0.9] * len(NODES), power_limit_w=[700.0] * len(NODES))

    async def run_poller(steps: int) -> None:
        for _ in range(steps):
            poller.poll()
            await asyncio.sleep(0.05)
        for _ in range(200):  # the fetch in flight, taken
            if poller._task is None or poller._task.done():
                break
            await asyncio.sleep(0.05)
        poller.poll()
        now[0] += 61.0

    async def scenario() -> None:
        ctl.observe_gpus(batch)
        assert ctl.gpus.flex.tolist() == [0] * 5 and np.isclose(ctl.flexible_kw(), 0.0)  # not read yet
        for _ in range(100):
            await run_poller(1)
            if poller.reads:
                break
        ctl.observe_gpus(batch)
        assert ctl.gpus.flex.tolist() == [0, 3, 2, 2, 2]
        slurm.stop()
        with caplog.at_level(logging.WARNING, logger="pipeline.power"):
            for _ in range(3):
                await run_poller(1)
        ctl.observe_gpus(batch)
        assert ctl.gpus.flex.tolist() == [0, 3, 2, 2, 2]  # the labels last read stand
        warned = [r.getMessage() for r in caplog.records if "node labels from slurm" in r.getMessage()]
        assert len(warned) == 1 and "the labels last read stand" in warned[0], warned
        assert poller.failures == 3
        assert poller.status() == {"source": "slurm", "read": True, "nodes": 5, "reads": 1, "failures": 3,
                                   "failing": poller.failure}
        assert "did not answer within 2 s" in poller.failure or "exited with" in poller.failure
        await poller.close()
    asyncio.run(scenario())


def test_nodes_slurm_does_not_list_are_never_capped_and_said_once(slurm, caplog):
    """Labels read from slurmctld, but the samples name nodes by a host name Slurm's NodeName is
    not: their GPUs take class 0 (noflex could be theirs), not the default (2); one warning names
    a few of them and the likely cause; a node first named after a read is said at the next."""
    class Nowhere(Actuator):
        def apply(self, caps):
            pass
    cfg = make_config(power={"node_labels": "slurm", "default_class": 2, "classes": [
        {"feature": "noflex", "flex_class": 0}, {"feature": "flex3", "flex_class": 3}]}).power
    ctl = Controller("site-a", from_recording(), Nowhere(), cfg)
    now = [0.0]  # a read when the test says (none in flight at an assert: asyncio.run would wait on it)
    poller = LabelPoller(slurm_features(env=slurm.env, timeout_s=5), ctl.classes, 60.0, clock=lambda: now[0])

    async def read() -> None:
        now[0] += 61.0
        await poll_reads(poller)

    def batch(nodes: list[str]):
        return of_schema(GPU_SAMPLE, node=nodes, gpu_uuid=[f"GPU-{n}" for n in nodes], power_w=[650.0] * len(nodes),
                         util_gpu=[0.9] * len(nodes), power_limit_w=[700.0] * len(nodes))
    named = ["r01-n01", "r01-n03.dc1.example.com", *(f"dgx-r01-n{i:02d}" for i in range(1, 8))]

    async def scenario() -> None:
        ctl.observe_gpus(batch(named))
        for _ in range(100):  # until slurmctld answers
            await read()
            if poller.reads:
                break
            await asyncio.sleep(0.1)
        ctl.observe_gpus(batch(named))
        assert ctl.gpus.flex.tolist() == [0, 2] + [0] * 7
        ctl.observe_gpus(batch(["dgx-r02-n01"]))  # named after the read
        assert ctl.gpus.flex.tolist()[-1] == 0
        for _ in range(3):
            await read()
        await poller.close()
    with caplog.at_level(logging.WARNING, logger="pipeline.power"):
        asyncio.run(scenario())
    warned = [r.getMessage() for r in caplog.records if "do not list" in r.getMessage()]
    assert len(warned) == 2, warned
    assert ("do not list 7 node(s) the samples name (dgx-r01-n01, dgx-r01-n02, dgx-r01-n03, dgx-r01-n04, "
            "dgx-r01-n05 and 2 more)") in warned[0] and "NodeName" in warned[0] and "NodeHostname" in warned[0]
    assert "do not list 1 node(s) the samples name (dgx-r02-n01)" in warned[1]


def test_sinfo_missing_is_an_error_that_says_what_to_do():
    with pytest.raises(LabelsUnavailable, match="install Slurm's client .* or set power.sinfo"):
        asyncio.run(slurm_features(sinfo="/nonexistent/sinfo").fetch())


def test_the_power_role_never_caps_a_node_slurm_protects(tmp_path, monkeypatch):
    """The role reads the features in its loop: a request caps the fleet, never the GPUs of
    r01-n07 and r02-n06 (feature noflex: class 0), which it caps without the labels (the
    default class, 3, lets the plan take them: they are among its cheapest). A node marked
    noflex during the request has its caps lifted at the next read."""
    from tests.test_power_role import Harness
    plain = Harness(tmp_path / "plain")
    slurm = Slurmctld({**dict.fromkeys(plain.sim.node_names, ""), "r01-n07": "noflex", "r02-n06": "ib,noflex",
                       "r01-n05": "flex3", "r02-n08": "flex3"}, tmp_path / "slurm").start()
    try:
        monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
        labelled = Harness(tmp_path / "labelled", node_labels="slurm", node_labels_interval_s=1,
                           classes=[{"feature": "noflex", "flex_class": 0}])
        late = np.array(plain.sim.node_names)[plain.sim.gpu_node] == "r02-n08"

        async def scenario(h: Harness) -> np.ndarray:  # one event loop, as in the daemon: sinfo runs beside the ticks
            if h.role.labels is not None:
                for _ in range(600):
                    await h.advance(1)
                    if h.role.labels.reads:
                        break
                    await asyncio.sleep(0.05)
                assert h.role.labels.reads and h.role.ctl.classes.node_labels["r02-n06"] == {"ib", "noflex"}
            await h.advance(90)
            h.ask(reduction_pct=8)
            await h.advance(120)
            caps = h.sim.caps.copy()
            if h.role.labels is not None:
                assert (caps[late] < 700).all()  # r02-n08 (flex3) is capped, until its scheduler says no
                slurm.scontrol("update", "NodeName=r02-n08", "AvailableFeatures=noflex", "ActiveFeatures=noflex")
                for _ in range(600):  # until the role has read the change (a read a second, wall time)
                    await h.advance(1)
                    if h.role.ctl.classes.node_labels["r02-n08"] == {"noflex"}:
                        break
                    await asyncio.sleep(0.05)
                await h.advance(2 * int(h.cfg.power.control_interval_s))  # the next plan, not some later one
                assert (h.sim.caps[late] == 700).all()
            await h.role.close()
            return caps
        protected = np.isin(np.array(plain.sim.node_names)[plain.sim.gpu_node], ["r01-n07", "r02-n06"])
        without = asyncio.run(scenario(plain))
        assert (without[protected] < 700).any()  # the plan takes them when nothing says no
        caps = asyncio.run(scenario(labelled))
        assert (caps[protected] == 700).all() and (caps[~protected] < 700).any()
        shown = fleetwatch("power", "status", "--data-dir", labelled.cfg.data_dir)
        assert shown.returncode == 0 and "node labels from slurm: 16 nodes" in shown.stdout, shown.stdout
    finally:
        slurm.close()


def test_power_status_says_when_the_labels_were_never_read():
    """sinfo missing from the start: every GPU is class 0, and the status line says why."""
    from pipeline.cli import _labels_line
    classes = FlexClasses(PowerConfig(classes=RULES, node_labels="slurm"))
    poller = LabelPoller(slurm_features(sinfo="/nonexistent/sinfo"), classes, 60.0)

    asyncio.run(poll_reads(poller))
    line = _labels_line(poller.status())
    assert line.startswith("; node labels from slurm not read yet (cannot run '/nonexistent/sinfo'")
    assert line.endswith("every GPU is class 0") and classes.of("r01-n02") == 0


def test_slurm_host_lists_and_squeue_lines_become_each_nodes_job():
    assert expand_hostlist("gpu-a[01-03,07],gpu-b1") == ["gpu-a01", "gpu-a02", "gpu-a03", "gpu-a07", "gpu-b1"]
    assert expand_hostlist("r[1-2]-n[08-10]") == ["r1-n08", "r1-n09", "r1-n10", "r2-n08", "r2-n09", "r2-n10"]
    assert expand_hostlist("") == [] and expand_hostlist("node") == ["node"]
    assert parse_squeue("41|r01-n[01-02]\n42|r02-n05\n\n") == {"r01-n01": "41", "r01-n02": "41", "r02-n05": "42"}


def test_a_node_jobs_share_is_the_job_holding_the_most_of_its_gpus():
    """select/cons_tres: jobs share a node. Not the last squeue prints (a large job would lose
    nodes and the firm capacity be overstated): the one asking for the most GPUs there (per node,
    per job spread over its nodes, per task), else the one on the most nodes, else the lowest id."""
    assert parse_squeue("1001|dgx[001-004]\n1002|dgx003\n")["dgx003"] == "1001"
    assert parse_squeue("7|a[1-2]|N/A|N/A|gres/gpu:1|8\n"        # 8 tasks of 1 GPU on 2 nodes: 4 a node
                        "8|a1|gres:gpu:3|N/A|N/A|1\n"
                        "9|a2|N/A|gres/gpu:a100=6|N/A|1\n"
                        "10|a3|N/A|N/A|N/A|1\n11|a3|(null)|N/A|N/A|1\n") == {"a1": "7", "a2": "9", "a3": "10"}
    assert [gpus_of_tres(t) for t in ("N/A", "gres:gpu:4", "gres/gpu:a100=2,gres:nic:1", "gres:gpu:a100",
                                      "gres:shard:8", "")] == [0, 4, 2, 1, 0, 0]


def test_running_jobs_are_read_from_squeue_and_the_poller_hands_them_over(tmp_path):
    ctl = Slurmctld({"gpu-a1": "", "gpu-a2": ""}, tmp_path / "slurm", slurmd_node="gpu-a1", gpus=4).start(timeout_s=60)
    try:
        source, seen = slurm_jobs(env=ctl.env, timeout_s=10), []
        assert asyncio.run(source.fetch()) == {}  # nothing runs

        def sbatch(*args: str) -> str:
            return subprocess.run([slurm_binary("sbatch"), "--parsable", "-w", "gpu-a1", "-o", "/dev/null",
                                   "--mem=100", *args, "--wrap", "sleep 300"], env=ctl.env, capture_output=True,
                                  text=True, check=True, cwd=tmp_path).stdout.strip()
        job = sbatch("--gres=gpu:3")
        deadline = time.monotonic() + 30
        while asyncio.run(source.fetch()) != {"gpu-a1": job}:  # the scheduler's next pass, ~2 s
            assert time.monotonic() < deadline, asyncio.run(source.fetch())
            time.sleep(0.2)
        poller = JobPoller(source, seen.append, 60.0)

        async def one_read() -> None:
            await poll_reads(poller)
            await poller.close()
        asyncio.run(one_read())
        assert seen == [{"gpu-a1": job}] and poller.status() == {"source": "slurm", "reads": 1, "failures": 0,
                                                                 "failing": None, "jobs": 1}
        # A second job shares the node (select/cons_tres: 1 GPU of 4, a CPU of 2); squeue prints it
        # after the first. The node stays the job's that holds most of it.
        small = sbatch("--gpus=1")

        def running() -> list[str]:
            return subprocess.run([slurm_binary("squeue"), "-h", "-t", "R", "-o", "%i"], env=ctl.env,
                                  capture_output=True, text=True, check=True).stdout.split()
        while sorted(running()) != sorted([job, small]):
            assert time.monotonic() < deadline + 30, running()
            time.sleep(0.2)
        assert asyncio.run(source.fetch()) == {"gpu-a1": job}
        subprocess.run([slurm_binary("scancel"), job, small], env=ctl.env, check=True)
    finally:
        ctl.close()


def test_squeue_missing_keeps_each_node_a_job_of_its_own_and_says_so_once(caplog):
    seen = []
    poller = JobPoller(slurm_jobs(squeue="/nonexistent/squeue"), seen.append, 0.0)

    async def reads(n: int) -> None:
        await poll_reads(poller, n)
        await poller.close()
    with caplog.at_level(logging.WARNING, logger="pipeline.power"):
        asyncio.run(reads(3))
    assert seen == [] and poller.failures >= 3
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "set power.squeue to its path" in warned[0], warned
    assert "until they are read each node counts as a job of its own" in warned[0]


def test_sinfo_and_squeue_get_none_of_the_daemon_s_secrets(tmp_path, monkeypatch):
    """Slurm's clients had run with the whole of the daemon's environment: its Kafka password and cloud
    credentials, read by whatever a site's `power.squeue` wraps. They get what remediation's commands get
    (remediate.command_env, where a site adds what its Slurm needs)."""
    from pipeline.power.node_labels import job_poller_for, poller_for
    monkeypatch.setenv("FLEETWATCH_KAFKA__SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "abc")
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/slurm.conf")
    client = tmp_path / "client"
    client.write_text(f"#!/bin/sh\nenv > {tmp_path}/env.$$\n")
    client.chmod(0o755)
    monkeypatch.setenv("SLURM_JWT", "a site's own token for Slurm")
    settings = PowerConfig(node_labels="slurm", jobs="slurm", sinfo=str(client), squeue=str(client))
    names = [*make_config().remediate.command_env, "SLURM_JWT"]  # (a site that gives Slurm its token)
    pollers = [poller_for(settings, FlexClasses(settings), names), job_poller_for(settings, lambda jobs: None, names)]

    async def reads() -> None:
        for poller in pollers:
            await poll_reads(poller)
            await poller.close()
    asyncio.run(reads())
    seen = [dict(line.split("=", 1) for line in f.read_text().splitlines() if "=" in line)
            for f in tmp_path.glob("env.*")]
    assert len(seen) == 2
    for env in seen:
        assert "FLEETWATCH_KAFKA__SASL_PASSWORD" not in env and "AWS_SECRET_ACCESS_KEY" not in env
        assert env["SLURM_CONF"] == "/etc/slurm/slurm.conf" and "PATH" in env and "SLURM_JWT" in env
