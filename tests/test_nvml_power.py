"""Power caps through the NVML agent (sources/nvml_power.py), against the recorded H100
(sources/nvml_replay.py replays the power-cap recording: limits, the setter, and a capped
GPU's power, clock, clock reasons and energy): apply, refuse, restore, and restore at close.

Replayed GPU 3 starts at trace row 168 and GPU 4 at 224: rows 131-376 are the recorded load,
above 520 W, so both run under load for the scrapes of these tests."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import pyarrow as pa
import pytest

from pipeline.power.curve import from_recording
from pipeline.sources.nvml import NvmlAgent
from pipeline.sources.nvml_power import ENFORCE_WAIT_S
from pipeline.sources.nvml_replay import ENFORCE_LAG_S, SW_POWER_CAP, NvmlReplay
from tests.conftest import H100, H200, REPO, make_config
from tests.test_nvml import TRACE

CAPPED, OTHER = 3, 4
CURVE = from_recording(H100)


def opened(replay: NvmlReplay, scrapes: int = 5) -> NvmlAgent:
    a = NvmlAgent(make_config().agent, "node-1")
    a.open()
    for _ in range(scrapes):  # into the recorded load
        a.scrape()
    return a


def rows(batch: pa.RecordBatch) -> dict[int, dict]:
    return {r["gpu"]: r for r in batch.to_pylist()}


def trace_row(replay: NvmlReplay, gpu: int) -> dict:
    return TRACE[replay.gpus[gpu].row % len(TRACE)]


def test_a_cap_holds_the_gpu_to_it_and_its_clock_reason_says_so():
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)  # settled at once: every scrape is capped
    with replay.installed():
        a = opened(replay)
        before = a.scrape()
        r = a.power.apply(CAPPED, 500)
        assert (r.status, r.requested_w, r.enforced_w, r.gpu, r.gpu_uuid) == ("ok", 500.0, 500.0, 3, a.gpus[3].uuid)
        assert a.power.limits(CAPPED) == (200.0, 700.0, 700.0, 500.0) and a.power.capped == {CAPPED: 500.0}
        seen = []
        for _ in range(30):
            s = rows(a.scrape().samples)
            seen.append((s, trace_row(replay, CAPPED), trace_row(replay, OTHER)))
    assert all(x["power_limit_w"] == 700.0 for x in before.samples.to_pylist())
    clock_at_cap = round(float(CURVE.clock_at(500.0)))
    for s, t3, t4 in seen:
        capped, other = s[CAPPED], s[OTHER]
        assert t3["power_mw"] > 520_000  # the recorded load is above the cap ...
        assert capped["power_w"] <= 500.0  # ... and the GPU is held to it
        assert capped["sm_clock_mhz"] == min(t3["sm_mhz"], clock_at_cap) < 1300
        assert capped["clock_event_reasons"] & SW_POWER_CAP and capped["power_limit_w"] == 500.0
        # a GPU without a cap plays the trace as recorded
        assert (other["power_w"], other["sm_clock_mhz"], other["clock_event_reasons"], other["power_limit_w"]) == (
            t4["power_mw"] / 1000, t4["sm_mhz"], t4["throttle"], 700.0)
    # the capped GPU's energy counter rises by 500 W, not by the recorded load's power
    energy = [s[CAPPED]["energy_j"] for s, _, _ in seen]
    recorded = [t3["energy_mj"] / 1000 for _, t3, _ in seen]
    for i in range(1, len(seen)):
        t3 = seen[i][1]
        assert energy[i] - energy[i - 1] == pytest.approx((recorded[i] - recorded[i - 1]) * 500_000 / t3["power_mw"],
                                                          abs=0.003)
    assert energy[-1] - energy[0] < 0.8 * (recorded[-1] - recorded[0])


def test_the_h200_recording_caps_by_its_own_curve():
    """The shipped H200 recording (scripts/gpu-check --record on a real H200) replays its own
    limits and power-cap curve: a 500 W cap holds its load to it at the H200's clock there."""
    replay = NvmlReplay(H200, gpus=8, latency=False, settle_s=0)
    curve = from_recording(H200)
    with replay.installed():
        a = opened(replay)
        r = a.power.apply(CAPPED, 500)
        seen = [(rows(a.scrape().samples)[CAPPED], trace_row(replay, CAPPED)) for _ in range(20)]
        limits = a.power.limits(CAPPED)
    assert (r.status, r.enforced_w) == ("ok", 500.0) and limits[:3] == (200.0, 700.0, 700.0)
    assert all(t["power_mw"] > 520_000 for _, t in seen)  # the recorded load, above the cap ...
    for s, t in seen:  # ... held to it, at the H200's clock for 500 W (1181 MHz, the H100's 1153)
        assert s["model"] == "NVIDIA H200" and s["power_w"] == 500.0
        assert s["sm_clock_mhz"] == min(t["sm_mhz"], round(float(curve.clock_at(500.0))))


