"""Remediation backends (pipeline/remediate/backends/) and validation: the Slurm backend
against a real slurmctld (drain, drained, held, resume, and an operator's own drain), and
with a real slurmd a node whose job keeps it DRAINING until the job ends; the command
backend and the validation command against real scripts that record what they were given."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.remediate.backends import backend_for
from pipeline.remediate.backends.base import BackendError, Unsupported, reason
from pipeline.remediate.backends.command import Command
from pipeline.remediate.backends.slurm import Slurm, is_drained, parse_node
from pipeline.remediate.validate import Validation, validation_for
from tests.conftest import make_config
from tests.services import Slurmctld, slurm_binary

CONTEXT = {"alertname": "GpuUncorrectableEcc", "fingerprint": "3f2a9c", "remediation": "reset_gpu",
           "severity": "critical", "summary": "GPU 3 of r01-n01: uncorrectable ECC errors", "rack": "r01",
           "gpu": "GPU-3", "case": "r01-n01@2026-01-05T10:00:00Z"}
OURS = reason(CONTEXT)
DOWN_AS_TESTS_START = OURS + "; DOWN before: test"  # (the test cluster's nodes are DOWN, reason "test")

# What slurmctld 22.05 prints (`scontrol show node NODE --oneliner`), shortened in the middle.
ONELINE = ("NodeName=r01-n01 CoresPerSocket=1  CPUAlloc=0 CPUEfctv=1 CPUTot=1 CPULoad=N/A AvailableFeatures=(null) "
           "NodeAddr=127.0.0.1 NodeHostName=r01-n01  RealMemory=1000 AllocMem=0 FreeMem=N/A Sockets=1 Boards=1 "
           "State={state} ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=gpu  "
           "BootTime=None SlurmdStartTime=None LastBusyTime=Unknown CfgTRES=cpu=1,mem=1000M,billing=1 AllocTRES= "
           "CapWatts=n/a CurrentWatts=0 AveWatts=0 ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s{reason}")


def line(state: str, why: str = "") -> str:
    return ONELINE.format(state=state, reason=f" Reason={why}" if why else "")


@pytest.mark.parametrize("state, base, flags, drained", [
    ("IDLE+DRAIN", "IDLE", {"DRAIN"}, True),
    ("DOWN+DRAIN", "DOWN", {"DRAIN"}, True),                       # a DOWN node runs nothing
    ("DOWN+DRAIN+NOT_RESPONDING", "DOWN", {"DRAIN", "NOT_RESPONDING"}, True),
    ("IDLE+DRAIN+NOT_RESPONDING", "IDLE", {"DRAIN", "NOT_RESPONDING"}, True),
    ("MIXED+DRAIN", "MIXED", {"DRAIN"}, False),                    # draining: jobs still run
    ("ALLOCATED+DRAIN", "ALLOCATED", {"DRAIN"}, False),
    ("IDLE+COMPLETING+DRAIN", "IDLE", {"COMPLETING", "DRAIN"}, False),  # the last job still ending
    ("IDLE", "IDLE", set(), False),                                # resumed: not drained at all
    ("DOWN+NOT_RESPONDING", "DOWN", {"NOT_RESPONDING"}, False),
    ("idle*", "IDLE", set(), False),
])
def test_the_state_of_a_node_is_its_base_and_its_flags(state, base, flags, drained):
    node = parse_node(line(state, f"{OURS} [root@2026-01-05T10:00:01]"))
    assert (node["name"], node["base"], node["flags"]) == ("r01-n01", base, flags)
    assert is_drained(node) is drained


def test_the_reason_loses_slurms_user_and_time_and_keeps_its_own_equals_signs():
    assert parse_node(line("IDLE+DRAIN", f"{OURS} [slurm@2026-01-05T10:00:01]"))["reason"] == OURS
    assert parse_node(line("DOWN", "Not responding"))["reason"] == "Not responding"  # no suffix: all of it
    assert parse_node(line("IDLE"))["reason"] == ""
    later = line("IDLE+DRAIN", "ops: fan [alice@2026-01-05T10:00:01]") + " Comment=rack 4 Extra=x"  # Slurm >= 23.02
    assert parse_node(later)["reason"] == "ops: fan"
    # Slurm >= 23.11 prints these after the reason too: read into it, a DOWN node's "Not responding" came back
    # at resume with them in it, and Slurm returns a node to service by itself only on that exact reason
    for after in [" ReservationName=maint_0502", " InstanceId=i-0abc InstanceType=p5.48xlarge"]:
        assert parse_node(line("DOWN+NOT_RESPONDING", "Not responding [slurm@2026-01-05T10:00:01]") + after)[
            "reason"] == "Not responding"
        assert parse_node(line("IDLE+DRAIN", f"{OURS} [root@2026-01-05T10:00:01]") + after)["reason"] == OURS
        operators = "bad PSU, ask [gpu-ops@example.com] before resuming"  # only the stamp Slurm puts last is cut
        assert parse_node(line("DOWN", f"{operators} [alice@2026-01-05T10:00:01]") + after)["reason"] == operators
    several = ("NodeName=r01-n01 Arch=x86_64 CoresPerSocket=1\n   State=MIXED+DRAIN ThreadsPerCore=1 TmpDisk=0\n"
               f"   Reason={OURS} [root@2026-01-05T10:00:01]\n   Comment=(null)\n")  # without --oneliner
    assert parse_node(several) == {"name": "r01-n01", "base": "MIXED", "flags": {"DRAIN"}, "reason": OURS}
    with pytest.raises(ValueError, match="no State="):
        parse_node("Node r09-n01 not found")


# ---- Slurm, against a real slurmctld (its nodes DOWN, no slurmd) ----

NODES = {f"fw-n{i:02d}": "" for i in range(1, 17)}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    ctl = Slurmctld(NODES, tmp_path_factory.mktemp("slurm")).start(timeout_s=60)
    backend = Slurm(env=ctl.env, timeout_s=30)
    for _ in range(100):  # listening is not answering yet
        try:
            backend.show("fw-n01")
            break
        except BackendError:
            time.sleep(0.1)
    yield ctl
    ctl.close()


@pytest.fixture()
def backend(slurm) -> Slurm:
    return Slurm(env=slurm.env, timeout_s=30)


def test_a_quarantine_drains_the_node_with_a_reason_naming_the_alert(slurm, backend):
    backend.quarantine("fw-n01", CONTEXT)
    shown = subprocess.run([slurm_binary("scontrol"), "show", "node", "fw-n01"], env=slurm.env, capture_output=True,
                           text=True, check=True).stdout
    assert "DRAIN" in shown and "Reason=fleetwatch: GpuUncorrectableEcc fingerprint=3f2a9c" in shown, shown
    node = backend.show("fw-n01")
    # DOWN+DRAIN, the reason it was DOWN for kept in ours
    assert (node["base"], "DRAIN" in node["flags"], node["reason"]) == ("DOWN", True, DOWN_AS_TESTS_START)
    assert backend.drained("fw-n01") is True  # no job on it
    assert backend.held("fw-n01") is True
    backend.quarantine("fw-n01", CONTEXT)  # again (a restart mid-case): the same drain
    assert backend.show("fw-n01")["reason"] == DOWN_AS_TESTS_START


def test_an_operators_resume_ends_the_hold_and_ours_is_then_nothing_to_do(slurm, backend):
    backend.quarantine("fw-n02", CONTEXT)
    slurm.scontrol("update", "nodename=fw-n02", "state=resume")
    assert backend.held("fw-n02") is False
    assert backend.drained("fw-n02") is False
    backend.resume("fw-n02", CONTEXT)  # Slurm itself would refuse a second resume ("Invalid node state")


def test_a_node_drained_while_down_is_put_back_down_with_its_reason_never_into_service(slurm, backend):
    """A DOWN node (an operator's "ops: PSU swap pending", or Slurm's "Not responding") is drained
    all the same, so that it cannot come back into service with its fault. Its resume had made it
    IDLE, back in service, the operator's reason gone: it is now DOWN again, with that reason.
    An operator's FAIL is never taken over."""
    slurm.scontrol("update", "nodename=fw-n03", "state=down", "reason=ops: PSU swap pending")
    backend.quarantine("fw-n03", CONTEXT)
    node = backend.show("fw-n03")
    assert (node["base"], "DRAIN" in node["flags"]) == ("DOWN", True)
    assert node["reason"] == OURS + "; DOWN before: ops: PSU swap pending"  # theirs, seen in sinfo too
    backend.resume("fw-n03", CONTEXT)
    node = backend.show("fw-n03")
    assert (node["base"], "DRAIN" in node["flags"], node["reason"]) == ("DOWN", False, "ops: PSU swap pending")
    slurm.scontrol("update", "nodename=fw-n11", "state=fail", "reason=ops: retire")
    with pytest.raises(BackendError, match="fw-n11 is FAIL, set by someone else \\(reason 'ops: retire'\\)"):
        backend.quarantine("fw-n11", CONTEXT)
    node = backend.show("fw-n11")
    assert ("FAIL" in node["flags"], "DRAIN" in node["flags"], node["reason"]) == (True, False, "ops: retire")
    assert backend.held("fw-n11") is True  # out of service: a case on it is not "returned by hand"


