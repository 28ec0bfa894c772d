"""The remediation state machine and its guardrails (pipeline/remediate/), driven with alert
changes and an injected clock. The backend is the command backend with a real script that
records each call and answers `drained` and `held` from files a test sets, as a site's tooling
would; Slurm itself is tested in test_remediate_backends.py and tests/e2e/test_remediation_slurm.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline.model import REMEDIATION_EVENT
from pipeline.remediate.backends import backend_for
from pipeline.remediate.cases import AlertChange, events_to_batch
from pipeline.remediate.remediator import Remediator
from pipeline.remediate.validate import validation_for
from tests.conftest import make_config

SCRIPT = """#!/bin/bash
# A site's tooling: records each call; `drained` and `held` answer from files the test sets.
d="$(dirname "$0")"
echo "$1 $2 $3" >> "$d/calls"
cat > "$d/stdin.$2"
case "$2" in
  drained) [ -e "$d/busy.$1" ] && exit 1; exit 0 ;;
  held) [ -e "$d/resumed.$1" ] && exit 1; exit 0 ;;
  *) exit 0 ;;
esac
"""
CHECK = """#!/bin/bash
d="$(dirname "$0")"
[ -e "$d/fail.$1" ] && { echo "dcgmi diag: memory test failed" >&2; exit 1; }
echo "dcgmi diag -r 1: pass"
"""
FLEET = {f"r01-n0{i}": "r01" for i in range(1, 9)} | {f"r02-n0{i}": "r02" for i in range(1, 9)}


class Site:
    """A remediator over a 16-node fleet (two racks of 8), its tooling script and a clock."""

    def __init__(self, tmp: Path, apply: bool = False, validate: bool = True, **settings) -> None:
        self.dir = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        script = tmp / "tooling.sh"
        script.write_text(SCRIPT)
        script.chmod(0o755)
        check = tmp / "check.sh"
        check.write_text(CHECK)
        check.chmod(0o755)
        rc = {"backend": "command", "command": str(script), "breaker_fleet_pct": 100.0, "breaker_rack_pct": 100.0,
              "interval_s": 1.0, **({"validate_command": str(check)} if validate else {}), **settings}
        if apply:
            rc["dry_run"] = False
        self.cfg = make_config(remediate=rc, data_dir=str(tmp / "data"))
        self.rem = Remediator(self.cfg, backend_for(self.cfg), validation_for(self.cfg))
        self.rem.see(FLEET)
        self.t = 1_000_000.0
        self.events: list = []
        self.alerts: list = []

    def step(self, *changes: AlertChange, dt: float = 1.0) -> list:
        self.t += dt
        events, alerts = self.rem.step(self.t, list(changes))
        self.events += events
        self.alerts += alerts
        return events

    def run(self, seconds: float, dt: float = 1.0) -> None:
        for _ in range(int(seconds / dt)):
            self.step(dt=dt)

    def calls(self) -> list[str]:
        f = self.dir / "calls"
        return f.read_text().splitlines() if f.exists() else []

    def states(self, node: str) -> list[str]:
        return [e.to_state for e in self.events if e.node == node and e.from_state != e.to_state]

    def state(self, node: str) -> str:
        case = self.rem.cases.get(node)
        return case.state if case else "healthy"


def alert(node: str, name: str = "GpuUncorrectableEcc", remediation: str = "reset_gpu", gpu: str = "3",
          firing: bool = True, fp: str | None = None, rack: str | None = None, severity: str = "critical",
          t: float = 1_000_000.0) -> AlertChange:
    rack = rack or node.split("-")[0]
    return AlertChange(fp or f"{name}-{node}-{gpu}", firing, name, severity, "site-a", rack, node, gpu, t,
                       remediation, f"{node} GPU {gpu}: {name}")


def test_dry_run_is_the_default_plans_every_transition_and_applies_nothing(tmp_path):
    s = Site(tmp_path)
    assert s.rem.dry_run and s.cfg.remediate.dry_run
    s.step(alert("r01-n01"))
    s.run(5)
    assert s.states("r01-n01") == ["quarantined", "drained", "action", "validating"]
    s.step(alert("r01-n01", firing=False))
    s.run(2)
    assert s.states("r01-n01")[-1] == "healthy"
    assert s.calls() == []  # the tooling was never called
    assert all(e.dry_run and not e.applied for e in s.events)
    batch = events_to_batch(s.events)  # what the archive gets
    assert batch.schema == REMEDIATION_EVENT and batch.num_rows == len(s.events)
    first = batch.to_pylist()[0]
    assert (first["alertname"], first["fingerprint"], first["remediation"]) == (
        "GpuUncorrectableEcc", "GpuUncorrectableEcc-r01-n01-3", "reset_gpu")


def test_applied_a_node_goes_quarantined_drained_action_validating_and_back_with_the_alert_in_each_call(tmp_path):
    s = Site(tmp_path, apply=True)
    (tmp_path / "busy.r01-n02").touch()  # a job still runs on it
    s.step(alert("r01-n02"))
    s.run(3)
    assert s.state("r01-n02") == "quarantined"  # draining: it waits for the job
    (tmp_path / "busy.r01-n02").unlink()
    s.run(6)
    assert s.states("r01-n02") == ["quarantined", "drained", "action", "validating", "healthy"]
    steps = [c.split()[1] for c in s.calls() if c.split()[1] not in ("held", "drained")]
    assert steps == ["quarantine", "reset_gpu", "resume"]
    assert "r01-n02 quarantine GpuUncorrectableEcc" in s.calls()
    case = json.loads((tmp_path / "stdin.quarantine").read_text())
    assert case["fingerprint"] == "GpuUncorrectableEcc-r01-n02-3" and case["remediation"] == "reset_gpu"
    back = [e for e in s.events if e.to_state == "healthy"][0]
    assert back.applied and "dcgmi diag -r 1: pass" in back.detail


def test_a_node_name_that_is_no_host_name_reaches_no_command(tmp_path):
    """A node's name comes from the samples (an exporter's Hostname label, a Kafka producer):
    `-oProxyCommand=...` had reached the site's script as its first argument, an option to its
    `ssh "$1"`: a command run as the remediation user."""
    s = Site(tmp_path, apply=True)
    for node in ("-oProxyCommand=touch owned", "gpu[01-04]", "a,b", "ALL"):
        s.step(alert(node, rack="r01"))
    s.run(3)
    assert s.calls() == [] and s.rem.cases == {}
    refused = [e for e in s.events if e.guardrail == "node_name"]
    assert len(refused) == 4 and "is not one host name" in refused[0].detail
    from pipeline.remediate.backends.base import BackendError
    with pytest.raises(BackendError, match="is not one host name"):  # and if one got past: the backend refuses it
        s.rem.backend.quarantine("-oProxyCommand=touch owned", {})
    assert s.calls() == [] and validation_for(s.cfg).check("-x", {})[0] is False


def test_only_allow_listed_alerts_start_a_case(tmp_path):
    s = Site(tmp_path, alertnames=["GpuFellOffBus"])
    s.step(alert("r01-n01"), alert("r01-n02", name="GpuNvlinkError", remediation="drain_inspect"))
    s.step(alert("r01-n03", name="GpuFellOffBus", remediation="reboot_node"))
    assert sorted(s.rem.cases) == ["r01-n03"]
    default = Site(tmp_path / "d")  # by default: the critical GPU and node alerts that name a remediation
    assert "GpuFellOffBus" in default.rem.allowed and "GpuStraggler" not in default.rem.allowed
    default.step(alert("r01-n01", name="GpuXid", remediation="replace", severity="warning"))
    assert default.rem.cases == {}


def test_the_breaker_trips_at_the_fleet_share_raises_an_alert_and_closes_after_a_quiet_window(tmp_path):
    s = Site(tmp_path, breaker_fleet_pct=10.0, breaker_window_s=600.0)  # 10% of 16 nodes: one at a time
    s.step(alert("r01-n01"))
    s.step(alert("r02-n01"))
    assert list(s.rem.cases) == ["r01-n01"]
    refused = [e for e in s.events if e.guardrail == "breaker"]
    assert refused and refused[0].node == "r02-n01" and "2 of 16 nodes of the fleet" in refused[0].detail
    assert [a.alertname for a in s.alerts] == ["RemediationBreakerOpen"] and s.alerts[0].ends_at is None
    assert "2 of 16 nodes of the fleet" in s.alerts[0].annotations["summary"]
    s.step(alert("r02-n05"))  # still open: refused, and the window starts again
    assert "r02-n05" not in s.rem.cases
    s.step(alert("r01-n01", firing=False), alert("r02-n01", firing=False), alert("r02-n05", firing=False))
    s.run(590)
    assert len(s.alerts) == 1  # not a whole window yet
    s.run(15)
    assert s.alerts[-1].ends_at is not None and s.rem.guardrails.breaker.trips == 1
    s.step(alert("r02-n06"))
    assert "r02-n06" in s.rem.cases


def test_nodes_no_inventory_holds_do_not_dilute_the_breaker(tmp_path):
    """Any producer of GPU samples can name nodes: 84 made-up ones beside the 16 had raised the fleet's
    count to 100, and 10% of it let 10 real nodes be quarantined in one window. remediate.fleet_nodes (and
    rack_nodes) bound the count by a trusted inventory."""
    made_up = {f"r01-x{i:02d}": "r01" for i in range(84)}
    quarantined = {}
    for bound in (0, 16):
        s = Site(tmp_path / f"bound{bound}", breaker_fleet_pct=10.0, fleet_nodes=bound, rack_nodes=bound and 8)
        s.rem.see(made_up)
        for i in range(1, 6):
            s.step(alert(f"r01-n0{i}"), alert(f"r02-n0{i}"))
        quarantined[bound] = sorted(s.rem.cases)
    assert len(quarantined[0]) == 10  # diluted: 10 of 100 is no storm
    assert len(quarantined[16]) == 1 and s.rem.guardrails.breaker.where == "the fleet"
    assert "2 of 16 nodes of the fleet" in s.alerts[0].annotations["summary"]


def test_one_failing_node_of_a_small_fleet_is_no_storm(tmp_path):
    """5% of 16 nodes is under one node: the breaker waits for remediate.breaker_min_nodes (2)."""
    s = Site(tmp_path, breaker_fleet_pct=5.0)
    s.step(alert("r01-n01"))
    assert list(s.rem.cases) == ["r01-n01"] and s.rem.guardrails.breaker.trips == 0 and not s.alerts
    s.step(alert("r02-n03"))
    assert "r02-n03" not in s.rem.cases and s.rem.guardrails.breaker.where == "the fleet"
    assert [a.alertname for a in s.alerts] == ["RemediationBreakerOpen"]


def test_the_breaker_trips_at_the_rack_share_and_a_rack_alert_keeps_its_nodes_in_service(tmp_path):
    s = Site(tmp_path, breaker_rack_pct=50.0)
    for i in range(1, 6):
        s.step(alert(f"r01-n0{i}"))
    assert sorted(s.rem.cases) == ["r01-n01", "r01-n02", "r01-n03", "r01-n04"]  # the 5th of 8 is over half
    assert s.rem.guardrails.breaker.where == "rack r01"
    t = Site(tmp_path / "rack")
    t.step(AlertChange("rack-fp", True, "RackThermalAnomaly", "critical", "site-a", "r02", "", "", t.t, "none"))
    t.step(alert("r02-n03", name="GpuOverTemperature", remediation="drain_inspect"))
    assert t.rem.cases == {} and t.events[-1].guardrail == "rack_alert"
    assert "RackThermalAnomaly" in t.events[-1].detail


def test_rate_limit_and_cooldown(tmp_path):
    s = Site(tmp_path, max_per_hour=2, cooldown_s=7200.0)
    s.step(alert("r01-n01"), alert("r01-n02"), alert("r01-n03"))
    assert sorted(s.rem.cases) == ["r01-n01", "r01-n02"]
    assert [e.guardrail for e in s.events if e.node == "r01-n03"] == ["rate_limit"]
    assert len([e for e in s.events if e.node == "r01-n03"]) == 1  # said once, not every round
    s.run(3)
    s.step(alert("r01-n01", firing=False))
    s.run(3)
    assert s.state("r01-n01") == "healthy"
    s.step(alert("r01-n01", fp="again"), dt=3600.0)  # the rate limit's hour is over; the cooldown is not
    assert "r01-n01" not in s.rem.cases and [e for e in s.events if e.node == "r01-n01"][-1].guardrail == "cooldown"
    assert "r01-n03" in s.rem.cases  # its alert still fires: quarantined once the hour allows


def test_a_repeat_offender_goes_to_needs_repair_instead_of_back_to_service(tmp_path):
    s = Site(tmp_path, apply=True, repeat_limit=2, cooldown_s=0.0)
    for i in range(3):
        s.step(alert("r01-n04", fp=f"ecc-{i}"))
        s.run(6)
        s.step(alert("r01-n04", fp=f"ecc-{i}", firing=False))
    assert s.states("r01-n04").count("healthy") == 2
    assert s.state("r01-n04") == "needs_repair"
    last = s.events[-1] if s.events[-1].node == "r01-n04" else [e for e in s.events if e.node == "r01-n04"][-1]
    assert last.guardrail == "repeat_offender" and "more than 2 times in 7 days" in last.detail
    assert [c for c in s.calls() if c.endswith("resume ")] == []  # resume's ALERTNAME is the case's
    assert sum(1 for c in s.calls() if " resume " in c) == 2


def test_a_node_an_operator_resumed_is_not_drained_again_for_the_same_alert(tmp_path):
    s = Site(tmp_path, apply=True, validate=False)
    s.step(alert("r02-n02"))
    s.run(5)
    assert s.state("r02-n02") == "validating"  # no check configured: it waits for a person
    (tmp_path / "resumed.r02-n02").touch()  # the operator: scontrol update state=resume
    s.run(2)
    assert s.state("r02-n02") == "healthy"
    back = [e for e in s.events if e.node == "r02-n02"][-1]
    assert back.guardrail == "operator_resumed" and not back.applied
    (tmp_path / "resumed.r02-n02").unlink()
    s.run(3 * 7200.0, dt=7200.0)  # long past any cooldown: the same alert still fires
    assert "r02-n02" not in s.rem.cases
    s.step(alert("r02-n02", name="GpuFellOffBus", remediation="reboot_node"))  # a new alert is a new case
    assert s.states("r02-n02")[-2:] == ["quarantined", "drained"]


def test_validation_that_fails_sends_the_node_to_repair_and_hand_off_remediations_skip_the_action(tmp_path):
    s = Site(tmp_path, apply=True)
    (tmp_path / "fail.r01-n05").touch()
    s.step(alert("r01-n05"), alert("r01-n06", name="GpuOverTemperature", remediation="drain_inspect"))
    s.run(6)
    assert s.states("r01-n05") == ["quarantined", "drained", "action", "validating", "needs_repair"]
    assert "memory test failed" in s.events[[e.node for e in s.events].index("r01-n05", -1)].detail or \
        any("memory test failed" in e.detail for e in s.events if e.node == "r01-n05")
    assert s.states("r01-n06") == ["quarantined", "drained", "needs_repair"]
    assert not any(c.startswith("r01-n06 reset_gpu") or c.startswith("r01-n06 reboot_node") for c in s.calls())


def test_a_costlier_alert_before_the_action_changes_the_action(tmp_path):
    s = Site(tmp_path, apply=True)
    (tmp_path / "busy.r01-n07").touch()
    s.step(alert("r01-n07"))
    s.step(alert("r01-n07", name="GpuFellOffBus", remediation="reboot_node", gpu="5"))
    (tmp_path / "busy.r01-n07").unlink()
    s.run(4)
    assert "r01-n07 reboot_node GpuUncorrectableEcc" in s.calls()


def test_a_failing_backend_is_retried_and_said_once(tmp_path):
    s = Site(tmp_path, apply=True)
    (tmp_path / "tooling.sh").write_text("#!/bin/bash\necho 'scontrol: Unable to contact slurm controller' >&2\n"
                                          "exit 5\n")
    s.step(alert("r01-n08"))
    s.run(5)
    failed = [e for e in s.events if e.node == "r01-n08"]
    assert len(failed) == 1 and "Unable to contact slurm controller" in failed[0].detail
    assert failed[0].from_state == failed[0].to_state == "healthy" and not failed[0].applied
    (tmp_path / "tooling.sh").write_text(SCRIPT)
    s.run(1)
    assert s.states("r01-n08")[0] == "quarantined"


def test_a_restarted_role_goes_on_with_its_cases_and_history(tmp_path):
    from pipeline.remediate import store
    s = Site(tmp_path, apply=True, repeat_limit=1, validate=False)
    s.step(alert("r01-n01"), alert("r02-n01", name="GpuFellOffBus", remediation="reboot_node"))
    s.run(2)
    store.save(s.cfg, s.rem)
    again = Remediator(s.cfg, backend_for(s.cfg), validation_for(s.cfg))
    assert store.load(s.cfg, again) is not None
    assert {n: c.state for n, c in again.cases.items()} == {n: c.state for n, c in s.rem.cases.items()}
    assert again.guardrails.quarantines == s.rem.guardrails.quarantines and again.firing.keys() == s.rem.firing.keys()
    assert again.snapshot() == s.rem.snapshot()


def test_a_state_that_cannot_be_saved_is_said_once_and_remediation_goes_on(tmp_path, caplog):
    """A full disk (here: state/ is a file) must not stop the role: the failure is said once,
    the next save that works says so, and the cases go on meanwhile."""
    from pipeline.remediate import store
    s = Site(tmp_path, apply=True)
    save = store.saver(s.cfg, s.rem)
    s.cfg.state_dir.parent.mkdir(parents=True, exist_ok=True)
    s.cfg.state_dir.write_text("not a folder")
    s.step(alert("r01-n01"))
    with caplog.at_level("INFO", logger="pipeline.remediate"):
        assert not save() and not save()
        s.run(1)
        assert s.state("r01-n01") != "healthy"
        s.cfg.state_dir.unlink()
        assert save()
    said = [r.getMessage() for r in caplog.records if "state" in r.getMessage() and "remediation.json" in r.getMessage()]
    assert len(said) == 2 and "cannot write" in said[0] and "a restart now would resume" in said[0], said
    assert "written again" in said[1]
    assert json.loads(store.state_path(s.cfg).read_text()) == json.loads(json.dumps(s.rem.snapshot()))


def test_a_bad_setting_says_what_to_do():
    from pipeline.config import ConfigError
    with pytest.raises(ConfigError, match="remediate.alertnames.*unknown entries"):
        make_config(remediate={"alertnames": ["GpuMelted"]})
    with pytest.raises(ConfigError, match="needs remediate.command"):
        backend_for(make_config(remediate={"backend": "command"}))


def test_a_drain_past_its_timeout_waits_and_says_so_once_or_goes_on_when_told(tmp_path):
    waits = Site(tmp_path / "wait", apply=True, drain_timeout_s=10.0)
    (tmp_path / "wait" / "busy.r01-n01").touch()
    waits.step(alert("r01-n01"))
    waits.run(30)
    assert waits.state("r01-n01") == "quarantined"
    said = [e for e in waits.events if "still runs after remediate.drain_timeout_s" in e.detail]
    assert len(said) == 1 and said[0].from_state == said[0].to_state == "quarantined"
    goes = Site(tmp_path / "go", apply=True, drain_timeout_s=10.0, on_drain_timeout="proceed")
    (tmp_path / "go" / "busy.r01-n01").touch()
    goes.step(alert("r01-n01"))
    goes.run(15)
    assert goes.states("r01-n01")[:3] == ["quarantined", "drained", "action"]
    assert "ran past remediate.drain_timeout_s" in [e for e in goes.events if e.to_state == "drained"][0].detail
    assert goes.alerts == []  # (it went on: nothing waits)


def test_a_drain_that_waits_past_its_timeout_raises_an_alert_until_the_node_drains(tmp_path):
    """Waiting for a node's work to end is a person's to shorten: an event alone (the role's
    log, remediation_events) reached no one. RemediationDrainOverdue fires once the timeout
    passes, survives a restart as the same alert, and resolves when the node drains."""
    from pipeline.remediate import store
    s = Site(tmp_path, apply=True, drain_timeout_s=10.0)
    (tmp_path / "busy.r01-n01").touch()
    s.step(alert("r01-n01"))
    s.run(9)
    assert s.alerts == []
    s.run(3)
    [fired] = s.alerts
    assert fired.labels == {"alertname": "RemediationDrainOverdue", "severity": "warning", "site": "site-a",
                            "rack": "r01", "node": "r01-n01"}
    assert fired.annotations["summary"] == "r01-n01: quarantined for GpuUncorrectableEcc 10s ago, its work still runs"
    assert fired.starts_at.timestamp() == s.rem.cases["r01-n01"].since + 10.0 and fired.ends_at is None
    s.run(30)
    assert len(s.alerts) == 1  # once
    store.save(s.cfg, s.rem)
    longer = dataclasses.replace(s.cfg, remediate=dataclasses.replace(s.cfg.remediate, drain_timeout_s=3600.0))
    again = Remediator(longer, backend_for(longer), validation_for(longer))  # (its timeout changed meanwhile)
    store.load(longer, again)
    assert again.overdue["r01-n01"].fingerprint == fired.fingerprint
    assert again.overdue["r01-n01"].starts_at == fired.starts_at  # the same alert as told, not a second firing
    (tmp_path / "busy.r01-n01").unlink()  # the work ended
    s.run(2)
    resolved = s.alerts[-1]
    assert resolved.fingerprint == fired.fingerprint and resolved.ends_at is not None
    assert s.state("r01-n01") != "quarantined" and s.rem.overdue == {}
    dry = Site(tmp_path / "dry", drain_timeout_s=10.0)  # dry-run: a node drains at once, nothing waits
    (tmp_path / "dry" / "busy.r01-n01").touch()
    dry.step(alert("r01-n01"))
    dry.run(30)
    assert dry.alerts == []


def test_an_alert_that_keeps_asking_is_one_request_and_does_not_trip_the_breaker_later(tmp_path):
    s = Site(tmp_path, breaker_fleet_pct=10.0, cooldown_s=86400.0)  # 10% of 16 nodes: one node per window
    s.rem.guardrails.back_in_service("r01-n01", s.t)  # just back: its alert is refused by the cooldown all day
    s.step(alert("r01-n01"))
    s.run(3 * 600.0, dt=10.0)  # three windows later it still asks, but it asked once
    s.step(alert("r02-n01"))
    assert "r02-n01" in s.rem.cases and s.rem.guardrails.breaker.trips == 0
    assert [e.guardrail for e in s.events if e.node == "r01-n01"] == ["cooldown"]


def test_the_role_goes_on_when_its_own_alert_meets_its_own_full_queue(tmp_path):
    """In-process the role reads the alerts topic it publishes its own alerts on. A slow
    backend call (here a quarantine that takes 0.5 s) while the GPU samples keep coming fills
    its queue; waiting then for room in that queue to publish the breaker's alert never ended,
    and every publisher on the bus waited behind it."""
    import asyncio

    from pipeline.bus import MemoryBus, Message, Topic
    from pipeline.detect.catalog import raised
    from pipeline.model import alert_rows, alerts_to_batch
    from pipeline.roles.remediate import remediate_role
    from tests.test_archive_location import sim_batches
    s = Site(tmp_path, apply=True, breaker_fleet_pct=5.0, breaker_min_nodes=2)
    (tmp_path / "tooling.sh").write_text(SCRIPT.replace('echo "$1 $2 $3"', 'sleep 0.5; echo "$1 $2 $3"'))

    class Gate:
        async def screen(self, messages):
            return messages

    def fault(node: str):
        a = raised("GpuUncorrectableEcc", {"site": "site-a", "rack": node.split("-")[0], "node": node, "gpu": "3",
                                           "UUID": f"GPU-{node}-3"}, {"what": "DBE"}, _dt(s.t))
        return Message(Topic.ALERTS, alerts_to_batch([(a.starts_at, a)]))

    async def go() -> list[str]:
        bus = MemoryBus(queue_size=4)
        await bus.start()
        told = bus.subscribe([Topic.ALERTS], "notify")
        sub = bus.subscribe([Topic.ALERTS, Topic.GPU], "remediate")

        async def emit(topic, batch):
            await bus.publish(Message(topic, batch))
        role = asyncio.create_task(remediate_role(s.rem, sub, Gate(), emit, lambda: s.t, lambda: None, 60.0))
        gpu = sim_batches(1)[0]

        async def samples() -> None:  # the bus runs on while the backend is slow
            for _ in range(40):
                await bus.publish(Message(Topic.GPU, gpu))
        feeding = asyncio.create_task(samples())
        names: list[str] = []
        for node in ("r01-n01", "r02-n02"):
            await bus.publish(fault(node))
        while "RemediationBreakerOpen" not in names:
            names += [r["labels"]["alertname"] for m in await told.get_batch(timeout_s=1.0) for r in alert_rows(m.value)]
        await feeding
        await bus.end([Topic.ALERTS, Topic.GPU])
        await role
        return names
    names = asyncio.run(asyncio.wait_for(go(), 60))
    assert "RemediationBreakerOpen" in names


def _dt(t: float):
    from datetime import datetime, timezone
    return datetime.fromtimestamp(t, timezone.utc)