def test_restore_puts_the_default_limit_back_and_the_trace_plays_as_recorded():
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    with replay.installed():
        a = opened(replay)
        assert a.power.apply(CAPPED, 350).status == "ok"
        capped = rows(a.scrape().samples)[CAPPED]
        r = a.power.restore(CAPPED)
        assert (r.status, r.requested_w, r.enforced_w) == ("restored", None, 700.0)
        assert a.power.capped == {} and a.power.limits(CAPPED).enforced_w == 700.0
        back = [(rows(a.scrape().samples)[CAPPED], trace_row(replay, CAPPED)) for _ in range(10)]
        assert a.power.restore_all() == []  # nothing capped any more
    assert capped["power_w"] == 350.0 and capped["power_limit_w"] == 350.0
    for s, t in back:
        assert (s["power_w"], s["sm_clock_mhz"], s["clock_event_reasons"], s["power_limit_w"]) == (
            t["power_mw"] / 1000, t["sm_mhz"], t["throttle"], 700.0)


def test_a_new_limit_holds_the_power_only_once_it_has_settled():
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=3600)  # not within this test
    with replay.installed():
        a = opened(replay)
        assert a.power.apply(CAPPED, 500).status == "ok"
        s, t = rows(a.scrape().samples)[CAPPED], trace_row(replay, CAPPED)
    assert s["power_limit_w"] == 500.0  # the enforced limit follows the set within 0.1 s (apply waited) ...
    assert s["power_w"] == t["power_mw"] / 1000 > 500.0  # ... the power not yet


def test_a_gpu_enforces_a_new_limit_a_moment_after_the_set_and_the_readback_waits_for_it():
    """On a real H200 (scripts/gpu-check, 2026-12-04) the enforced limit read back at once after a
    set still said the old one: every cap and restore was reported `error: another limit wins`."""
    import pynvml
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)  # enforce_lag_s: the measured 0.1 s
    with replay.installed():
        a = opened(replay)
        h = a.gpus[OTHER].handle
        pynvml.nvmlDeviceSetPowerManagementLimit(h, 400_000)
        at_once = pynvml.nvmlDeviceGetEnforcedPowerLimit(h)
        capped = a.power.apply(CAPPED, 500)
        restored = a.power.restore(CAPPED)
    assert at_once == 700_000  # the replay answers as the GPU did
    assert (capped.status, capped.enforced_w) == ("ok", 500.0)
    assert (restored.status, restored.enforced_w) == ("restored", 700.0)


def test_the_replays_enforced_limit_lag_and_the_readbacks_wait_are_what_the_gpus_showed():
    """Each set in the power-cap recordings (an H100, two H200 runs): the enforced limit still said
    the old one in the trace row `old_s` after the set began and the new one `new_s` after."""
    old_s, new_s = [], []
    for recording in (H100, H200, REPO / "tests" / "data" / "h200"):
        summary = json.loads(next(recording.glob("*_powercap_summary.json")).read_text())
        trace = [json.loads(x) for x in next(recording.glob("*_powercap_trace.jsonl")).read_text().splitlines()]
        for s in summary["set_log"]:
            after = [r for r in trace if r["t"] >= s["t"]]
            first = next(i for i, r in enumerate(after) if r["enforced_mw"] == s["target_mw"])
            new_s.append(after[first]["t"] - s["t"])
            old_s.append(after[first - 1]["t"] - s["t"] if first else 0.0)
    assert max(old_s) < ENFORCE_LAG_S <= max(new_s)  # the replay's lag: the slowest set's
    assert ENFORCE_WAIT_S >= 4 * max(new_s)  # the readback waits well past it