@pytest.mark.parametrize("name", ["fw-n1[2-3]", "fw-n12,fw-n13", "ALL", "all", "fw-n12 fw-n13"])
def test_a_name_scontrol_would_take_for_several_nodes_drains_none(slurm, backend, name):
    """A node's name comes from the samples: `fw-n1[2-3]` had drained both nodes."""
    with pytest.raises(BackendError, match="is not one node's name"):
        backend.quarantine(name, CONTEXT)
    assert not any("DRAIN" in backend.show(n)["flags"] for n in ("fw-n12", "fw-n13"))


def test_a_resume_cut_off_between_its_two_steps_is_finished_by_the_next(slurm, backend):
    """A DOWN node's resume is an undrain, then its DOWN reason back: cut off between them, the
    next resume found no drain and left the node with our reason for good."""
    slurm.scontrol("update", "nodename=fw-n16", "state=down", "reason=ops: PSU swap pending")
    backend.quarantine("fw-n16", CONTEXT)
    slurm.scontrol("update", "nodename=fw-n16", "state=undrain")  # (the first step, then the cut)
    backend.resume("fw-n16", CONTEXT)
    node = backend.show("fw-n16")
    assert (node["base"], "DRAIN" in node["flags"], node["reason"]) == ("DOWN", False, "ops: PSU swap pending")


