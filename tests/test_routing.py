"""Alert routing (grouping, timers, inhibition), silences and the router's saved state.

The end-to-end tests (processes, brokers, tmpfs) are in tests/e2e/test_routing.py."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError
from pipeline.model import fingerprint
from pipeline.sinks.routing import Router
from pipeline.sinks.silences import Matcher, Silence, SilenceStore, parse_duration, silence_store
from tests.conftest import make_config

T0 = 1_800_000_000.0
WAIT, INTERVAL, REPEAT = 5.0, 60.0, 3600.0


def alert(name: str, rack: str = "r01", node: str | None = None, status: str = "firing", **labels: str) -> dict:
    """An Alertmanager alert object as the daemon hands it over."""
    lb = {"alertname": name, "site": "site-a", "rack": rack, "severity": "critical", **labels}
    if node:
        lb["node"] = node
    return {"status": status, "labels": lb, "annotations": {"summary": f"{name} in {rack}"},
            "startsAt": "2027-01-15T08:00:00.000Z",
            "endsAt": "2027-01-15T08:05:00.000Z" if status == "resolved" else "0001-01-01T00:00:00Z",
            "generatorURL": "", "fingerprint": fingerprint(lb), "detector": "test", "score": 1.0, "evidence": {}}


def resolved(a: dict) -> dict:
    return {**a, "status": "resolved", "endsAt": "2027-01-15T08:05:00.000Z"}


def router(silences: SilenceStore | None = None, **alerts_cfg) -> Router:
    cfg = make_config(alerts={"group_wait_s": WAIT, "group_interval_s": INTERVAL, "repeat_interval_s": REPEAT,
                              **alerts_cfg})
    return Router(cfg.alerts, silences)


def sent(notifications) -> list[tuple[str, str]]:
    """(status, node-or-alertname) of every alert in the notifications, in order."""
    return [(a["status"], a["labels"].get("node", a["labels"]["alertname"])) for n in notifications for a in n.alerts]


# ---- grouping and timers ---------------------------------------------------------------

def test_group_waits_then_notifies_all_its_alerts_once():
    r = router()
    r.add([alert("GpuXid", node="n2")], T0)
    r.add([alert("GpuXid", node="n1")], T0 + 2)
    assert r.next_wakeup() == T0 + WAIT
    assert r.due(T0 + WAIT - 0.1) == []
    [n] = r.due(T0 + WAIT)
    assert n.group_key == '{}:{alertname="GpuXid",rack="r01",site="site-a"}'
    assert n.group_labels == {"alertname": "GpuXid", "rack": "r01", "site": "site-a"}
    assert n.status == "firing"
    assert sent([n]) == [("firing", "n1"), ("firing", "n2")]  # same startsAt: by fingerprint
    assert [a["fingerprint"] for a in n.alerts] == sorted(a["fingerprint"] for a in n.alerts)
    assert r.due(T0 + WAIT + 1) == []
    assert r.next_wakeup() == T0 + WAIT + REPEAT
    assert r.stats.notifications == 1


def test_other_racks_and_alertnames_are_other_groups():
    r = router()
    r.add([alert("GpuXid", "r01", "n1"), alert("GpuXid", "r02", "n1"), alert("GpuFellOffBus", "r01", "n1")], T0)
    keys = sorted(n.group_key for n in r.due(T0 + WAIT))
    assert keys == ['{}:{alertname="GpuFellOffBus",rack="r01",site="site-a"}',
                    '{}:{alertname="GpuXid",rack="r01",site="site-a"}',
                    '{}:{alertname="GpuXid",rack="r02",site="site-a"}']


def test_changed_group_waits_group_interval_then_repeats_unchanged():
    r = router()
    r.add([alert("GpuXid", node="n1")], T0)
    r.due(T0 + WAIT)
    r.add([alert("GpuXid", node="n2")], T0 + 10)
    assert r.next_wakeup() == T0 + WAIT + INTERVAL  # at most one notification per group_interval
    assert r.due(T0 + WAIT + INTERVAL - 1) == []
    assert sent(r.due(T0 + WAIT + INTERVAL)) == [("firing", "n1"), ("firing", "n2")]
    # Nothing changes: the next one is the repeat, with every firing alert again.
    assert r.next_wakeup() == T0 + WAIT + INTERVAL + REPEAT
    assert r.due(T0 + WAIT + INTERVAL + REPEAT - 1) == []
    assert sent(r.due(T0 + WAIT + INTERVAL + REPEAT)) == [("firing", "n1"), ("firing", "n2")]


def test_a_change_after_a_quiet_spell_goes_out_at_once():
    r = router()
    r.add([alert("GpuXid", node="n1")], T0)
    r.due(T0 + WAIT)
    r.add([alert("GpuXid", node="n2")], T0 + 1000)  # long after group_interval
    assert r.next_wakeup() == T0 + WAIT + INTERVAL
    assert sent(r.due(T0 + 1000)) == [("firing", "n1"), ("firing", "n2")]


def test_a_resolution_goes_out_once_and_an_empty_group_disappears():
    r = router()
    a1, a2 = alert("GpuXid", node="n1"), alert("GpuXid", node="n2")
    r.add([a1, a2], T0)
    r.due(T0 + WAIT)
    r.add([resolved(a1)], T0 + 20)
    [n] = r.due(T0 + WAIT + INTERVAL)
    assert sorted(sent([n])) == [("firing", "n2"), ("resolved", "n1")]
    assert n.status == "firing"
    assert sent(r.due(T0 + WAIT + INTERVAL + REPEAT)) == [("firing", "n2")]  # n1 went out once
    r.add([resolved(a2)], T0 + 5000)
    [n] = r.due(T0 + 5000)
    assert (sent([n]), n.status) == ([("resolved", "n2")], "resolved")
    assert r.next_wakeup() is None
    assert r.snapshot()["groups"] == []


def test_an_alert_that_fires_and_resolves_within_group_wait_is_never_sent():
    r = router()
    a = alert("GpuXid", node="n1")
    r.add([a], T0)
    r.add([resolved(a)], T0 + 1)
    assert r.due(T0 + WAIT) == [] and r.next_wakeup() is None


def test_the_latest_state_in_a_batch_wins():
    r = router()
    a = alert("GpuXid", node="n1")
    r.add([a, resolved(a), a], T0)
    assert sent(r.due(T0 + WAIT)) == [("firing", "n1")]
    r.add([resolved(a), a], T0 + 100)  # flapped between notifications: still firing, nothing new
    assert r.due(T0 + 200) == []


# ---- inhibition ----------------------------------------------------------------------------

def test_coolant_loss_mutes_thermal_alerts_in_its_rack_only():
    r = router()
    coolant = alert("CoolantFlowLoss", "r01")
    hot_here, hot_there = alert("GpuOverTemperature", "r01", "n3"), alert("GpuOverTemperature", "r02", "n3")
    r.add([hot_here, hot_there], T0)
    r.add([coolant], T0 + 1)
    out = r.due(T0 + 1 + WAIT)
    assert sorted((n.group_labels["alertname"], n.group_labels["rack"]) for n in out) == [
        ("CoolantFlowLoss", "r01"), ("GpuOverTemperature", "r02")]
    assert r.muted(hot_here, T0 + 10) == f"inhibited by CoolantFlowLoss {coolant['fingerprint']}"
    assert r.muted(hot_there, T0 + 10) is None
    assert r.stats.inhibited == 1
    assert r.next_wakeup() == T0 + 1 + WAIT + REPEAT  # a muted alert alone sets no timer
    # The coolant recovers: the thermal alert, now unmuted, goes out with its group's next notification.
    # Its group never notified, so it goes out at once; the coolant group's resolution waits
    # for that group's group_interval.
    r.add([resolved(coolant)], T0 + 30)
    [n] = r.due(T0 + 30)
    assert (n.group_labels["rack"], sent([n])) == ("r01", [("firing", "n3")])
    assert r.next_wakeup() == T0 + 1 + WAIT + INTERVAL
    assert sent(r.due(T0 + 1 + WAIT + INTERVAL)) == [("resolved", "CoolantFlowLoss")]


def test_a_resolution_of_an_inhibited_alert_is_not_sent():
    r = router()
    hot = alert("GpuThermalRunaway", "r01", "n1")
    r.add([alert("CoolantLeak", "r01"), hot], T0)
    r.due(T0 + WAIT)
    r.add([resolved(hot)], T0 + 10)
    assert r.due(T0 + 1000) == []


def test_an_alert_never_inhibits_itself_and_a_silenced_source_inhibits_nothing(tmp_path):
    store = SilenceStore(tmp_path / "silences.json")
    r = router(store, inhibit_rules=[{"source": "Gpu.*", "target": "Gpu.*", "equal": ["rack"]}])
    xid, ecc = alert("GpuXid", node="n1"), alert("GpuUncorrectableEcc", node="n2")
    r.add([xid], T0)
    assert r.muted(xid, T0) is None  # source and target of the same rule, but alone
    r.add([ecc], T0)
    assert r.muted(xid, T0).startswith("inhibited by GpuUncorrectableEcc")
    assert r.muted(ecc, T0).startswith("inhibited by GpuXid")
    s = store.add(["alertname=GpuXid"], 600, "ops", "planned", now=T0)
    assert r.muted(xid, T0) == f"silenced by {s.id}"
    assert r.muted(ecc, T0) is None  # its only inhibitor is silenced


# ---- silences ----------------------------------------------------------------------------

LABELS = {"alertname": "GpuXid", "rack": "r01", "node": "r01-n03", "gpu": "2"}


@pytest.mark.parametrize("text, expected", [
    ("alertname=GpuXid", True), ("alertname=GpuXi", False), ("alertname!=GpuXid", False),
    ("rack=~r0[12]", True), ("rack=~r0", False),  # a regex matches the whole value
    ("rack!~r0[12]", False), ("rack!~r02", True), ("node=~.*-n03", True),
    ("site=", True), ("site!=", False), ("site=~.+", False), ('comment="needs quotes"', False),
    ('alertname = "GpuXid"', True),
])
def test_matcher_ops(text, expected):
    assert Matcher.parse(text).matches(LABELS) is expected  # a missing label (site) is ""


@pytest.mark.parametrize("text, says", [
    ("alertname", "expected LABEL=VALUE"), ("alertname~GpuXid", "expected LABEL=VALUE"),
    ("=GpuXid", "expected LABEL=VALUE"), ("1rack=r01", "expected LABEL=VALUE"),
    ("rack=~r0[", "not a valid regular expression"),
])
def test_matcher_parse_errors_say_what_is_wrong(text, says):
    with pytest.raises(ConfigError, match=says) as e:
        Matcher.parse(text)
    assert repr(text) in str(e.value) or text in str(e.value)


def test_parse_duration():
    assert [parse_duration(t, "--duration") for t in ("90s", "30m", "2h", "1d", "45", "1.5h")] == [
        90, 1800, 7200, 86400, 45, 5400]
    for bad in ("", "0", "2x", "-5m", "h"):
        with pytest.raises(ConfigError, match="--duration.*90s, 30m, 2h, 1d"):
            parse_duration(bad, "--duration")


def test_silence_store_add_expire_and_file(tmp_path):
    store = SilenceStore(tmp_path / "silences.json")
    s = store.add(["alertname=GpuXid", Matcher.parse("rack=~r0[12]")], 3600, "ana", "ticket 42", now=T0)
    assert s.active(T0) and s.active(T0 + 3599) and not s.active(T0 + 3600)
    assert s.matches(LABELS) and not s.matches({**LABELS, "rack": "r03"})
    doc = json.loads((tmp_path / "silences.json").read_text())  # Alertmanager's v2 silence shape
    assert doc["silences"][0]["matchers"][1] == {"name": "rack", "value": "r0[12]", "isRegex": True, "isEqual": True}
    assert doc["silences"][0]["createdBy"] == "ana"
    again = SilenceStore(tmp_path / "silences.json")
    assert [(x.id, x.matchers, x.comment) for x in again.all()] == [(s.id, s.matchers, "ticket 42")]
    assert again.all()[0].ends_at == pytest.approx(T0 + 3600)
    expired = again.expire(s.id[:6], now=T0 + 60)
    assert expired.ends_at == T0 + 60 and again.active(T0 + 61) == []
    assert store.refresh() and store.active(T0 + 61) == []
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_silence_store_refuses_bad_silences(tmp_path):
    store = SilenceStore(tmp_path / "silences.json")
    with pytest.raises(ConfigError, match="at least one matcher"):
        store.add([], 60, "ana", "x", now=T0)
    with pytest.raises(ConfigError, match="comment"):
        store.add(["rack=r01"], 60, "ana", " ", now=T0)
    with pytest.raises(ConfigError, match="empty label"):
        store.add(["rack!=r01"], 60, "ana", "x", now=T0)
    with pytest.raises(ConfigError, match="no silence with id 'nope'.*silence list --all"):
        store.expire("nope")
    twins = [Silence(f"abc{i}", (Matcher.parse("rack=r01"),), T0, T0 + 60, "ana", "x").to_json() for i in (1, 2)]
    (tmp_path / "silences.json").write_text(json.dumps({"version": 1, "silences": twins}))
    with pytest.raises(ConfigError, match="id prefix 'abc' matches 2 silences.*give more of the id"):
        store.expire("abc")
    assert store.expire("abc2", now=T0).ends_at == T0


def test_a_silence_mutes_until_it_ends_then_the_alert_goes_out(tmp_path):
    store = SilenceStore(tmp_path / "silences.json")
    r = router(store)
    s = store.add(["alertname=GpuXid", "rack=r01"], 300, "ana", "reseating", now=T0)
    here, there = alert("GpuXid", "r01", "n1"), alert("GpuXid", "r02", "n1")
    r.add([here, there], T0 + 1)
    assert sent(r.due(T0 + 10)) == [("firing", "n1")]
    assert r.muted(here, T0 + 10) == f"silenced by {s.id}"
    assert r.stats.silenced == 1
    assert r.next_wakeup() == T0 + 300  # the silence ends
    [n] = r.due(T0 + 300)
    assert n.group_labels["rack"] == "r01" and sent([n]) == [("firing", "n1")]


def test_a_corrupt_silences_file_keeps_the_last_good_set(tmp_path, caplog):
    store = silence_store(tmp_path)
    s = store.add(["rack=r01"], 3600, "ana", "x", now=T0)
    (tmp_path / "silences.json").write_text('{"silences": [')
    with caplog.at_level(logging.WARNING):
        assert not store.refresh()
        assert not store.refresh()  # logged once
    assert [x.id for x in store.all()] == [s.id]
    assert len([r for r in caplog.records if "silences.json is unreadable" in r.getMessage()]) == 1
    with pytest.raises(ConfigError, match="unreadable.*fix it, or move it away"):
        store.add(["rack=r02"], 60, "ana", "x")  # a writer never replaces what it cannot read


# ---- saved state ------------------------------------------------------------------------------

def test_restore_prevents_notifying_again_after_a_restart():
    r = router()
    a1, a2 = alert("GpuXid", node="n1"), alert("GpuXid", node="n2")
    r.add([a1, a2], T0)
    r.due(T0 + WAIT)
    r.add([resolved(a1)], T0 + 6)  # the resolution has not gone out yet
    state = json.loads(json.dumps(r.snapshot()))

    restarted = router()
    restarted.restore(state)
    restarted.add([a2], T0 + 20)  # the detector re-announces what still fires
    assert restarted.next_wakeup() == T0 + WAIT + INTERVAL
    assert sorted(sent(restarted.due(T0 + WAIT + INTERVAL))) == [("firing", "n2"), ("resolved", "n1")]
    assert restarted.due(T0 + 1000) == []
    assert sent(restarted.due(T0 + WAIT + INTERVAL + REPEAT)) == [("firing", "n2")]

    forgetful = router()  # without the state, the same alert would page again
    forgetful.add([a2], T0 + 20)
    assert sent(forgetful.due(T0 + 20 + WAIT)) == [("firing", "n2")]


def test_restore_after_group_by_changed_starts_groups_afresh():
    r = router()
    r.add([alert("GpuXid", node="n1")], T0)
    r.due(T0 + WAIT)
    regrouped = router(group_by=["alertname", "site", "rack", "node"])
    regrouped.restore(r.snapshot())
    [n] = regrouped.due(T0 + WAIT + 1)
    assert n.group_key == '{}:{alertname="GpuXid",node="n1",rack="r01",site="site-a"}'


# ---- properties ---------------------------------------------------------------------------------

POOL = [alert(name, rack, node) for name in ("CoolantLeak", "GpuOverTemperature", "GpuXid")
        for rack in ("r01", "r02") for node in ("n1", "n2")]
MATCHERS = ["rack=r01", "node=~n[12]", "alertname=~Coolant.*|GpuOver.*", "alertname=~Gpu.*"]
STEP = st.tuples(st.floats(0, 120), st.one_of(
    st.tuples(st.just("fire"), st.integers(0, len(POOL) - 1)),
    st.tuples(st.just("resolve"), st.integers(0, len(POOL) - 1)),
    st.tuples(st.just("silence"), st.integers(0, len(MATCHERS) - 1), st.floats(1, 500))))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STEP, max_size=30))
def test_notifications_hold_no_muted_alert_and_every_unmuted_firing_alert_goes_out(steps):
    with tempfile.TemporaryDirectory() as d:
        store = SilenceStore(Path(d) / "silences.json")
        r = router(store, group_interval_s=30.0, repeat_interval_s=1000.0)
        now, firing, told_firing = T0, set(), set()

        def check(notifications):
            for n in notifications:
                assert n.alerts, "an empty notification"
                for a in n.alerts:
                    if a["status"] == "firing":
                        assert r.muted(a, now) is None, "a muted alert was sent"
                        told_firing.add(a["fingerprint"])
                    else:
                        assert a["fingerprint"] in told_firing, "a resolution of an alert never sent"

        for dt, op in steps:
            now += dt
            if op[0] == "silence":
                store.add([MATCHERS[op[1]]], op[2], "prop", "test", now=now)
            else:
                a = POOL[op[1]] if op[0] == "fire" else resolved(POOL[op[1]])
                r.add([a], now)
                (firing.add if op[0] == "fire" else firing.discard)(a["fingerprint"])
            check(r.due(now))
        now += 2000  # every silence is over and every repeat is due
        final = r.due(now)
        check(final)
        unmuted = {a["fingerprint"] for a in POOL if a["fingerprint"] in firing and r.muted(a, now) is None}
        assert {a["fingerprint"] for n in final for a in n.alerts if a["status"] == "firing"} == unmuted


def test_a_malformed_state_is_dropped_not_fatal(caplog):
    r = router()
    with caplog.at_level(logging.ERROR):
        r.restore({"groups": [{"key": "x"}]})
    assert "routing state is malformed" in caplog.text
    r.add([alert("GpuXid", node="n1")], T0)
    assert sent(r.due(T0 + WAIT)) == [("firing", "n1")]