def test_a_nodes_gpus_are_all_set_before_any_is_read_back_and_one_asked_twice_in_order():
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    order = []
    with replay.installed():
        a = opened(replay)
        for name in ("nvmlDeviceSetPowerManagementLimit", "nvmlDeviceGetEnforcedPowerLimit"):
            def logged(handle, *args, _call=getattr(replay, name), _name=name):
                order.append((_name.removeprefix("nvmlDevice"), next(g.index for g in a.gpus if g.handle == handle)))
                return _call(handle, *args)
            setattr(replay, name, logged)
        with replay.installed():
            together = a.power.set_many([(g, 500.0) for g in range(8)])
            sets = order.index(("GetEnforcedPowerLimit", 0))
            twice = a.power.set_many([(CAPPED, 400.0), (CAPPED, 300.0)])
    assert [r.status for r in together] == ["ok"] * 8
    assert order[:sets] == [("SetPowerManagementLimit", g) for g in range(8)]  # the wait is shared
    assert [(r.status, r.enforced_w) for r in twice] == [("ok", 400.0), ("ok", 300.0)]
    assert a.power.capped[CAPPED] == 300.0


def test_a_gpu_lost_between_its_set_and_its_readback_says_the_limit_was_set():
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    with replay.installed():
        a = opened(replay)
        set_limit = replay.nvmlDeviceSetPowerManagementLimit

        def set_then_lost(handle, limit):
            set_limit(handle, limit)
            replay.lose(CAPPED)
        replay.nvmlDeviceSetPowerManagementLimit = set_then_lost
        with replay.installed():
            r = a.power.apply(CAPPED, 500)
    # Held: a GPU that comes back without a reset still enforces it, and its restore must reach it.
    assert (r.status, r.held) == ("gpu_lost", True) and a.power.capped == {CAPPED: 500.0}
    assert "set to 500 W, then GPU 3 was lost before its readback" in r.detail


def test_a_failure_that_is_not_nvmls_fails_only_its_own_gpu_of_the_batch():
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    with replay.installed():
        a = opened(replay)
        own, enforced = replay.nvmlDeviceGetPowerManagementLimit, replay.nvmlDeviceGetEnforcedPowerLimit

        def surprise(call, gpu):
            def answer(handle):
                if handle == a.gpus[gpu].handle:
                    raise RuntimeError("binding surprise")
                return call(handle)
            return answer
        replay.nvmlDeviceGetPowerManagementLimit = surprise(own, 1)  # before its set
        replay.nvmlDeviceGetEnforcedPowerLimit = surprise(enforced, OTHER)  # after its set
        with replay.installed():
            results = a.power.set_many([(1, 500.0), (CAPPED, 500.0), (OTHER, 500.0)])
    assert [(r.status, r.held) for r in results] == [("error", False), ("ok", True), ("error", True)]
    assert all("RuntimeError" in results[i].detail for i in (0, 2))
    assert a.power.capped == {CAPPED: 500.0, OTHER: 500.0}  # OTHER's cap was set: a restore must reach it


def test_a_limit_the_gpu_never_comes_to_enforce_is_overridden_and_still_held():
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0, enforce_lag_s=3600)
    with replay.installed():
        a = opened(replay)
        r = a.power.apply(CAPPED, 500)
    assert (r.status, r.enforced_w, r.held) == ("error", 700.0, True)  # a restore must still reach it
    assert "enforces 700 W 0.5 s later: another limit wins" in r.detail


@pytest.mark.parametrize("cap_w", [150.0, 701.0, float("nan")])
def test_a_cap_outside_the_constraints_is_refused_and_nothing_changes(cap_w):
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    with replay.installed():
        a = opened(replay)
        r = a.power.apply(CAPPED, cap_w)
        s = rows(a.scrape().samples)[CAPPED]
    assert (r.status, r.enforced_w) == ("out_of_range", None)
    assert "200-700 W" in r.detail and "nothing changed" in r.detail
    assert "nvmlDeviceSetPowerManagementLimit" not in replay.calls  # refused before asking NVML
    assert a.power.capped == {} and s["power_limit_w"] == 700.0 and s["power_w"] > 500.0