def test_a_quarantine_after_a_resume_cut_off_keeps_the_operators_down_reason(slurm, backend):
    """Cut off after its undrain, the node is DOWN with our reason, which keeps theirs: a new
    quarantine then had drained it with our plain reason, and its resume left theirs lost."""
    slurm.scontrol("update", "nodename=fw-n15", "state=down", "reason=ops: PSU swap pending")
    backend.quarantine("fw-n15", CONTEXT)
    slurm.scontrol("update", "nodename=fw-n15", "state=undrain")  # (the first step, then the cut)
    backend.quarantine("fw-n15", CONTEXT)
    node = backend.show("fw-n15")
    assert ("DRAIN" in node["flags"], node["reason"]) == (True, OURS + "; DOWN before: ops: PSU swap pending")
    backend.resume("fw-n15", CONTEXT)
    node = backend.show("fw-n15")
    assert (node["base"], "DRAIN" in node["flags"], node["reason"]) == ("DOWN", False, "ops: PSU swap pending")


def test_a_drain_slurmctld_applied_after_scontrol_gave_up_is_the_quarantine(slurm, tmp_path):
    """scontrol gives up after its own timeout while a slow slurmctld may still apply the update:
    that drain, ours, had been left with no case to ever resume it."""
    import os
    import stat
    wrapper = tmp_path / "scontrol"
    real = slurm_binary("scontrol")  # an update of fw-n14 lands, of any node its answer is lost
    wrapper.write_text(f'#!/bin/sh\ncase "$1" in update)\n  [ "$2" = nodename=fw-n14 ] && {real} "$@" >/dev/null\n'
                       '  echo "slurm_update error: Socket timed out on send/recv operation" >&2; exit 1;;\nesac\n'
                       f'exec {real} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    slow = Slurm(scontrol=str(wrapper), env={**slurm.env, "PATH": os.environ["PATH"]}, timeout_s=30)
    slow.quarantine("fw-n14", CONTEXT)  # no error: the drain is there, and ours
    assert "DRAIN" in slow.show("fw-n14")["flags"]
    with pytest.raises(BackendError, match="Socket timed out"):  # ... where it is not, the failure stands
        slow.quarantine("fw-n10", CONTEXT)
    assert "DRAIN" not in slow.show("fw-n10")["flags"]


def test_an_operators_own_drain_holds_the_node_and_is_never_taken_over(slurm, backend):
    backend.quarantine("fw-n04", CONTEXT)
    slurm.scontrol("update", "nodename=fw-n04", "state=drain", "reason=ops: reseat the riser")
    assert backend.held("fw-n04") is True  # still out of service: theirs now
    with pytest.raises(BackendError, match="fw-n04 is drained by someone else \\(reason 'ops: reseat the riser'\\)"):
        backend.resume("fw-n04", CONTEXT)
    slurm.scontrol("update", "nodename=fw-n05", "state=drain", "reason=ops: firmware")
    with pytest.raises(BackendError, match="does not take over"):
        backend.quarantine("fw-n05", CONTEXT)
    node = backend.show("fw-n05")
    assert ("DRAIN" in node["flags"], node["reason"]) == (True, "ops: firmware")  # as the operator left it


def test_a_down_node_is_held_even_without_a_drain(backend):
    assert "DRAIN" not in backend.show("fw-n06")["flags"]
    assert backend.held("fw-n06") is True  # DOWN (Reason=test): out of service, not returned to it
    assert backend.drained("fw-n06") is False  # no drain asked


def test_a_node_slurm_does_not_know_is_an_error_naming_it(backend):
    with pytest.raises(BackendError, match="r09-n99.*Node r09-n99 not found.*is r09-n99 a node of this cluster"):
        backend.drained("r09-n99")
    with pytest.raises(BackendError, match="r09-n99"):
        backend.quarantine("r09-n99", CONTEXT)
    assert backend.held("r09-n99") is None  # cannot tell: the caller asks again


def test_a_node_the_samples_name_by_its_full_host_name_is_drained_by_slurms_short_name_where_the_site_says_so(
        slurm, backend, caplog):
    """Slurm's NodeName is usually the short host name; dcgm-exporter and agents often send the
    FQDN. Only with remediate.slurm_short_names is a drain sent by the short name (two domains
    may share one); without it, the error says what Slurm knows and what to set."""
    full = "fw-n09.gpu.example.com"
    with pytest.raises(BackendError, match=r"Node fw-n09.gpu.example.com not found.*Slurm knows its short name "
                                           r"fw-n09; .*set remediate.slurm_short_names = true"):
        backend.quarantine(full, CONTEXT)
    assert "DRAIN" not in backend.show("fw-n09")["flags"]  # nothing done on a guess
    site = Slurm(env=slurm.env, timeout_s=30, short_names=True)
    with caplog.at_level(logging.INFO, "pipeline.remediate"):
        site.quarantine(full, CONTEXT)
        assert site.held(full) is True and site.drained(full) is True
    node = site.show("fw-n09")
    assert ("DRAIN" in node["flags"], node["reason"]) == (True, DOWN_AS_TESTS_START)
    assert [r.getMessage() for r in caplog.records if "short host name" in r.getMessage()] == [
        "remediate: Slurm names node fw-n09.gpu.example.com fw-n09 (its short host name): drained and resumed by "
        "that name"]  # once
    site.resume(full, CONTEXT)
    assert "DRAIN" not in site.show("fw-n09")["flags"]
    with pytest.raises(BackendError, match=r"Slurm knows neither r09-n99.gpu.example.com nor its short name r09-n99 "
                                           r"\(Node r09-n99.gpu.example.com not found; Node r09-n99 not found\)"):
        site.quarantine("r09-n99.gpu.example.com", CONTEXT)


def test_an_update_slurm_refuses_says_what_slurm_said(backend):
    backend.quarantine("fw-n07", CONTEXT)
    with pytest.raises(BackendError, match=r"state=bogus.*fw-n07.*exit 1: .*Invalid.*may this user change nodes"):
        backend._scontrol("fw-n07", "update", "nodename=fw-n07", "state=bogus")


def test_scontrol_missing_or_hung_is_an_error_that_says_what_to_do(tmp_path):
    missing = Slurm(scontrol="/nonexistent/scontrol")
    with pytest.raises(BackendError, match="cannot run '/nonexistent/scontrol' for node r01-n01 .*install Slurm's "
                                           "client \\(Debian: slurm-client\\) or set remediate.scontrol"):
        missing.quarantine("r01-n01", CONTEXT)
    assert missing.held("r01-n01") is None
    hung = tmp_path / "scontrol"
    hung.write_text("#!/bin/sh\nsleep 30\n")
    hung.chmod(0o755)
    began = time.monotonic()
    with pytest.raises(BackendError, match="did not answer within 0.5 s: is slurmctld up"):
        Slurm(scontrol=str(hung), timeout_s=0.5).drained("r01-n01")
    assert time.monotonic() - began < 5


def test_slurm_cannot_act_on_its_own(backend):
    with pytest.raises(Unsupported, match=r"Slurm cannot reset_gpu \(node fw-n08\) on its own: set "
                                          r"remediate.action_command"):
        backend.act("fw-n08", "reset_gpu", CONTEXT)


# ---- Slurm with a real slurmd: a job keeps the node DRAINING ----

def _until(check, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_node_with_a_job_drains_once_the_job_ends_and_resumes_to_idle(tmp_path):
    ctl = Slurmctld({"gpu-a1": "", "gpu-a2": ""}, tmp_path / "slurm", slurmd_node="gpu-a1").start(timeout_s=60)
    try:
        backend = Slurm(env=ctl.env, timeout_s=30)
        assert backend.show("gpu-a1")["base"] == "IDLE" and backend.held("gpu-a1") is False  # in service
        job = subprocess.run([slurm_binary("sbatch"), "--parsable", "-w", "gpu-a1", "-o", "/dev/null",
                              "--wrap", "sleep 300"], env=ctl.env, capture_output=True, text=True, check=True,
                             cwd=tmp_path).stdout.strip()
        _until(lambda: backend.show("gpu-a1")["base"] == "ALLOCATED")  # the scheduler's next pass, ~2 s
        backend.quarantine("gpu-a1", CONTEXT)
        node = backend.show("gpu-a1")
        assert (node["base"], node["flags"]) == ("ALLOCATED", {"DRAIN"})  # draining
        assert backend.drained("gpu-a1") is False and backend.held("gpu-a1") is True
        subprocess.run([slurm_binary("scancel"), job], env=ctl.env, check=True)
        _until(lambda: backend.drained("gpu-a1"))
        node = backend.show("gpu-a1")
        assert (node["base"], node["flags"], node["reason"]) == ("IDLE", {"DRAIN"}, OURS)  # drained
        backend.resume("gpu-a1", CONTEXT)
        assert backend.held("gpu-a1") is False
        _until(lambda: backend.show("gpu-a1")["flags"] == set())  # slurmd answers again: plain IDLE
        assert backend.show("gpu-a1")["base"] == "IDLE"
    finally:
        ctl.close()


# ---- the command backend, with a real script ----

RECORDER = """#!/bin/bash
# Records each call: its arguments (one line, "|"-separated) and its stdin (one line).
printf '%s|' "$@" >> "$REC"; echo >> "$REC"
cat >> "$REC"; echo >> "$REC"
var="EXIT_$2"
echo "$2 says no: step failed on $1" >&2
exit "${!var:-0}"
"""


def recorder(tmp_path: Path, **exits: int) -> tuple[Command, Path]:
    """A Command running RECORDER as `bash SCRIPT` (so: split as a shell would), and its log."""
    script, log = tmp_path / "remediate.sh", tmp_path / "calls.log"
    script.write_text(RECORDER)
    env = {"PATH": os.environ["PATH"], "REC": str(log), **{f"EXIT_{k}": str(v) for k, v in exits.items()}}
    return Command(f"bash {script}", timeout_s=10, env=env), log


def calls(log: Path) -> list[tuple[list[str], dict]]:
    lines = log.read_text().splitlines()
    return [(a[:-1].split("|"), json.loads(s)) for a, s in zip(lines[::2], lines[1::2])]


def test_every_step_calls_the_script_with_node_step_alertname_and_the_case_on_stdin(tmp_path):
    command, log = recorder(tmp_path)
    command.quarantine("r01-n01", CONTEXT)
    assert command.drained("r01-n01") is True
    assert command.held("r01-n01") is True
    command.act("r01-n01", "reset_gpu", CONTEXT)
    command.act("r01-n01", "reboot_node", {**CONTEXT, "remediation": "reboot_node", "step": "not this"})
    command.resume("r01-n01", CONTEXT)
    seen = calls(log)
    assert [argv for argv, _ in seen] == [
        ["r01-n01", "quarantine", "GpuUncorrectableEcc"], ["r01-n01", "drained", ""], ["r01-n01", "held", ""],
        ["r01-n01", "reset_gpu", "GpuUncorrectableEcc"], ["r01-n01", "reboot_node", "GpuUncorrectableEcc"],
        ["r01-n01", "resume", "GpuUncorrectableEcc"]]
    assert seen[0][1] == {**CONTEXT, "node": "r01-n01", "step": "quarantine"}
    assert seen[1][1] == {"node": "r01-n01", "step": "drained"}  # no case to hand
    assert seen[4][1]["step"] == "reboot_node" and seen[4][1]["remediation"] == "reboot_node"


def test_exit_codes_say_yes_no_unsupported_or_failed(tmp_path):
    command, _ = recorder(tmp_path, drained=1, held=1)
    assert command.drained("r01-n01") is False and command.held("r01-n01") is False
    command, _ = recorder(tmp_path, drained=3, held=3, reset_gpu=2, quarantine=5, resume=1)
    with pytest.raises(BackendError, match=r"`bash .*remediate.sh r01-n01 drained` exited with 3 \(0: yes, 1: no\): "
                                           r"drained says no: step failed on r01-n01"):
        command.drained("r01-n01")
    assert command.held("r01-n01") is None
    with pytest.raises(Unsupported, match="cannot do this here: reset_gpu says no"):
        command.act("r01-n01", "reset_gpu", CONTEXT)
    with pytest.raises(BackendError, match=r"exited with 5 \(0: done, 2: unsupported\): quarantine says no") as e:
        command.quarantine("r01-n01", CONTEXT)
    assert not isinstance(e.value, Unsupported) and CONTEXT["summary"] not in str(e.value)  # never the stdin
    with pytest.raises(BackendError, match="exited with 1"):
        command.resume("r01-n01", CONTEXT)
    with pytest.raises(Unsupported, match="'drain_inspect' is not an action"):
        command.act("r01-n01", "drain_inspect", CONTEXT)


def test_a_hung_script_is_stopped_with_its_children(tmp_path):
    script, pid_file = tmp_path / "hang.sh", tmp_path / "child.pid"
    script.write_text(f"#!/bin/bash\nsleep 60 &\necho $! > {pid_file}\nwait\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    began = time.monotonic()
    with pytest.raises(BackendError, match=r"`.*hang.sh r01-n01 quarantine` did not finish within 0.5 s and was "
                                           r"stopped: .*remediate.command_timeout_s"):
        Command(str(script), timeout_s=0.5).quarantine("r01-n01", CONTEXT)
    assert time.monotonic() - began < 5
    child = Path(f"/proc/{pid_file.read_text().strip()}/stat")
    _until(lambda: not child.exists() or child.read_text().split(") ")[1][0] == "Z", 5)  # the sleep too
    with pytest.raises(BackendError, match="cannot run `/nonexistent/remediate r01-n01 resume`.*remediate.command"):
        Command("/nonexistent/remediate").resume("r01-n01", CONTEXT)


def test_slurm_hands_its_actions_to_the_action_command(tmp_path):
    command, log = recorder(tmp_path)
    Slurm(scontrol="/nonexistent/scontrol", actions=command).act("r01-n01", "reboot_node", CONTEXT)
    assert calls(log) == [(["r01-n01", "reboot_node", "GpuUncorrectableEcc"],
                           {**CONTEXT, "node": "r01-n01", "step": "reboot_node"})]


# ---- validation ----

def check_script(tmp_path: Path, body: str) -> str:
    script = tmp_path / "check.sh"
    script.write_text("#!/bin/bash\n" + body)
    return f"bash {script}"


def test_validation_passes_fails_and_times_out_with_a_reason(tmp_path):
    seen = tmp_path / "stdin.json"
    passing = Validation(check_script(tmp_path, f'cat > {seen}\necho "dcgmi diag -r 1 on $1"\necho "8 GPUs pass"\n'),
                         timeout_s=10)
    assert passing.check("r01-n01", CONTEXT) == (True, "8 GPUs pass")
    assert json.loads(seen.read_text()) == {**CONTEXT, "node": "r01-n01"}
    quiet = Validation(check_script(tmp_path, "cat > /dev/null\n"), timeout_s=10)
    assert quiet.check("r01-n01", CONTEXT) == (True, "passed")
    failing = Validation(check_script(tmp_path, 'echo "running"\necho "GPU 3: ECC errors" >&2\nexit 3\n'), 10)
    assert failing.check("r01-n01", CONTEXT) == (False, "exit 3: GPU 3: ECC errors")
    stdout_only = Validation(check_script(tmp_path, 'echo "diag: fail (GPU 1)"\nexit 1\n'), 10)
    assert stdout_only.check("r01-n01", CONTEXT) == (False, "exit 1: diag: fail (GPU 1)")
    hung = Validation(check_script(tmp_path, "sleep 30\n"), timeout_s=0.5)
    assert hung.check("r01-n01", CONTEXT) == (False, "timed out after 0.5 s")
    ok, why = Validation("/nonexistent/check --quick", 10).check("r01-n01", CONTEXT)
    assert not ok and why.startswith("cannot run '/nonexistent/check': No such file or directory"), why


def test_validation_comes_from_the_config():
    assert validation_for(make_config()) is None
    v = validation_for(make_config(remediate={"validate_command": "/opt/site/gpu-check --level 1",
                                              "command_timeout_s": 900}))
    assert isinstance(v, Validation) and v.argv == ["/opt/site/gpu-check", "--level", "1"] and v.timeout_s == 900


# ---- the backend a config names ----

def test_the_backend_comes_from_the_config():
    assert backend_for(make_config()) is None  # "none": dry-run only
    slurm = backend_for(make_config(remediate={"backend": "slurm", "scontrol": "/opt/slurm/bin/scontrol",
                                               "command_timeout_s": 30}))
    assert isinstance(slurm, Slurm) and (slurm.scontrol, slurm.timeout_s, slurm.actions, slurm.short_names) == \
        ("/opt/slurm/bin/scontrol", 30, None, False)
    assert backend_for(make_config(remediate={"backend": "slurm", "slurm_short_names": True})).short_names is True
    slurm = backend_for(make_config(remediate={"backend": "slurm", "action_command": "bash /opt/site/act.sh"}))
    assert isinstance(slurm.actions, Command) and slurm.actions.argv == ["bash", "/opt/site/act.sh"]
    command = backend_for(make_config(remediate={"backend": "command", "command": "/opt/site/remediate"}))
    assert isinstance(command, Command) and command.name == "command" and command.timeout_s == 60
    with pytest.raises(ConfigError, match="remediate.backend = command needs remediate.command: set it"):
        backend_for(make_config(remediate={"backend": "command"}))
    with pytest.raises(ConfigError, match="cannot split 'bash \"/opt/x' into a command"):
        backend_for(make_config(remediate={"backend": "command", "command": 'bash "/opt/x'}))


def test_a_sites_commands_get_the_environment_it_names_never_the_daemons_secrets(tmp_path, monkeypatch):
    """The daemon's environment holds its secrets (a Kafka password, a receiver's token, cloud
    credentials): a remediation script, its validation and scontrol got all of it, and an ssh
    with SendEnv or a script that logs its environment passed them on. They get what
    `remediate.command_env` names."""
    secrets = {"FLEETWATCH_KAFKA__SASL_PASSWORD": "kafka-pw", "WEBHOOK_TOKEN": "hook-token",
               "AWS_SECRET_ACCESS_KEY": "aws-key"}
    for name, value in {**secrets, "LC_ALL": "C.UTF-8", "SITE_RACK_MAP": "/etc/racks"}.items():
        monkeypatch.setenv(name, value)
    dump = tmp_path / "env.txt"
    script = tmp_path / "site.sh"
    script.write_text(f"#!/bin/bash\ncat > /dev/null\nenv > {dump}\n")

    def seen() -> dict[str, str]:
        return dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    command = backend_for(make_config(remediate={"backend": "command", "command": f"bash {script}"}))
    command.quarantine("r01-n01", CONTEXT)
    env = seen()
    assert not set(secrets) & set(env) and env["PATH"] == os.environ["PATH"] and env["LC_ALL"] == "C.UTF-8"
    assert "SITE_RACK_MAP" not in env
    validation = validation_for(make_config(remediate={"validate_command": f"bash {script}",
                                                       "command_env": ["PATH", "SITE_*"]}))
    assert validation.check("r01-n01", CONTEXT)[0]
    env = seen()
    assert not set(secrets) & set(env) and env["SITE_RACK_MAP"] == "/etc/racks" and "LC_ALL" not in env
    slurm = backend_for(make_config(remediate={"backend": "slurm", "action_command": f"bash {script}"}))
    assert slurm.env == slurm.actions.env and not set(secrets) & set(slurm.env) and "PATH" in slurm.env
