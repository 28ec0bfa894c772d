"""The realistic normal (fleet.normal = "realistic"): each phenomenon shows in the telemetry,
none is labelled a fault, and the simple normal stays the simulator it was."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import load_config
from pipeline.model import ClockEventReason
from pipeline.sources.simulate import (CHECKPOINT_STALL_S, DRIVER_VERSION, NEW_DRIVER_VERSION, PHENOMENA,
                                       RACK_QUANTA, FleetSimulator)
from tests.conftest import make_config
from tests.test_simulate_caps import _feed

START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def fleet(normal: str = "realistic", **kw):
    return make_config(fleet={"fault_interval_s": 0, "gpu_reset_interval_s": 0, "normal": normal, **kw}).fleet


def all_busy(sim: FleetSimulator) -> FleetSimulator:
    """Every job runs for good (training at the power limit), so that phases show on every GPU."""
    sim.group_busy[:] = True
    sim.group_intensity[:] = 1.0
    sim.group_until[:] = 1e9
    sim.normal.next_maint = float("inf")
    sim._init_thermal_state()
    return sim


def gpu_arrays(sim: FleetSimulator, tick, *names: str) -> list[np.ndarray]:
    """Columns in the simulator's GPU order (NaN where a row is missing)."""
    index = {u: i for i, u in enumerate(sim.gpu_uuids)}
    rows = np.array([index[u] for u in tick.gpu.column("gpu_uuid").to_pylist()], np.int64)
    out = []
    for name in names:
        col = np.full(sim.n_gpus, np.nan)
        col[rows] = tick.gpu.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        out.append(col)
    return out


def point(tick, device: str, metric: str) -> float | None:
    fac = tick.facility.to_pydict()
    return next((v for d, m, v in zip(fac["device"], fac["metric"], fac["value"]) if (d, m) == (device, metric)), None)


# ---- the simple normal is the simulator it was ------------------------------------------------

# sha256 of 600 s of the default 4-rack fleet with faults every 60 s and GPU resets, taken with the
# simulator before the realistic normal existed (commit 1b25327).
SIMPLE_GOLDEN = "ad856727a2d444176a2fe892d5868df31bbf2ff1e6d95b963e04ca3779646939"


def test_the_simple_normal_is_bit_identical_to_the_simulator_before_it():
    cfg = make_config(fleet={"seed": 1, "fault_interval_s": 60, "gpu_reset_interval_s": 120,
                             "normal": "simple"}).fleet
    sim = FleetSimulator(cfg, start=START)
    assert sim.normal is None
    h = hashlib.sha256()
    for _ in range(600):
        t = sim.step()
        for batch in (t.gpu, t.facility, t.events, t.labels):
            _feed(h, batch)
    assert h.hexdigest() == SIMPLE_GOLDEN


def test_realistic_is_the_default_and_phenomena_need_it():
    default = load_config(env={}).fleet  # (make_config pins the simple normal)
    assert default.normal == "realistic" and make_config().fleet.normal == "simple"
    assert FleetSimulator(default, start=START).normal is not None
    with pytest.raises(ValueError, match="realistic normal"):
        FleetSimulator(fleet("simple"), start=START, phenomena=("diurnal",))
    with pytest.raises(ValueError, match="unknown phenomena"):
        FleetSimulator(fleet(), start=START, phenomena=("weather",))


def test_the_same_seed_gives_the_same_realistic_fleet():
    a, b = (FleetSimulator(fleet(seed=3, fault_interval_s=60), start=START) for _ in range(2))
    for _ in range(120):
        ta, tb = a.step(), b.step()
        assert ta.gpu.equals(tb.gpu) and ta.facility.equals(tb.facility)


def test_each_phenomenon_has_its_own_stream():
    """Without dropouts the readings are the same, only none is missing: turning one phenomenon
    off changes nothing else."""
    a = FleetSimulator(fleet(seed=4), start=START)
    b = FleetSimulator(fleet(seed=4), start=START, phenomena=tuple(p for p in PHENOMENA if p != "dropouts"))
    missing = 0
    for _ in range(300):
        ta, tb = a.step(), b.step()
        assert tb.gpu.num_rows == b.n_gpus
        pa_, ua = gpu_arrays(a, ta, "power_w", "util_gpu")
        pb, ub = gpu_arrays(b, tb, "power_w", "util_gpu")
        seen = ~np.isnan(pa_)
        missing += int((~seen).sum())
        assert np.array_equal(pa_[seen], pb[seen]) and np.array_equal(ua[seen], ub[seen])
    assert missing > 0


# ---- jobs -------------------------------------------------------------------------------------