def test_the_driver_refusing_a_limit_out_of_range_is_out_of_range_too():
    """The replay answers as the real library does, whatever the limiter checked first."""
    import pynvml
    replay = NvmlReplay(H100, gpus=8, latency=False)
    with replay.installed():
        a = opened(replay)
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            pynvml.nvmlDeviceSetPowerManagementLimit(a.gpus[CAPPED].handle, 150_000)
        a.power._bounds[CAPPED] = (100.0, 700.0, 700.0)  # as if the constraints read had said 100 W
        r = a.power.apply(CAPPED, 150)
    assert r.status == "out_of_range" and "NVMLError_InvalidArgument" in r.detail and a.power.capped == {}


def test_an_agent_without_permission_is_told_to_run_as_root():
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    with replay.installed():
        a = opened(replay)
        replay.deny_caps(CAPPED)
        r = a.power.apply(CAPPED, 500)
        s = rows(a.scrape().samples)[CAPPED]
        other = a.power.apply(OTHER, 500)
    assert (r.status, r.enforced_w) == ("not_permitted", None) and "root" in r.detail
    assert s["power_limit_w"] == 700.0 and s["power_w"] > 500.0
    assert other.status == "ok" and a.power.capped == {OTHER: 500.0}  # only that GPU refuses


def test_a_refused_cap_renewed_again_and_again_is_said_once_until_its_answer_changes(caplog):
    """The power role renews a cap every third of its lease: an unprivileged agent had warned not_permitted for
    each GPU every 20 s. Said once, and again when the answer changes."""
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    with replay.installed(), caplog.at_level("WARNING", logger="pipeline.sources.nvml_power"):
        a = opened(replay)
        replay.deny_caps(CAPPED)
        statuses = [a.power.apply(CAPPED, 500).status for _ in range(6)]
    refused = [r for r in caplog.records if "not_permitted" in r.getMessage()]
    assert statuses == ["not_permitted"] * 6 and len(refused) == 1


def test_a_lost_gpu_is_not_capped():
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    with replay.installed():
        a = opened(replay)
        replay.lose(CAPPED)
        first = a.power.apply(CAPPED, 500)  # NVML says so
        events = a.scrape().events
        calls = dict(replay.calls)
        second = a.power.apply(CAPPED, 500)  # the agent knows it: NVML is not asked
        assert replay.calls == calls
    assert (first.status, second.status) == ("gpu_lost", "gpu_lost") and "GpuFellOffBus" in first.detail
    assert [e["kind"] for e in events] == ["gpu_lost"] and a.power.capped == {}


def test_a_gpu_index_the_agent_does_not_have():
    replay = NvmlReplay(H100, gpus=2, latency=False)
    with replay.installed():
        a = opened(replay, 0)
        r = a.power.apply(7, 500)
    assert r.status == "error" and "no GPU 7" in r.detail and "0, 1" in r.detail


def test_close_restores_every_cap_the_agent_set():
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    with replay.installed():
        a = opened(replay)
        assert [a.power.apply(g, w).status for g, w in ((1, 400), (CAPPED, 500))] == ["ok", "ok"]
        a.close()
    assert [g.limit_mw for g in replay.gpus] == [700_000] * 8 and a.power.capped == {}


def test_through_the_running_agent_caps_run_on_its_nvml_thread_and_close_restores_them():
    """The async face: a cap applied while the agent scrapes (NVML latency on), its samples
    once it has settled, and the cap gone when the agent stops."""
    replay = NvmlReplay(H100, gpus=8)
    samples: list[pa.RecordBatch] = []

    async def main():
        a = NvmlAgent(make_config(agent={"interval_s": 0.05}).agent, "node-1")

        async def publish(batch):
            samples.append(batch)

        async def discard(batch):
            pass
        stop = asyncio.Event()
        task = asyncio.create_task(a.run(publish, discard, stop))

        async def until(condition):
            while not condition():
                assert not task.done(), task.exception()
                await asyncio.sleep(0.01)
        await until(lambda: len(samples) >= 3)
        result = await a.on_nvml_thread(a.power.apply, CAPPED, 500.0)
        await until(lambda: time.monotonic() >= replay.gpus[CAPPED].settles_at)  # the replay's settle, not a guess
        settled = len(samples) + 1  # the scrape in flight may have begun before it
        await until(lambda: len(samples) >= settled + 5)
        stop.set()
        await task
        return a, result, settled
    with replay.installed():
        a, result, settled = asyncio.run(main())
    assert result.status == "ok" and result.enforced_w == 500.0
    after = [rows(b)[CAPPED] for b in samples[settled:]]
    assert all(s["power_w"] <= 500.0 and s["clock_event_reasons"] & SW_POWER_CAP for s in after)
    assert all(s["power_limit_w"] == 500.0 for s in after)
    assert trace_row(replay, CAPPED)["power_mw"] > 520_000  # the load was above the cap throughout
    assert replay.gpus[CAPPED].limit_mw == 700_000 and a.power.capped == {}  # restored when the agent stopped
    assert threading.main_thread().name not in replay.threads
    assert replay.threads == {"nvml-scrape", "nvml-events"}


