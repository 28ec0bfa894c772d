"""Power caps over the bus (power/actuator.py's BusActuator -> sources/power_caps.py): the
NVML agent, replaying the recorded H100, follows the power role's commands for its node,
applies them through NVML, reports each as a power_action row, restores a cap whose lease
ran out and every cap when it stops. The simulator follows them the same way."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest

from pipeline.bus import MemoryBus, Topic
from pipeline.bus.base import Message
from pipeline.detect.state import KeyIndex
from pipeline.model import POWER_ACTION, POWER_CAP
from pipeline.power.actuator import BusActuator
from pipeline.sources.nvml import NvmlAgent, NvmlSource
from pipeline.sources.nvml_replay import NvmlReplay
from pipeline.sources.nvml_power import CapResult
from pipeline.sources.power_caps import RETRY_S, CapHolder, SimulatedCaps, follow_caps
from pipeline.sources.simulate import FleetSimulator
from tests.conftest import H100, make_config


def caps(rows: list[tuple[str, str, float | None, float]]) -> pa.RecordBatch:
    """power_cap rows (node, uuid, cap W, lease s), sent now."""
    now = datetime.now(timezone.utc)
    return pa.RecordBatch.from_pylist([
        {"ts": now, "site": "site-a", "rack": "rack-0", "node": node, "gpu_uuid": uuid, "cap_w": cap,
         "request_id": "dr-1", "lease_s": lease} for node, uuid, cap, lease in rows], schema=POWER_CAP)


async def until(condition, task: asyncio.Task) -> None:
    while not condition():
        assert not task.done(), task.exception() if not task.cancelled() else "cancelled"
        await asyncio.sleep(0.01)


async def running_agent(replay: NvmlReplay, actions: list[dict]) -> tuple[MemoryBus, asyncio.Event, asyncio.Task]:
    """The agent of node-1 (rack-0) on `replay`, its GPUs open, following caps on an in-process
    bus; its power_action rows go to `actions`. Set the event to stop it, then await the task."""
    bus = MemoryBus()
    listener = bus.listen(Topic.POWER_CAPS, ["rack-0"])
    source = NvmlSource(NvmlAgent(make_config(agent={"interval_s": 0.05}).agent, "node-1"), replay, "h100", listener)

    async def emit(topic, batch):
        if topic == Topic.POWER_ACTIONS:
            assert batch.schema == POWER_ACTION
            actions.extend(batch.to_pylist())
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(emit, stop))
    await until(lambda: source.agent.opened.is_set(), task)
    return bus, stop, task


def test_the_agent_applies_its_nodes_caps_reports_them_and_restores_on_lease_and_stop():
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    uuid = [g.uuid for g in replay.gpus]
    actions: list[dict] = []

    async def main():
        bus, stop, task = await running_agent(replay, actions)
        await bus.publish(Message(Topic.POWER_CAPS, caps([
            ("node-1", uuid[3], 500.0, 3600), ("node-1", uuid[4], 100.0, 3600),  # 100 W: under its 200 W minimum
            ("node-2", "GPU-of-another-node", 450.0, 3600), ("node-1", "GPU-not-here", 450.0, 3600)])))
        await until(lambda: len(actions) >= 3, task)
        # A renewal of what GPU 3 holds changes nothing; GPU 5's short lease runs out.
        await bus.publish(Message(Topic.POWER_CAPS, caps([("node-1", uuid[3], 500.0, 3600),
                                                          ("node-1", uuid[5], 450.0, 0.2)])))
        await until(lambda: any(a["cause"] == "lease" for a in actions), task)
        assert replay.gpus[3].limit_mw == 500_000 and replay.gpus[5].limit_mw == 700_000
        stop.set()
        await task
    asyncio.run(main())

    got = [(a["gpu_uuid"], a["requested_w"], a["enforced_w"], a["status"], a["cause"]) for a in actions]
    assert got == [(uuid[3], 500.0, 500.0, "ok", "cap"), (uuid[4], 100.0, None, "out_of_range", "cap"),
                   ("GPU-not-here", 450.0, None, "error", "cap"),
                   (uuid[5], 450.0, 450.0, "ok", "cap"), (uuid[5], None, 700.0, "restored", "lease"),
                   (uuid[3], None, 700.0, "restored", "stop")]
    assert all(a["node"] == "node-1" and a["rack"] == "rack-0" and a["request_id"] == "dr-1" for a in actions[:2])
    assert "200" in actions[1]["detail"] and "700" in actions[1]["detail"]  # says the range it must be within
    assert [g.limit_mw for g in replay.gpus] == [700_000] * 8


def test_a_cap_set_again_after_a_gpu_reset_is_reported_as_an_action():
    """A reset puts the GPU's default limit back and the agent sets its cap again: that had been
    logged only, so power_actions (the archive's record of what was done to each GPU) showed
    the cap held throughout while the GPU had run uncapped between the reset and the next scrape."""
    replay = NvmlReplay(H100, gpus=4, latency=False, settle_s=0, enforce_lag_s=0)
    uuid = [g.uuid for g in replay.gpus]
    actions: list[dict] = []

    async def main():
        bus, stop, task = await running_agent(replay, actions)
        await bus.publish(Message(Topic.POWER_CAPS, caps([("node-1", uuid[2], 500.0, 3600)])))
        await until(lambda: len(actions) >= 1, task)
        replay.reset(2)
        await asyncio.wait_for(until(lambda: any(a["cause"] == "reset" for a in actions), task), 60)
        assert replay.gpus[2].limit_mw == 500_000
        stop.set()
        await task
    asyncio.run(main())
    got = [(a["gpu_uuid"], a["requested_w"], a["enforced_w"], a["status"], a["cause"], a["request_id"])
           for a in actions]
    assert got == [(uuid[2], 500.0, 500.0, "ok", "cap", "dr-1"), (uuid[2], 500.0, 500.0, "ok", "reset", "dr-1"),
                   (uuid[2], None, 700.0, "restored", "stop", "dr-1")]


def test_an_agent_that_starts_after_one_was_killed_holding_caps_restores_them_and_reports_it(tmp_path):
    """power_action rows with cause `start`: the caps a killed agent left, by its ledger."""
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    uuid = [g.uuid for g in replay.gpus]
    actions: list[dict] = []

    async def main():
        with replay.installed():  # the agent before, killed while it held GPU 2 at 450 W
            killed = NvmlAgent(make_config().agent, "node-1", tmp_path)
            killed.open()
            assert killed.power.apply(2, 450).status == "ok"
        bus = MemoryBus()
        source = NvmlSource(NvmlAgent(make_config(agent={"interval_s": 0.05}).agent, "node-1", tmp_path), replay,
                            "h100", bus.listen(Topic.POWER_CAPS, ["rack-0"]))

        async def emit(topic, batch):
            if topic == Topic.POWER_ACTIONS:
                actions.extend(batch.to_pylist())
        stop = asyncio.Event()
        task = asyncio.create_task(source.run(emit, stop))
        await until(lambda: actions, task)
        stop.set()
        await task
    asyncio.run(main())
    assert [(a["gpu_uuid"], a["requested_w"], a["enforced_w"], a["status"], a["cause"]) for a in actions] == [
        (uuid[2], None, 700.0, "restored", "start")]
    assert [g.limit_mw for g in replay.gpus] == [700_000] * 8


def test_an_agents_lease_runs_on_its_monotonic_clock_not_the_wall_clock(monkeypatch):
    """An NTP step of the wall clock neither cuts a lease (a step forward) nor stretches it
    (a step back): only the monotonic clock ends it. The power_action rows keep the wall time."""
    import pipeline.sources.nvml as nvml
    import pipeline.sources.power_caps as power_caps
    monkeypatch.setattr(power_caps, "POLL_S", 0.01)
    t0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
    wall, mono = [t0], [1000.0]
    monkeypatch.setattr(nvml, "_utc_now", lambda: wall[0])
    replay = NvmlReplay(H100, gpus=2, latency=False, settle_s=0)
    uuid = [g.uuid for g in replay.gpus]
    actions: list[dict] = []

    async def main():
        bus, stop, task, source, checks = polled_source(replay, mono, actions)
        await until(lambda: source.agent.opened.is_set(), task)
        await bus.publish(Message(Topic.POWER_CAPS, caps([("node-1", uuid[1], 500.0, 60.0)])))
        await until(lambda: len(actions) == 1, task)
        wall[0] = t0 + timedelta(hours=1)  # stepped forward: the lease is not over
        await checks(5)
        wall[0] = t0 - timedelta(hours=1)  # stepped back
        mono[0] += 59.0
        await checks(5)
        assert len(actions) == 1 and replay.gpus[1].limit_mw == 500_000
        mono[0] += 2.0  # 61 s since the row arrived: over, whatever the wall clock says
        await until(lambda: len(actions) == 2, task)
        stop.set()
        await task
    asyncio.run(main())
    assert [(a["gpu_uuid"], a["status"], a["cause"]) for a in actions] == [
        (uuid[1], "ok", "cap"), (uuid[1], "restored", "lease")]
    assert [a["ts"] for a in actions] == [t0, t0 - timedelta(hours=1)]  # stamped with the wall clock
    assert replay.gpus[1].limit_mw == 700_000


def test_the_power_roles_rows_carry_changes_and_renew_every_held_cap_each_third_of_the_lease():
    sim = FleetSimulator(make_config(fleet={"racks": 1, "nodes_per_rack": 2}).fleet)

    class Gpus:  # the controller's GpuTable, as far as the actuator reads it
        uuids = list(sim.gpu_uuids)
        racks = [sim.rack_names[r] for r in sim.gpu_rack]
        nodes = [sim.node_names[n] for n in sim.gpu_node]
        ids = KeyIndex()
    Gpus.ids.slots(pa.array(Gpus.uuids))
    t0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
    act = BusActuator("site-a", lease_s=60.0)
    act.apply({Gpus.uuids[0]: 500.0, Gpus.uuids[1]: 450.0})

    def sent(at_s: float) -> list[tuple[str, float | None]]:
        batch = act.rows(t0 + timedelta(seconds=at_s), Gpus, "dr-1")
        return [] if batch is None else list(zip(batch.column("gpu_uuid").to_pylist(),
                                                 batch.column("cap_w").to_pylist()))
    assert sent(0) == [(Gpus.uuids[0], 500.0), (Gpus.uuids[1], 450.0)]
    assert sent(5) == []                                  # nothing changed, not yet a third of the lease
    act.apply({Gpus.uuids[1]: None})
    assert sent(10) == [(Gpus.uuids[1], None)]            # the restore goes at once
    assert sent(21) == [(Gpus.uuids[0], 500.0)]           # the held cap again: its lease renewed
    assert sent(30) == []


def following(applier, clock, actions: list[dict]) -> tuple[MemoryBus, asyncio.Event, asyncio.Task]:
    """follow_caps on a bus of its own (in a running loop): the bus to send caps on, its stop, its task."""
    bus = MemoryBus()
    sub = bus.listen(Topic.POWER_CAPS, [])

    async def emit(topic, batch):
        actions.extend(batch.to_pylist())
    stop = asyncio.Event()
    return bus, stop, asyncio.create_task(follow_caps(sub, applier, emit, stop, clock, CapHolder()))


@pytest.mark.parametrize("lease_s", [3600.0, 0.0])
def test_the_simulator_follows_caps_on_its_own_clock(lease_s):
    """Its lease is judged on simulated time: a cap whose lease ended in the simulator's past goes."""
    sim = FleetSimulator(make_config(fleet={"racks": 1, "nodes_per_rack": 2}).fleet)
    applier = SimulatedCaps(sim)
    actions: list[dict] = []

    async def main():
        bus, stop, task = following(applier, lambda: sim.now + timedelta(seconds=1), actions)
        batch = caps([(sim.node_names[0], sim.gpu_uuids[0], 450.0, lease_s)])
        batch = batch.set_column(0, "ts", pa.array([sim.now] * 1, POWER_CAP.field("ts").type))
        await bus.publish(Message(Topic.POWER_CAPS, batch))
        await until(lambda: len(actions) >= (2 if lease_s == 0 else 1), task)
        stop.set()
        await task
    asyncio.run(main())
    assert [(a["status"], a["cause"]) for a in actions] == (
        [("ok", "cap"), ("restored", "lease")] if lease_s == 0 else [("ok", "cap"), ("restored", "stop")])
    assert sim.caps[0] == sim.cfg.power_limit_w


class RefusesOnce:
    """A source's GPUs whose first restore fails (another tool holds the limit a while)."""
    site = "site-a"

    def __init__(self) -> None:
        self.refused = False
        self.limits: dict[str, float | None] = {}

    def mine(self, caps):
        return np.ones(caps.num_rows, bool)

    async def apply(self, uuids, cap_w):
        out = []
        for u, w in zip(uuids, cap_w):
            if w is None and not self.refused:
                self.refused = True
                out.append(CapResult(0, u, None, 500.0, "error", "another limit wins"))
                continue
            self.limits[u] = w
            out.append(CapResult(0, u, w, w or 700.0, "restored" if w is None else "ok", ""))
        return out

    def where(self, uuid):
        return "rack-0", "node-1"


def test_a_restore_that_failed_is_tried_again_until_it_holds():
    applier, actions = RefusesOnce(), []
    now = [datetime(2026, 12, 1, tzinfo=timezone.utc)]

    async def main():
        bus, stop, task = following(applier, lambda: now[0], actions)
        await bus.publish(Message(Topic.POWER_CAPS, caps([("node-1", "GPU-a", 500.0, 3600)])))
        await until(lambda: len(actions) == 1, task)
        await bus.publish(Message(Topic.POWER_CAPS, caps([("node-1", "GPU-a", None, 3600)])))
        await until(lambda: len(actions) == 2, task)
        now[0] += timedelta(seconds=RETRY_S + 1)  # the role sends nothing more for it
        await until(lambda: len(actions) == 3, task)
        stop.set()
        await task
    asyncio.run(main())
    assert [(a["status"], a["cause"]) for a in actions] == [("ok", "cap"), ("error", "cap"), ("restored", "lease")]
    assert applier.limits == {"GPU-a": None}


def test_caps_are_followed_again_after_the_bus_failed(monkeypatch):
    """A listener that fails (Kafka away when the agent starts) is tried again, backing off;
    the source's own loop never stops for it."""
    import pipeline.sources.power_caps as power_caps
    monkeypatch.setattr(power_caps, "FOLLOW_RETRY_MAX_S", 0.05)
    sim = FleetSimulator(make_config(fleet={"racks": 1, "nodes_per_rack": 2}).fleet)
    applier, actions, ran = SimulatedCaps(sim), [], []

    async def main():
        bus = MemoryBus()
        listener = bus.listen(Topic.POWER_CAPS, [])
        calls = [0]

        class Flaky:  # the first read fails, as a consumer that cannot reach its brokers
            async def get_batch(self, **kw):
                calls[0] += 1
                if calls[0] == 1:
                    raise ConnectionError("brokers unreachable")
                return await listener.get_batch(**kw)

        async def emit(topic, batch):
            actions.extend(batch.to_pylist())

        async def source(source_stop):
            while not source_stop.is_set():
                ran.append(1)
                await asyncio.sleep(0.01)
        stop = asyncio.Event()
        task = asyncio.create_task(power_caps.alongside(
            source, lambda stop: follow_caps(Flaky(), applier, emit, stop, lambda: sim.now), stop))
        await until(lambda: calls[0] >= 2, task)
        await bus.publish(Message(Topic.POWER_CAPS, caps([(sim.node_names[0], sim.gpu_uuids[0], 450.0, 3600)])))
        await until(lambda: len(actions) >= 1, task)
        stop.set()
        await task
    asyncio.run(main())
    assert [(a["status"], a["cause"]) for a in actions] == [("ok", "cap"), ("restored", "stop")]
    assert ran


def polled_source(replay: NvmlReplay, mono: list[float], actions: list[dict]):
    """An agent replaying `replay`, its leases on `mono`, on a bus of its own (in a running loop):
    the bus, its stop, its task, and `checks(n)`: wait until the follower has read the bus and
    looked at its leases n more times (after a publish: the rows were acted on)."""
    bus = MemoryBus()
    listener = bus.listen(Topic.POWER_CAPS, ["rack-0"])
    polls = [0]

    class Polled:
        async def get_batch(self, **kw):
            polls[0] += 1
            return await listener.get_batch(**kw)
    source = NvmlSource(NvmlAgent(make_config(agent={"interval_s": 0.05}).agent, "node-1"), replay, "h100",
                        Polled(), lease_clock=lambda: mono[0])

    async def emit(topic, batch):
        if topic == Topic.POWER_ACTIONS:
            actions.extend(batch.to_pylist())
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(emit, stop))

    async def checks(n: int = 2) -> None:
        seen = polls[0]
        await until(lambda: polls[0] >= seen + n + 1, task)
    return bus, stop, task, source, checks


