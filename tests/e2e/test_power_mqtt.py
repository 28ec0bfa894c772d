"""Power requests over MQTT under the BMS tree (power/mqtt_intake.py) against a real Mosquitto:
a BMS gateway publishes requests on <root>/<site>/power/requests and reads the verdicts on
.../<id>/status and .../rejected; a repeat is taken once; the broker going away and coming back,
and the role as the daemon builds it with mqtt.broker set. No wall-clock assertions: each test
waits for its conditions with a generous deadline."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from pathlib import Path

import aiomqtt
import pytest

from pipeline.bus import Message, Topic
from pipeline.power.mqtt_intake import MqttIntake
from pipeline.power.store import RETENTION_S, request_store
from pipeline.sources.mqtt import Backoff
from pipeline.sources.simulate import FleetSimulator
from tests.services import Mosquitto
from tests.test_power_role import Harness

pytestmark = pytest.mark.mqtt

DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def broker():
    b = Mosquitto().start()
    yield b
    b.close()


def fast_backoff() -> Backoff:
    return Backoff(initial_s=0.05, max_s=0.5)


async def until(condition, what: str, timeout_s: float = DEADLINE_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"not within {timeout_s:g} s: {what}"
        await asyncio.sleep(0.05)


class Gateway:
    """A BMS gateway: publishes requests, keeps every answer it reads (retained ones too)."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self.broker, self.topic = broker, topic
        self.got: list[tuple[str, dict | None, bool]] = []  # (topic, doc, retained); None: an empty message
        self.ready = asyncio.Event()
        self.task = asyncio.create_task(self._run())
        self._client: aiomqtt.Client | None = None

    async def _run(self) -> None:
        async with aiomqtt.Client(self.broker.host, self.broker.port,
                                  identifier=f"gateway-{uuid.uuid4().hex[:6]}") as client:
            self._client = client
            await client.subscribe(f"{self.topic}/#", qos=1)
            self.ready.set()
            async for m in client.messages:
                if m.topic.value == self.topic:  # `<topic>/#` matches the requests themselves too
                    continue
                self.got.append((m.topic.value, json.loads(m.payload) if m.payload else None, m.retain))

    async def send(self, payload: bytes | dict) -> None:
        await asyncio.wait_for(self.ready.wait(), DEADLINE_S)
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self._client.publish(self.topic, body, qos=1)

    def states(self, rid: str) -> list[str]:
        return [d["state"] for t, d, _ in self.got if t == f"{self.topic}/{rid}/status" and d is not None]

    def rejected(self) -> list[dict]:
        return [d for t, d, _ in self.got if t == f"{self.topic}/rejected"]

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def request(**kw) -> dict:
    return {"site": "site-a", "duration_s": 600, "ramp_s": 30, "start": "now", "reduction_pct": 5, **kw}



def role_and_intakes(broker, tmp_path):
    """A dry-run role on the simulated fleet, and a maker of its MQTT intakes under a topic root of
    the test's own, all with one client id (one persistent session at the broker, as a restart has)."""
    root = f"t{uuid.uuid4().hex[:8]}/bms"
    h = Harness(tmp_path, dry_run=True)
    client_id = f"power-{uuid.uuid4().hex[:6]}"

    def intake() -> MqttIntake:
        return MqttIntake(h.role, broker.host, broker.port, "site-a", topic_root=root, backoff=fast_backoff(),
                          client_id=client_id)
    return h, intake