def test_an_unsupported_power_limit_is_null_and_asked_once():
    replay = NvmlReplay(H100, gpus=8, latency=False)
    replay.inventory["support"]["enforced_power_limit_mw"] = {"ok": False, "value": "NVMLError: Not Supported",
                                                              "us": 5.0}
    with replay.installed():
        a = opened(replay)
        batch = a.scrape().samples
    assert batch.column("power_limit_w").null_count == 8
    assert replay.calls["nvmlDeviceGetEnforcedPowerLimit"] == 8  # once per GPU, then remembered
    assert all(g.unsupported.count("power_limit") == 1 and "power_limit" not in g.calls for g in a.gpus)


def test_a_folder_of_two_recordings_is_a_config_error_that_names_them(tmp_path):
    from pipeline.config import ConfigError
    for prefix in ("h100", "mine"):
        for suffix in ("_inventory.json", "_load_trace.jsonl"):
            shutil.copy(H100 / f"h100{suffix}", tmp_path / f"{prefix}{suffix}")
    with pytest.raises(ConfigError, match=r"several recordings in one directory \(h100_inventory.json, "
                                          r"mine_inventory.json\)"):
        NvmlReplay(tmp_path)


def test_a_recording_without_the_power_cap_files_reads_its_limit_but_sets_none(tmp_path):
    for name in ("h100_inventory.json", "h100_load_trace.jsonl"):
        shutil.copy(H100 / name, tmp_path / name)
    replay = NvmlReplay(tmp_path, gpus=2, latency=False)
    with replay.installed():
        a = opened(replay)
        r = a.power.apply(1, 500)
        batch = a.scrape().samples
    assert r.status == "not_supported" and "cannot be capped" in r.detail
    assert batch.column("power_limit_w").to_pylist() == [700.0, 700.0]


def test_a_cap_never_raises_a_gpu_past_the_limit_its_operator_set_and_restore_goes_back_to_it():
    """A site that runs its GPUs at 600 W (`nvidia-smi -pl 600`): a cap of 500 W holds them
    at 500, a cap of 650 W leaves them at 600, and a restore brings them back to 600, not to
    the 700 W default."""
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    with replay.installed():
        replay.gpus[CAPPED].limit_mw = replay.gpus[CAPPED].old_limit_mw = 600_000  # the operator's policy
        a = opened(replay)
        held = a.power.apply(CAPPED, 500)
        over = a.power.apply(CAPPED, 650)
        assert a.power.capped == {}  # held at its own limit
        back = a.power.restore(CAPPED)  # the end of a request whose last step asked for more than 600 W
        again, back_again = a.power.apply(CAPPED, 450), a.power.restore(CAPPED)
        other = a.power.apply(OTHER, 650), a.power.restore(OTHER)  # a GPU at its default: 650 is a cap
    assert (held.status, held.enforced_w) == ("ok", 500.0)
    assert (over.status, over.enforced_w) == ("ok", 600.0) and "would raise it" in over.detail
    assert (back.status, back.enforced_w) == ("restored", 600.0) and "own limit" in back.detail
    assert [(r.status, r.enforced_w) for r in (again, back_again)] == [("ok", 450.0), ("restored", 600.0)]
    assert [(r.status, r.enforced_w) for r in other] == [("ok", 650.0), ("restored", 700.0)]
    assert replay.gpus[CAPPED].limit_mw == 600_000 and a.power.restore_all() == []