def test_a_cap_another_limit_overrides_is_still_held_so_the_roles_restore_and_the_lease_reach_it(monkeypatch):
    """A BMC (Redfish) limit of 400 W wins over the 500 W asked: the row says `error`, with the
    400 W enforced and why, but the agent set 500 W, so it holds it: the role's restore (a null
    cap) and the end of its lease put the GPU back to its own limit."""
    import pipeline.sources.power_caps as power_caps
    monkeypatch.setattr(power_caps, "POLL_S", 0.01)
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    uuid = [g.uuid for g in replay.gpus]
    read = replay.nvmlDeviceGetEnforcedPowerLimit

    def bmc(handle):  # the out-of-band 400 W limit on GPUs 3 and 4, throughout
        return min(read(handle), 400_000) if replay._gpu(handle) in replay.gpus[3:5] else read(handle)
    replay.nvmlDeviceGetEnforcedPowerLimit = bmc
    mono, actions, limits = [1000.0], [], []

    async def main():
        bus, stop, task, source, checks = polled_source(replay, mono, actions)
        await until(lambda: source.agent.opened.is_set(), task)
        await bus.publish(Message(Topic.POWER_CAPS, caps([("node-1", uuid[3], 500.0, 60.0),
                                                          ("node-1", uuid[4], 500.0, 60.0)])))
        await checks()
        limits.append([g.limit_mw for g in replay.gpus])
        await bus.publish(Message(Topic.POWER_CAPS, caps([("node-1", uuid[3], None, 60.0)])))  # the request ended
        await checks()
        mono[0] += 61.0  # GPU 4's lease ran out
        await checks(5)
        limits.append([g.limit_mw for g in replay.gpus])
        stop.set()
        await task
    asyncio.run(main())
    assert [(a["gpu_uuid"], a["requested_w"], a["enforced_w"], a["status"], a["cause"]) for a in actions] == [
        (uuid[3], 500.0, 400.0, "error", "cap"), (uuid[4], 500.0, 400.0, "error", "cap"),
        (uuid[3], None, 400.0, "error", "cap"), (uuid[4], None, 400.0, "error", "lease")]  # no `stop`: none held
    assert all("enforces 400 W" in a["detail"] and "another limit wins" in a["detail"] for a in actions)
    assert limits[0][3:5] == [500_000, 500_000]
    assert limits[1] == [700_000] * 8  # back to their own limits (the BMC's is not the agent's to lift)