def test_training_jobs_swing_whole_racks_in_lockstep():
    sim = all_busy(FleetSimulator(fleet(seed=1, racks=4), start=START,
                                  phenomena=("training",)))
    nm = sim.normal
    leads = np.flatnonzero(nm.lead)
    spans = {int(j): np.flatnonzero(sim.job_of_group[sim.node_group] == j) for j in leads}
    job, nodes = max(spans.items(), key=lambda kv: kv[1].size)
    assert nodes.size >= 8  # a job of 2-4 groups of 4 nodes
    racks = np.unique(sim.node_rack[nodes])
    power, site, pdu = [], [], {r: [] for r in racks}
    for _ in range(240):
        t = sim.step()
        (p,) = gpu_arrays(sim, t, "power_w")
        power.append(p.reshape(sim.n_nodes, -1)[nodes])
        site.append(point(t, "meter-main", "power_w"))
        for r in racks:
            pdu[r].append(point(t, f"pdu-{sim.rack_names[r]}", "power_w"))
    power = np.array(power)                    # tick x node x GPU
    comm = power < 500
    assert comm.any() and (~comm).any()
    # Every GPU of the job communicates at the same ticks, at 300-450 W, and computes near the limit.
    assert (comm == comm[:, :1, :1]).all()
    assert 280 < power[comm].min() and power[comm].max() < 470
    assert power[~comm].min() > 650
    share = comm[:, 0, 0].mean()
    assert 0.15 < share < 0.4
    # The cycle: tens of seconds.
    starts = np.flatnonzero(np.diff(comm[:, 0, 0].astype(int)) == 1)
    assert 12 <= np.median(np.diff(starts)) <= 50
    # Whole racks and the site swing by tens of kW.
    swing = np.ptp(np.array(site))
    assert swing > 20_000, swing
    for r in racks:
        if (sim.node_rack[nodes] == r).sum() == sim.cfg.nodes_per_rack:
            assert np.ptp(pdu[r]) > 15_000


def test_a_reading_after_a_phase_change_blends_both_phases_and_its_reasons_are_the_instant_s():
    """NVML's power is a mean over the last second and its clock event reasons the instant's; a
    training job's phases change between the simulator's steps. The first reading after a change
    lies between the two phases' draws (by the share of the second each had), with the new
    phase's reasons: computing at the limit (0x4) with part of the communication's draw in it.
    Every other reading is the instant's, as without averaged readings."""
    phases = ("training", "averaged_readings")
    runs = [all_busy(FleetSimulator(fleet(seed=1, racks=2), start=START, phenomena=p)) for p in (phases[:1], phases)]
    instant, averaged, reasons, changed = [], [], [], []
    for _ in range(180):
        ticks = [sim.step() for sim in runs]
        instant.append(gpu_arrays(runs[0], ticks[0], "power_w")[0])
        p, r = gpu_arrays(runs[1], ticks[1], "power_w", "clock_event_reasons")
        averaged.append(p)
        reasons.append(r)
        changed.append(runs[1].normal._phase_changed[runs[1].gpu_job] & runs[1].normal.gpu_training)
    instant, averaged, reasons, changed = map(np.array, (instant, averaged, reasons, changed))
    seen = ~np.isnan(instant) & ~np.isnan(averaged)
    assert np.array_equal(instant[~changed & seen], averaged[~changed & seen])
    into = changed[1:] & (reasons[1:] == int(ClockEventReason.SW_POWER_CAP)) & seen[1:] & seen[:-1]
    assert into.sum() > 100  # (GPUs x changes into compute)
    before, now, read = instant[:-1][into], instant[1:][into], averaged[1:][into]
    assert (now > 650).all() and (before < 470).all()  # computing now, communicating a step before
    assert ((before < read) & (read < now)).mean() > 0.95, "the reading blends both phases"
    share = (now - read) / (now - before)  # the share of the second still communicating
    assert 0.3 < share.mean() < 0.7 and share.min() >= 0 and share.max() <= 1