def test_requests_over_mqtt_are_judged_answered_and_taken_once(broker, tmp_path, caplog):
    root = f"t{uuid.uuid4().hex[:8]}/bms"
    h = Harness(tmp_path, dry_run=True)

    async def go():
        intake = MqttIntake(h.role, broker.host, broker.port, "site-a", topic_root=root, backoff=fast_backoff(),
                            client_id=f"power-{uuid.uuid4().hex[:6]}")
        stop = asyncio.Event()
        task = asyncio.create_task(intake.run(stop))
        await asyncio.wait_for(intake.subscribed.wait(), DEADLINE_S)
        gw = Gateway(broker, intake.topic)
        # Before the fleet is known: stored, pending; judged (accepted) once the data comes.
        good = request(id="gw-1")
        await gw.send(good)
        await until(lambda: gw.states("gw-1") == ["pending"], "gw-1 answered pending")
        await h.advance(90)
        await until(lambda: gw.states("gw-1")[-1] == h.role.tracked["gw-1"].state, "gw-1 answered its state")
        before = len(gw.states("gw-1"))
        # A repeat (a QoS 1 redelivery), bad JSON, a request in the past, one over what the site can shed.
        await gw.send(good)
        await gw.send(b"{not json")
        late = request(id="gw-2", start="2025-06-01T00:00:00Z")
        await gw.send(late)
        await gw.send(late)  # refused once: the same message again is answered, not counted again
        await gw.send(request(id="gw-3", reduction_pct=95, start="2026-01-01T06:00:00Z"))
        await until(lambda: len(gw.rejected()) >= 2 and gw.states("gw-3") and len(gw.states("gw-2")) >= 2
                    and len(gw.states("gw-1")) > before, "every message answered")
        # A gateway that subscribes later reads each request's latest state (retained).
        late_gw = Gateway(broker, intake.topic)
        await until(lambda: len({t for t, _, retained in late_gw.got if retained}) >= 3, "the retained states")
        stop.set()
        await asyncio.wait_for(task, DEADLINE_S)
        await gw.close()
        await late_gw.close()
        return intake, gw, late_gw, before

    intake, gw, late_gw, before = asyncio.run(go())
    entries = {e.id: e for e in request_store(h.cfg.data_dir).entries()}
    assert set(entries) == {"gw-1", "gw-3"}  # taken once; gw-2 refused before it was stored
    assert entries["gw-1"].state in ("accepted", "active") and entries["gw-1"].request["source"] == "mqtt"
    assert entries["gw-3"].state == "rejected" and "can shed at most" in entries["gw-3"].reason
    # gw-1: pending, accepted (then active: it starts now), and the repeat answered with its state as it
    # was ("already have it"): never a rejection
    states = gw.states("gw-1")
    assert states[:2] == ["pending", "accepted"] and "rejected" not in states, states
    assert len(states) == before + 1 and states[-1] == states[-2] == entries["gw-1"].state, states
    assert gw.states("gw-3") == ["rejected"]
    (g3,) = [d for t, d, _ in gw.got if t.endswith("/gw-3/status")]
    assert "can shed at most" in g3["reason"]
    assert gw.states("gw-2") == ["rejected", "rejected"]
    bad_json, in_past = gw.rejected()
    assert bad_json["id"] is None and "not JSON" in bad_json["reason"]
    assert in_past["id"] == "gw-2" and "in the past" in in_past["reason"]
    assert intake.stats.messages == 6 and intake.stats.taken == 2
    assert intake.stats.duplicates == 2 and intake.stats.rejected == 2
    assert h.role.status()["grid_signal_rejected"] == 2
    refused = [r for r in caplog.records if "MQTT request" in r.getMessage() and "refused" in r.getMessage()]
    assert len(refused) == 1  # logged once
    retained = {t.rsplit("/", 2)[1]: d["state"] for t, d, r in late_gw.got if r and t.endswith("/status")}
    assert retained == {"gw-1": entries["gw-1"].state, "gw-2": "rejected", "gw-3": "rejected"}
    assert not [t for t, _, r in late_gw.got if r and t.endswith("/rejected")]  # refusals are not retained


def test_a_request_sent_while_the_role_is_away_or_the_broker_restarts_is_taken(broker, tmp_path):
    h, intake = role_and_intakes(broker, tmp_path)

    async def go():
        await h.advance(90)
        first, stop = intake(), asyncio.Event()
        task = asyncio.create_task(first.run(stop))
        await asyncio.wait_for(first.subscribed.wait(), DEADLINE_S)
        # The broker goes away and comes back: the intake reconnects with backoff.
        await asyncio.to_thread(broker.stop)
        await until(lambda: not first.subscribed.is_set(), "the intake saw the broker go")
        await asyncio.to_thread(broker.start)
        await until(lambda: first.stats.reconnects >= 1 and first.subscribed.is_set(), "the intake reconnected")
        stop.set()
        await asyncio.wait_for(task, DEADLINE_S)
        # The role is away: the broker keeps the request for its session.
        gw = Gateway(broker, first.topic)
        await gw.send(request(id="gw-away", duration_s=120))
        second, stop = intake(), asyncio.Event()
        task = asyncio.create_task(second.run(stop))
        await until(lambda: "accepted" in gw.states("gw-away"), "the request queued while away answered")
        stop.set()
        await asyncio.wait_for(task, DEADLINE_S)
        await gw.close()
        return first, second

    first, second = asyncio.run(go())
    assert first.stats.reconnects >= 1
    (entry,) = request_store(h.cfg.data_dir).entries()
    assert entry.id == "gw-away" and entry.state == "accepted" and second.stats.taken == 1