def test_the_longest_lease_an_agent_keeps_is_the_longest_the_role_may_send():
    import dataclasses
    from pipeline.config import PowerConfig
    from pipeline.sources.power_caps import MAX_LEASE_S
    spec = next(f for f in dataclasses.fields(PowerConfig) if f.name == "lease_s").metadata
    assert MAX_LEASE_S == spec["max"]  # a valid role's lease is never cut


@pytest.mark.parametrize("lease_s", [float("inf"), 1e12, float("nan"), None])
def test_a_lease_that_is_not_seconds_within_bounds_never_holds_a_cap_for_ever(monkeypatch, caplog, lease_s):
    """From the wire: a lease past MAX_LEASE_S is cut to it; one that is no number (NaN, null)
    makes its row a restore. Said once, counted; the follower goes on."""
    import pipeline.sources.power_caps as power_caps
    monkeypatch.setattr(power_caps, "POLL_S", 0.01)
    replay = NvmlReplay(H100, gpus=4, latency=False, settle_s=0)
    uuid = [g.uuid for g in replay.gpus]
    mono, actions, limits = [1000.0], [], []

    async def main():
        bus, stop, task, source, checks = polled_source(replay, mono, actions)
        await until(lambda: source.agent.opened.is_set(), task)
        await bus.publish(Message(Topic.POWER_CAPS, caps([("node-1", uuid[1], 500.0, 60.0),
                                                          ("node-1", uuid[2], 450.0, lease_s)])))  # a new cap
        await checks()
        await bus.publish(Message(Topic.POWER_CAPS, caps([("node-1", uuid[1], 500.0, lease_s)])))  # a renewal
        await checks()
        mono[0] += 3601.0  # past MAX_LEASE_S (power.lease_s's maximum, 3600 s)
        await checks(5)
        limits.extend(g.limit_mw for g in replay.gpus)
        stop.set()
        await task
    with caplog.at_level("WARNING", logger="fleetwatch"):
        asyncio.run(main())
    got = [(a["gpu_uuid"], a["requested_w"], a["status"], a["cause"]) for a in actions]
    if lease_s is None or lease_s != lease_s:  # no number: a restore
        assert got == [(uuid[1], 500.0, "ok", "cap"), (uuid[1], None, "restored", "cap")]
    else:  # held for MAX_LEASE_S at most
        assert got == [(uuid[1], 500.0, "ok", "cap"), (uuid[2], 450.0, "ok", "cap"),
                       (uuid[1], None, "restored", "lease"), (uuid[2], None, "restored", "lease")]
    assert limits == [700_000] * 4
    assert len([r for r in caplog.records if "lease_s" in r.getMessage()]) == 1