def test_under_a_cap_the_reading_after_communication_blends_its_memory_traffic_in_too():
    """Capped at 500 W, a job's compute moves less memory than its communication (which the cap
    does not hold): the first reading of compute after it has util_mem between the two phases',
    as its draw is, with the cap's reason (0x4). The power learner must not take it for a cap that
    costs less than it does (power/learn.py)."""
    sim = all_busy(FleetSimulator(fleet(seed=1, racks=2), start=START, phenomena=("training", "averaged_readings")))
    sim.set_caps(np.arange(sim.n_gpus), 500.0)
    train = sim.normal.gpu_training
    power, mem, reasons, changed = [], [], [], []
    for _ in range(180):
        tick = sim.step()
        p, m, r = gpu_arrays(sim, tick, "power_w", "util_mem", "clock_event_reasons")
        power.append(p)
        mem.append(m)
        reasons.append(r)
        changed.append(sim.normal._phase_changed[sim.gpu_job] & train)
    power, mem, reasons, changed = map(np.array, (power, mem, reasons, changed))
    held = reasons == int(ClockEventReason.SW_POWER_CAP)
    steady = held & ~changed & train & ~np.isnan(mem)
    comm = ~held & ~changed & train & (power < 480) & ~np.isnan(mem)
    into = changed & held & ~np.isnan(mem)
    assert steady.sum() > 1000 and comm.sum() > 100 and into.sum() > 50
    held_mem, comm_mem = np.median(mem[steady]), np.median(mem[comm])
    assert held_mem < comm_mem - 0.03  # (the cap costs the compute its memory traffic)
    blended = mem[into]
    assert ((held_mem - 0.01 < blended) & (blended < comm_mem + 0.01)).all()
    assert (blended > held_mem + 0.01).mean() > 0.5  # most carry part of the communication's traffic


def test_checkpoints_stall_a_whole_job_together_and_wait_for_a_fault_to_end():
    sim = all_busy(FleetSimulator(fleet(seed=2), start=START, phenomena=("checkpoints",)))
    nm = sim.normal
    job = int(np.flatnonzero(nm.lead)[0])
    nodes = np.flatnonzero(sim.job_of_group[sim.node_group] == job)
    nm.ckpt_next[job] = 20.0

    def run(ticks):
        util, power, reasons = [], [], []
        for _ in range(ticks):
            u, p, r = gpu_arrays(sim, sim.step(), "util_gpu", "power_w", "clock_event_reasons")
            util.append(u.reshape(sim.n_nodes, -1)[nodes])
            power.append(p.reshape(sim.n_nodes, -1)[nodes])
            reasons.append(r.reshape(sim.n_nodes, -1)[nodes])
        return np.array(util), np.array(power), np.array(reasons)

    util, power, reasons = run(150)
    stalled = (util == 0).all(axis=(1, 2))
    ticks = np.flatnonzero(stalled)
    assert ticks.size and np.array_equal(ticks, np.arange(ticks[0], ticks[-1] + 1))  # one stall
    assert CHECKPOINT_STALL_S[0] - 1 <= ticks.size <= CHECKPOINT_STALL_S[1] + 1
    assert ticks[0] in (19, 20)
    assert not (util == 0).any(axis=(1, 2))[~stalled].any()  # every GPU of the job, or none
    # Utilisation and power drop together: near idle, reason GPU idle, memory held.
    assert power[ticks].max() < 150 and power[ticks].mean() < 110
    assert (reasons[ticks] == int(ClockEventReason.GPU_IDLE)).all()
    assert power[ticks[0] - 1].min() > 650 and power[ticks[-1] + 2].min() > 650
    # The next one 20-60 min on.
    assert 20 * 60 <= nm.ckpt_next[job] - nm.stall_until[job] <= 60 * 60
    # A job with a fault that needs load on one of its nodes checkpoints once the fault is over.
    sim.inject("thermal_runaway", gpu=int(nodes[-1]) * sim.cfg.gpus_per_node, duration_s=60,
               params={"rate_c_per_s": 0.01})
    nm.ckpt_next[job] = sim.t + 10
    util, power, _ = run(150)
    stalled = np.flatnonzero((util == 0).all(axis=(1, 2)))
    assert stalled.size and 60 <= stalled[0] <= 62


@pytest.mark.parametrize("hour", [4, 16])
def test_inference_follows_the_time_of_day(hour):
    """Inference services run day and night: light at 04:00, heavy at 16:00."""
    start = START.replace(hour=hour)
    sim = FleetSimulator(fleet(seed=5), start=start, phenomena=("diurnal",))
    inf = sim.normal.gpu_inference
    assert inf.any()
    util = []
    for _ in range(120):
        (u,) = gpu_arrays(sim, sim.step(), "util_gpu")
        util.append(u[inf])
    util = np.array(util)
    assert (util > 0).all()  # always serving
    mean = util.mean()
    low, high = sim.normal.inf_low, sim.normal.inf_high
    groups = np.flatnonzero(sim.normal.inference)
    expected = (low if hour == 4 else high)[groups].mean()
    assert abs(mean - expected) < 0.1, (mean, expected)
    assert util.std() > 0.02  # noisy