def test_a_limit_its_operator_sets_during_a_cap_is_what_the_restore_leaves(caplog):
    """`nvidia-smi -pl 400` on a GPU a 500 W cap holds (a thermal event, a site's new policy): the end of
    the request had set it back to 700 W, the limit from before the cap. The operator's limit is the GPU's
    own from then on: a later cap is under it and the restore leaves it."""
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    with replay.installed():
        a = opened(replay)
        a.power.apply(CAPPED, 500)
        replay.gpus[CAPPED].limit_mw = 400_000  # the operator, by hand
        renewed = a.power.apply(CAPPED, 500)  # the role's next step: 500 W would raise it
        back = a.power.restore(CAPPED)
    assert (renewed.status, renewed.enforced_w) == ("ok", 400.0)
    assert (back.status, back.enforced_w) == ("restored", 400.0) and replay.gpus[CAPPED].limit_mw == 400_000
    assert "set by its operator since" in caplog.text and a.power.restore_all() == []


def test_a_reset_that_puts_the_default_back_is_no_operators_limit():
    """A GPU reset puts its default limit back and the agent sets its cap again: the 700 W it found then was
    the reset's, not the operator's, and the restore must still go back to the site's 600 W."""
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    with replay.installed():
        replay.gpus[CAPPED].limit_mw = replay.gpus[CAPPED].old_limit_mw = 600_000  # the site's policy
        a = opened(replay)
        a.power.apply(CAPPED, 500)
        replay.gpus[CAPPED].limit_mw = 700_000  # the reset's default
        a._cap_again([CAPPED])
        back = a.power.restore(CAPPED)
    assert (back.status, back.enforced_w) == ("restored", 600.0)


def test_a_restore_of_a_gpu_this_agent_never_capped_leaves_its_operators_limit():
    """A restore that reaches a GPU this agent holds no cap on (an agent started again after
    its ledger's restore, a role's stale view) leaves the site's 600 W as it is, not 700 W."""
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    with replay.installed():
        replay.gpus[CAPPED].limit_mw = replay.gpus[CAPPED].old_limit_mw = 600_000  # the operator's policy
        a = opened(replay)
        r = a.power.restore(CAPPED)
    assert (r.status, r.enforced_w) == ("restored", 600.0) and "not capped by this agent" in r.detail
    assert replay.gpus[CAPPED].limit_mw == 600_000


def test_caps_an_agent_left_when_it_was_killed_are_restored_by_the_next_one(tmp_path):
    """A killed agent cannot restore its caps (close() never runs); its ledger names the own
    limits of the GPUs it held, and the next agent on the node restores them when it starts."""
    ledger_dir = tmp_path / "agent"
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    with replay.installed():
        replay.gpus[1].limit_mw = replay.gpus[1].old_limit_mw = 600_000  # the operator's policy on GPU 1
        killed = NvmlAgent(make_config().agent, "node-1", ledger_dir)
        killed.open()
        assert [killed.power.apply(g, 400).status for g in (1, CAPPED)] == ["ok", "ok"]
        assert [g.limit_mw for g in replay.gpus][:4] == [700_000, 400_000, 700_000, 400_000]
        # SIGKILL: no close(), the caps stay on the GPUs
        nxt = NvmlAgent(make_config().agent, "node-1", ledger_dir)
        nxt.open()
        limits = [g.limit_mw for g in replay.gpus]
        after = nxt.power.apply(CAPPED, 500), nxt.power.restore(CAPPED)
    assert sorted((r.gpu, r.status, r.enforced_w) for r in nxt.recovered) == [(1, "restored", 600.0),
                                                                              (CAPPED, "restored", 700.0)]
    assert limits == [700_000, 600_000] + [700_000] * 6 and nxt.power.capped == {}
    assert [(r.status, r.enforced_w) for r in after] == [("ok", 500.0), ("restored", 700.0)]
    assert json.loads((ledger_dir / "power-limits.json").read_text())["own_w"] == {}  # holds nothing now