def test_the_built_power_role_takes_mqtt_requests_when_mqtt_broker_is_set(broker, tmp_path):
    """roles/power.py build over the in-process bus, with mqtt.broker set: the intake runs for the
    length of the role, and a request from MQTT is accepted with source mqtt."""
    from pipeline.bus import MemoryBus
    from pipeline.daemon import build_roles
    from pipeline.roles.context import Context
    from pipeline.sinks.console import Console
    from tests.conftest import make_config
    root = f"t{uuid.uuid4().hex[:8]}/bms"
    cfg = make_config(data_dir=str(tmp_path / "data"),
                      fleet={"racks": 2, "seed": 4, "fault_interval_s": 0, "gpu_reset_interval_s": 0},
                      power={"default_class": 3, "baseline_s": 60, "dry_run": True},
                      mqtt={"broker": f"{broker.host}:{broker.port}", "topic_root": root})
    sim = FleetSimulator(cfg.fleet)  # on the wall clock: the intake gate judges readings against it
    topic = f"{root}/site-a/power/requests"

    async def go():
        bus = MemoryBus()
        ctx = Context(cfg, frozenset({"power"}), bus, asyncio.Event(), Console())
        (running,) = build_roles(ctx)
        task = asyncio.create_task(running.work())
        gw = Gateway(broker, topic)
        for _ in range(90):
            tick = sim.step()
            await bus.publish(Message(Topic.GPU, tick.gpu))
            await bus.publish(Message(Topic.FACILITY, tick.facility))
            await asyncio.sleep(0)
        await gw.send(request(id="gw-built"))
        for _ in range(2000):  # the data goes on while the request is answered
            if "accepted" in gw.states("gw-built"):
                break
            tick = sim.step()
            await bus.publish(Message(Topic.GPU, tick.gpu))
            await bus.publish(Message(Topic.FACILITY, tick.facility))
            await asyncio.sleep(0.02)
        await bus.end([Topic.GPU, Topic.FACILITY, Topic.POWER_REQUESTS, Topic.POWER_ACTIONS])
        await asyncio.wait_for(task, DEADLINE_S)  # the role ends with its inputs, its intake with it
        await gw.close()
        return gw

    gw = asyncio.run(go())
    assert "accepted" in gw.states("gw-built"), gw.got
    (entry,) = request_store(Path(cfg.data_dir)).entries()
    assert entry.id == "gw-built" and entry.request["source"] == "mqtt"


async def until_advancing(h: Harness, condition, what: str, at_most_s: int = 2000) -> None:
    """Drive the fleet a simulated second at a time (the intake publishes between) until `condition`."""
    for _ in range(at_most_s):
        if condition():
            return
        await h.advance(1)
        await asyncio.sleep(0.01)
    assert condition(), f"not within {at_most_s} simulated s: {what}"


def test_a_retained_request_is_never_taken_and_the_gateway_is_told_to_publish_it_unretained(broker, tmp_path,
                                                                                            caplog):
    """A request published retained comes again at every SUBSCRIBE (each reconnect, each restart):
    without an id it would be a new request each time. It is refused on `rejected` saying what to do,
    never on its status topic; the empty retained message that clears it is no request."""
    h, intake = role_and_intakes(broker, tmp_path)
    topic = intake().topic

    async def go():
        await h.advance(90)
        async with aiomqtt.Client(broker.host, broker.port, identifier=f"bms-{uuid.uuid4().hex[:6]}") as bms:
            await bms.publish(topic, json.dumps(request(id="gw-kept", duration_s=60)).encode(), qos=1, retain=True)
        first, stop = intake(), asyncio.Event()
        task = asyncio.create_task(first.run(stop))
        await until(lambda: first.stats.messages == 1, "the retained request came")
        await asyncio.to_thread(broker.stop)  # a reconnect: the broker sends it again
        await until(lambda: not first.subscribed.is_set(), "the intake saw the broker go")
        await asyncio.to_thread(broker.start)
        await until(lambda: first.stats.messages == 2, "it came again after the reconnect")
        await h.advance(5)
        stop.set()
        await asyncio.wait_for(task, DEADLINE_S)
        gw = Gateway(broker, topic)
        await asyncio.wait_for(gw.ready.wait(), DEADLINE_S)
        second, stop = intake(), asyncio.Event()  # a restart: again
        task = asyncio.create_task(second.run(stop))
        await until(lambda: second.stats.messages == 1 and gw.got, "it came again at the restart, answered")
        await gw._client.publish(topic, b"", qos=1, retain=True)  # the gateway clears it, as told
        await until(lambda: second.stats.messages == 2, "the clearing message came")
        await h.advance(5)
        stop.set()
        await asyncio.wait_for(task, DEADLINE_S)
        await gw.close()
        return first, second, gw

    first, second, gw = asyncio.run(go())
    assert request_store(h.cfg.data_dir).entries() == []  # never taken
    assert first.stats.taken == 0 and first.stats.retained == 2
    assert second.stats.rejected == 0 and second.stats.taken == 0 and second.stats.retained == 1
    (answer,) = gw.rejected()
    assert answer["id"] == "gw-kept"
    assert "retain false" in answer["reason"] and "empty retained message" in answer["reason"]
    assert not [t for t, _, _ in gw.got if t.endswith("/status")]  # its status topic is not the refusal's
    assert h.role.status()["grid_signal_rejected"] == 3
    logged = [r for r in caplog.records if "retain false" in r.getMessage()]
    assert len(logged) == 2  # once per intake, not at each reconnect