def test_an_inference_service_keeps_what_a_cap_costs_it_through_its_group_s_churn():
    """A service runs day and night: its group's job churn starts no new job on its GPUs, so its
    sensitivity stays (redrawn, its GPUs' job changed under their caps with no idle moment and no
    new job name, and the power loop broke a class's bound learning an old job).
    Training groups still start jobs of their own."""
    sim = FleetSimulator(fleet(seed=5), start=START, phenomena=("diurnal",))
    services = sim.normal.services
    assert services.any() and not services.all()
    before = sim.group_sens.copy()
    started = np.zeros(services.size, bool)
    for _ in range(3 * 3600):
        busy = sim.group_busy.copy()
        sim.step()
        started |= sim.group_busy & ~busy
    assert started[services].any() and started[~services].any()  # churn on both
    assert np.array_equal(sim.group_sens[services], before[services])
    assert not np.array_equal(sim.group_sens[~services & started], before[~services & started])


# ---- maintenance ------------------------------------------------------------------------------

def test_rolling_reboots_are_announced_silent_for_minutes_and_labelled_normal():
    sim = FleetSimulator(fleet(seed=6), start=START, phenomena=("reboots",))
    nm = sim.normal
    nm.next_maint = 1.0  # with the first step
    energy_before = sim.energy_j.copy()
    labels, events, seen = [], [], []
    for i in range(900):
        t = sim.step()
        if t.labels is not None:
            labels += t.labels.to_pylist()
        if t.events is not None:
            events += t.events.to_pylist()
        seen.append(set(t.gpu.column("node").to_pylist()))
        if i == 0:
            nm.next_maint = float("inf")  # one batch
    reboots = [lab for lab in labels if lab["fault_type"] in ("node_reboot", "driver_upgrade")]
    assert 1 <= len(reboots) <= 3 and len({lab["rack"] for lab in reboots}) == 1
    for lab in reboots:
        assert lab["normal"] is True and lab["gpu"] is None and lab["node"]
        p = json.loads(lab["params_json"])
        n = sim.node_names.index(lab["node"])
        # Announced by a node-level event when drained.
        ev = next(e for e in events if e["node"] == lab["node"])
        assert ev["kind"] == lab["fault_type"] and ev["gpu"] is None and ev["gpu_uuid"] is None
        assert ev["ts"] == lab["start"]
        # Silent for down_s after drain_s: a few minutes, then back.
        silent = [i for i, nodes in enumerate(seen) if lab["node"] not in nodes]
        assert 120 <= len(silent) <= 301 and abs(len(silent) - p["down_s"]) <= 1.5
        assert abs(silent[0] - (p["drain_s"] + 1)) <= 1.5
        assert (lab["end"] - lab["start"]).total_seconds() == pytest.approx(p["drain_s"] + p["down_s"] + p["hold_s"])
        gpus = np.flatnonzero(sim.gpu_node == n)
        assert (sim.energy_j[gpus] < energy_before[gpus]).all()  # the counters started over
        drivers = set(t.gpu.filter(pa.compute.equal(t.gpu.column("node"), lab["node"]))
                      .column("driver_version").to_pylist())
        assert drivers == {NEW_DRIVER_VERSION if lab["fault_type"] == "driver_upgrade" else DRIVER_VERSION}


def test_reboots_spare_nodes_with_faults():
    sim = FleetSimulator(fleet(seed=7, racks=1, nodes_per_rack=2), start=START, phenomena=("reboots",))
    sim.inject("straggler_gpu", gpu=1, duration_s=3600)
    sim.inject("pcie_replay_storm", gpu=9, duration_s=3600)
    sim.normal.next_maint = 5.0
    for _ in range(30):
        t = sim.step()
        assert t.labels is None or not any(lab["normal"] for lab in t.labels.to_pylist())
        sim.normal.next_maint = min(sim.normal.next_maint, sim.t + 2)


# ---- how it is reported -----------------------------------------------------------------------

def test_node_clocks_are_skewed_by_up_to_3_s_and_the_bms_by_1_to_2_s():
    sim = FleetSimulator(fleet(seed=8, fault_interval_s=20), start=START, phenomena=("clock_skew",))
    offsets: dict[str, set] = {}
    for _ in range(60):
        t = sim.step()
        true_ns = int(t.ts.timestamp() * 1e9)
        ts = t.gpu.column("ts").cast(pa.int64()).to_numpy()
        for node, off in zip(t.gpu.column("node").to_pylist(), ts - true_ns):
            offsets.setdefault(node, set()).add(int(off))
        fac = set((t.facility.column("ts").cast(pa.int64()).to_numpy() - true_ns).tolist())
        assert len(fac) == 1 and 1e9 <= abs(fac.pop()) <= 2e9
        for e in (t.events.to_pylist() if t.events is not None else []):
            assert (e["ts"] - t.ts).total_seconds() == pytest.approx(sim.normal.node_skew_s[sim.node_names.index(e["node"])])
    assert len(offsets) == sim.n_nodes
    assert all(len(o) == 1 for o in offsets.values())  # one fixed offset per node, all its GPUs
    skew = np.array([o.pop() for o in offsets.values()]) / 1e9
    assert np.abs(skew).max() <= 3.0 and np.ptp(skew) > 2.0