def test_without_a_writable_ledger_caps_go_on_and_the_failure_is_said_once(tmp_path, caplog):
    blocked = tmp_path / "agent"
    blocked.write_text("a file where the folder should be")
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    with replay.installed(), caplog.at_level("WARNING"):
        a = NvmlAgent(make_config().agent, "node-1", blocked)
        a.open()
        results = [a.power.apply(g, 500).status for g in (1, 2)] + [a.power.restore(g).status for g in (1, 2)]
    assert results == ["ok", "ok", "restored", "restored"]
    said = [r.getMessage() for r in caplog.records if "ledger" in r.getMessage()]
    assert len(said) == 1 and "cannot be written" in said[0]


def test_a_cap_refused_leaves_nothing_in_the_ledger_and_a_bad_ledger_is_moved_aside(tmp_path, caplog):
    """As the shipped unprivileged agent: every cap not_permitted, nothing held, nothing for the
    next agent to restore. A ledger that is not one is set aside (never overwritten) and the
    agent starts; entries that are not limits are skipped."""
    ledger = tmp_path / "power-limits.json"
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    with replay.installed():
        replay.gpus[CAPPED].caps_denied = True
        a = NvmlAgent(make_config().agent, "node-1", tmp_path)
        a.open()
        assert a.power.apply(CAPPED, 500).status == "not_permitted"
        assert json.loads(ledger.read_text())["own_w"] == {} and a.power.restore_all() == []
        assert NvmlAgent(make_config().agent, "node-1", tmp_path).power.recover() == []
        ledger.write_text("{not json")
        with caplog.at_level("WARNING"):
            b = NvmlAgent(make_config().agent, "node-1", tmp_path)
            b.open()
        assert b.recovered == [] and (tmp_path / "power-limits.unreadable").read_text() == "{not json"
        uuid = [g.uuid for g in replay.gpus]
        replay.gpus[2].limit_mw = 300_000  # left capped by a killed agent
        ledger.write_text(json.dumps({"version": 1, "own_w": {uuid[0]: None, uuid[1]: "x", uuid[2]: 700.0,
                                                              uuid[4]: 700.0, "GPU-gone": 650.0}}))
        c = NvmlAgent(make_config().agent, "node-1", tmp_path)
        c.open()
    assert [(r.gpu, r.status, r.enforced_w) for r in c.recovered] == [(2, "restored", 700.0)]  # GPU 4: at its own
    assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_a_cap_set_but_not_read_back_is_held_so_its_restore_reaches_it():
    """The set succeeded, the readback failed: `error` (not `not_supported`: the GPU was capped),
    and held, so the holder (sources/power_caps.py) restores it when its cap ends."""
    from pipeline.sources.power_caps import CapHolder
    from tests.test_power_caps import caps
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    with replay.installed():
        a = opened(replay)
        replay.inventory["support"]["enforced_power_limit_mw"] = {"ok": False, "value": "NVMLError: Unknown Error",
                                                                  "us": 5.0}
        r = a.power.apply(CAPPED, 500)
        capped = replay.gpus[CAPPED].limit_mw
        holder = CapHolder()
        holder.record([r])
        restore = holder.take(caps([("node-1", r.gpu_uuid, None, 60.0)]), now=0.0)  # the request ended
        back = a.power.restore(CAPPED)
    assert capped == 500_000 and restore == ([r.gpu_uuid], [None])
    assert (r.status, r.enforced_w) == ("error", None) and "could not be read back" in r.detail
    assert replay.gpus[CAPPED].limit_mw == 700_000 and (r.held, back.held) == (True, False)


def test_a_set_that_failed_but_may_have_changed_the_limit_is_held_and_restored_at_close():
    """NVML's unknown error: the limit may be set. Held (and in the ledger), so close() restores it."""
    import pynvml
    replay = NvmlReplay(H100, gpus=8, latency=False, settle_s=0)
    set_limit, failed = replay.nvmlDeviceSetPowerManagementLimit, []

    def flaky(handle, limit):  # sets it, then says it failed (once)
        set_limit(handle, limit)
        if not failed:
            failed.append(limit)
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)
    replay.nvmlDeviceSetPowerManagementLimit = flaky
    with replay.installed():
        a = opened(replay)
        r = a.power.apply(CAPPED, 500)
        capped = replay.gpus[CAPPED].limit_mw
        a.close()
    assert (r.status, capped) == ("error", 500_000)
    assert replay.gpus[CAPPED].limit_mw == 700_000 and r.held