def test_after_a_restart_the_states_of_the_requests_taken_before_are_published(broker, tmp_path):
    """A new process knows nothing of what the old one answered: the MQTT requests in the store are
    followed again, so a request accepted before the restart is not left `active` on its status
    topic for good, and its resumption is no step back to `accepted`."""
    h, intake = role_and_intakes(broker, tmp_path)

    async def go():
        await h.advance(90)
        first, stop = intake(), asyncio.Event()
        task = asyncio.create_task(first.run(stop))
        await asyncio.wait_for(first.subscribed.wait(), DEADLINE_S)
        gw = Gateway(broker, first.topic)
        await gw.send(request(id="gw-r", duration_s=60))
        await until_advancing(h, lambda: "active" in gw.states("gw-r"), "gw-r answered active")
        stop.set()  # the process stops (its role is not closed: a crash)
        await asyncio.wait_for(task, DEADLINE_S)

        async def publish(topic, batch):
            h.published.append((topic, batch))
        h.role = PowerRole(h.cfg, request_store(h.cfg.data_dir), h.actuator, publish, dry_run=True,
                           wall=lambda: h.wall, utc_now=lambda: h.sim.now)
        second, stop = intake(), asyncio.Event()
        task = asyncio.create_task(second.run(stop))
        await asyncio.wait_for(second.subscribed.wait(), DEADLINE_S)
        await until_advancing(h, lambda: gw.states("gw-r")[-1:] == ["done"], "gw-r answered done after the restart")
        late = Gateway(broker, first.topic)  # subscribes now: reads the retained state
        await until(lambda: any(r for _, _, r in late.got), "the retained state")
        stop.set()
        await asyncio.wait_for(task, DEADLINE_S)
        await gw.close()
        await late.close()
        return gw, late

    from pipeline.roles.power import PowerRole
    gw, late = asyncio.run(go())
    (entry,) = request_store(h.cfg.data_dir).entries()
    assert entry.state == "done"
    states = gw.states("gw-r")
    assert states[-1] == "done" and "accepted" not in states[states.index("active"):], states
    assert late.states("gw-r") == ["done"]


def test_a_request_pruned_from_the_store_has_its_retained_status_cleared(broker, tmp_path):
    """A week after a request is over the role prunes it: the broker forgets its status too (an
    empty retained message), or it would keep one per request ever made."""
    h, make_intake = role_and_intakes(broker, tmp_path)

    async def go():
        await h.advance(90)
        intake = make_intake()
        stop = asyncio.Event()
        task = asyncio.create_task(intake.run(stop))
        await asyncio.wait_for(intake.subscribed.wait(), DEADLINE_S)
        gw = Gateway(broker, intake.topic)
        await gw.send(request(id="gw-p", duration_s=30))
        await until_advancing(h, lambda: gw.states("gw-p")[-1:] == ["done"] and request_store(
            h.cfg.data_dir).entries()[0].reported, "gw-p done and reported")
        await h.role.flush(h.sim.now + timedelta(seconds=RETENTION_S + 3600))  # the role's pruning, a week on
        assert not h.role.store.known("gw-p")
        status = f"{intake.topic}/gw-p/status"
        await until(lambda: (status, None, False) in gw.got, "the status cleared")
        late = Gateway(broker, intake.topic)  # subscribes now: no retained status left
        await asyncio.wait_for(late.ready.wait(), DEADLINE_S)
        await late._client.publish(f"{intake.topic}/marker", b"{}", qos=1)  # after the retained ones
        await until(lambda: any(t.endswith("/marker") for t, _, _ in late.got), "the marker")
        stop.set()
        await asyncio.wait_for(task, DEADLINE_S)
        await gw.close()
        await late.close()
        return intake, late

    intake, late = asyncio.run(go())
    assert not [t for t, _, _ in late.got if t.endswith("/status")], late.got
    assert "gw-p" not in intake.answered