def test_a_restore_a_lost_gpu_refuses_is_tried_every_retry_and_said_once(caplog):
    """A capped GPU falls off the bus and stays lost (an RMA); its request ends. Its restore is tried again
    every RETRY_S, as before; it had been warned as 'not renewed within their lease' at each try."""
    replay = NvmlReplay(H100, gpus=2, latency=False, settle_s=0)
    uuid = [g.uuid for g in replay.gpus]
    actions: list[dict] = []

    async def main():
        bus, stop, task = await running_agent(replay, actions)
        await bus.publish(Message(Topic.POWER_CAPS, caps([("node-1", uuid[0], 500.0, 0.3)])))
        await until(lambda: len(actions) >= 1, task)
        replay.lose(0)
        await until(lambda: sum(a["cause"] == "lease" for a in actions) >= 3, task)  # its lease, two retries
        stop.set()
        await task
    with replay.installed(), caplog.at_level("WARNING"), \
            pytest.MonkeyPatch.context() as patch:
        patch.setattr("pipeline.sources.power_caps.RETRY_S", 0.3)
        asyncio.run(main())
    said = [r.getMessage() for r in caplog.records]
    assert sum("not renewed within their lease" in m for m in said) == 1
    assert sum("power limit: gpu_lost" in m for m in said) == 1