def test_the_bms_reports_at_its_resolution_and_gpu_power_in_watts():
    sim = FleetSimulator(fleet(seed=9), start=START, phenomena=("noise", "quantization", "power_quantization"))
    for _ in range(30):
        t = sim.step()
        fac = t.facility.to_pydict()
        per_rack = np.array([v for d, v in zip(fac["device"], fac["value"]) if d != "meter-main"]).reshape(sim.n_racks, -1)
        ratio = per_rack / RACK_QUANTA
        assert np.allclose(ratio, np.round(ratio), atol=1e-6)
        site, energy = (v for d, v in zip(fac["device"], fac["value"]) if d == "meter-main")
        assert site % 100 == 0 and energy % 3600 == 0
        power = t.gpu.column("power_w").to_numpy()
        assert np.array_equal(power, np.round(power))


def test_dropouts_are_rare_and_short():
    sim = FleetSimulator(fleet(seed=10), start=START, phenomena=("dropouts",))
    gaps = np.zeros(sim.n_gpus, int)
    longest, rows, points = 0, 0, 0
    for _ in range(2000):
        t = sim.step()
        (p,) = gpu_arrays(sim, t, "power_w")
        gaps = np.where(np.isnan(p), gaps + 1, 0)
        longest = max(longest, int(gaps.max()))
        rows += t.gpu.num_rows
        points += t.facility.num_rows
    gpu_missing = 1 - rows / (2000 * sim.n_gpus)
    fac_missing = 1 - points / (2000 * (8 * sim.n_racks + 2))
    assert 0.0003 < gpu_missing < 0.003 and 0.0002 < fac_missing < 0.003
    assert longest <= 2  # never long enough for GpuNotReporting (3 intervals + 5 s) or NodeNotReporting


def test_a_recalibrated_temperature_sensor_steps_and_stays():
    sim = FleetSimulator(fleet(seed=11), start=START, phenomena=("recalibration",))
    nm = sim.normal
    for _ in range(100):
        sim.step()
    before = nm.offset.copy()
    nm.next_recal[:] = np.inf
    nm.next_recal[1, 2] = sim.t + 1  # the return sensor of rack 3
    for _ in range(5):
        sim.step()
    step = nm.offset - before
    assert 0.2 <= abs(step[1, 2]) <= 0.5
    assert np.count_nonzero(step) == 1
    for _ in range(300):
        sim.step()
    assert np.array_equal(nm.offset, before + step)  # stays
    # The reading carries it: return - true return temperature.
    t = sim.step()
    assert point(t, "cdu-r03", "return_temp_c") == pytest.approx(sim.return_temp[2] + nm.offset[1, 2], abs=1e-3)


def test_a_gpu_s_temperature_rise_per_watt_is_its_own():
    """thermal_spread: each GPU's rise per watt is its model's times N(1, 5%), so its excess
    over its siblings grows with its power (the drift detector's baseline learns that)."""
    sim = FleetSimulator(fleet(seed=12), start=START, phenomena=("thermal_spread",))
    spread = sim.normal.k_spread
    assert 0.03 < spread.std() < 0.07 and abs(spread.mean() - 1.0) < 0.02
    assert np.array_equal(FleetSimulator(fleet(seed=12), start=START, phenomena=()).normal.k_spread,
                          np.ones(sim.n_gpus))

    def excess_at(intensity: float) -> np.ndarray:
        all_busy(sim)
        sim.group_intensity[:] = intensity
        sim._init_thermal_state()
        for _ in range(60):
            temp, power = gpu_arrays(sim, sim.step(), "gpu_temp_c", "power_w")
        return temp - np.median(temp.reshape(-1, 8), axis=1).repeat(8), power
    (light, p_light), (heavy, p_heavy) = excess_at(0.3), excess_at(1.0)
    gain = np.polyfit(spread * (p_heavy - p_light), heavy - light, 1)[0]
    assert 0.03 < gain < 0.05  # the model's rise per watt (0.039 C/W) times each GPU's own spread
