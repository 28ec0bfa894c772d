"""Power caps in the simulated fleet behave like the recorded H100's (recordings/h100/README.md):
the power settles under a new limit within ~0.3 s, the clock follows the measured curve with
reason 0x4, the racks and the site meter see the saving, and the work lost is the curve's."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.model import ClockEventReason
from pipeline.power.planner import keep
from pipeline.power.curve import from_recording
from pipeline.sources.simulate import CAP_TAU_S, FleetSimulator
from tests.conftest import make_config

START = datetime(2026, 1, 1, tzinfo=timezone.utc)
CURVE = from_recording()
SW_POWER_CAP = int(ClockEventReason.SW_POWER_CAP)

# sha256 of _digest()'s run, taken with the simulator as it was before caps existed (commit
# bf8153a): with no cap set, every batch must stay bit-identical (`fleetwatch eval` reproducibility).
GOLDEN = "3d1672ca188370849a83e580c073c2e9570b8338766a7e5756b17734c6c3f186"


def quiet(**fleet):
    return make_config(fleet={"fault_interval_s": 0, "gpu_reset_interval_s": 0, **fleet}).fleet


def busy_sim(seed: int = 1, **fleet) -> FleetSimulator:
    """Every GPU runs a full-load compute-bound job (the recorded matmul's) for good (2 racks x 4
    nodes x 8 GPUs unless told)."""
    sim = FleetSimulator(quiet(seed=seed, **{"racks": 2, "nodes_per_rack": 4, **fleet}), start=START, curve=CURVE)
    sim.group_busy[:] = True
    sim.group_intensity[:] = 1.0
    sim.group_sens[:] = 1.0
    sim.group_until[:] = 1e9
    sim._init_thermal_state()
    return sim


def col(tick, name: str) -> np.ndarray:
    return tick.gpu.column(name).to_numpy()


def value(tick, device: str, metric: str) -> float:
    fac = tick.facility.to_pydict()
    return next(v for d, m, v in zip(fac["device"], fac["metric"], fac["value"]) if (d, m) == (device, metric))


# ---- determinism ------------------------------------------------------------------------------

# Columns added after the goldens were taken, null from the simulator: not hashed, so a golden
# still says the simulator's readings are bit-identical (gpu_sample v5's job).
ADDED_SINCE = ("job",)


def _feed(h, batch: pa.RecordBatch | None) -> None:
    if batch is None:
        h.update(b"-")
        return
    for name, c in zip(batch.schema.names, batch.columns):
        if name in ADDED_SINCE:
            assert c.null_count == len(c), name
            continue
        h.update(name.encode())
        if pa.types.is_floating(c.type) or pa.types.is_integer(c.type) or pa.types.is_boolean(c.type) \
                or pa.types.is_timestamp(c.type):
            h.update(np.ascontiguousarray(c.to_numpy(zero_copy_only=False)).tobytes())
        else:
            h.update(repr(c.to_pylist()).encode())


def _digest(sim_class=FleetSimulator, ticks: int = 400) -> str:
    """400 s of a 128-GPU fleet with the scheduler's faults and resets plus the faults that
    change power and clocks (straggler, power brake, thermal slowdown, stuck sensor, ...)."""
    cfg = make_config(fleet={"seed": 11, "racks": 2, "nodes_per_rack": 8, "fault_interval_s": 15,
                             "gpu_reset_interval_s": 120}).fleet
    sim = sim_class(cfg, start=START)
    sim.inject("straggler_gpu", gpu=3)
    sim.inject("hw_power_brake", node=5)
    sim.inject("thermal_runaway", gpu=20, params={"rate_c_per_s": 0.4})
    sim.inject("stuck_power_sensor", gpu=40)
    sim.inject("gpu_fell_off_bus", gpu=50)
    sim.inject("ecc_uncorrectable", gpu=60)
    sim.inject("pdu_overload", rack=1, duration_s=60)  # (a rack fault blocks the scheduler)
    sim.inject("coolant_flow_loss", rack=0, duration_s=90)
    h = hashlib.sha256()
    for _ in range(ticks):
        t = sim.step()
        for batch in (t.gpu, t.facility, t.events, t.labels):
            _feed(h, batch)
    return h.hexdigest()


def test_without_caps_the_batches_are_bit_identical_to_before_caps():
    assert _digest() == GOLDEN


def test_a_cap_at_the_default_limit_changes_nothing():
    cfg = make_config(fleet={"seed": 3, "racks": 2, "nodes_per_rack": 8, "fault_interval_s": 10,
                             "gpu_reset_interval_s": 60}).fleet
    a, b = FleetSimulator(cfg, start=START, curve=CURVE), FleetSimulator(cfg, start=START, curve=CURVE)
    b.set_caps(np.arange(b.n_gpus), cfg.power_limit_w)
    for i in range(300):
        if i == 150:  # and a restore (NaN) is the default too
            b.set_caps(np.arange(0, b.n_gpus, 3), np.nan)
        ta, tb = a.step(), b.step()
        assert ta.gpu.equals(tb.gpu) and ta.facility.equals(tb.facility), i
    assert np.array_equal(a.work_done, b.work_done) and np.array_equal(a.work_done, a.work_uncapped)
    assert a.work_uncapped.sum() > 0


# ---- one GPU ------------------------------------------------------------------------------

def test_a_capped_busy_gpu_holds_the_cap_from_the_next_sample_at_the_curves_clock():
    sim, twin = busy_sim(), busy_sim()
    for _ in range(5):
        sim.step(), twin.step()
    sim.set_caps(np.array([3, 17]), 500.0)
    assert sim.caps[3] == sim.caps[17] == 500.0 and sim.caps[4] == 700.0
    for _ in range(3):
        t, tt = sim.step(), twin.step()
        power, sm, reasons = col(t, "power_w"), col(t, "sm_clock_mhz"), col(t, "clock_event_reasons")
        for g in (3, 17):
            assert 494.0 <= power[g] <= 500.01  # settled within ~0.3 s: the next 1 s sample
            assert sm[g] == pytest.approx(float(CURVE.clock_at(power[g])), abs=0.1)  # ~1153 MHz, as recorded
            assert reasons[g] & SW_POWER_CAP
            assert col(t, "power_limit_w")[g] == 500.0
        others = np.setdiff1d(np.arange(sim.n_gpus), [3, 17])
        assert np.array_equal(power[others], col(tt, "power_w")[others])  # the same draws: the rest unchanged
        assert (col(t, "power_limit_w")[others] == 700.0).all()


def test_the_cap_settles_first_order_in_terms_of_the_sample_interval():
    """At 50 ms samples the settling shows: ~0.4 of the step left after one sample, within 5% by 0.3 s."""
    dt = 0.05
    sim = busy_sim(sample_interval_s=dt)
    for _ in range(5):
        sim.step()
    sim.set_caps(np.array([0]), 500.0)
    seen = [col(sim.step(), "power_w")[0] for _ in range(int(round(1.0 / dt)))]
    for k, p in enumerate(seen, start=1):
        limit = 500.0 + 200.0 * np.exp(-k * dt / CAP_TAU_S)
        assert limit - 6.0 <= p <= limit + 1e-3, (k, p, limit)
    assert seen[0] > 600.0 and seen[int(round(0.3 / dt)) - 1] < 510.0


def test_restoring_returns_the_power_to_demand():
    sim, twin = busy_sim(), busy_sim()
    sim.step(), twin.step()
    sim.set_caps(np.arange(8), 350.0)
    for _ in range(10):
        sim.step(), twin.step()
    sim.set_caps(np.arange(8), np.nan)
    assert (sim.caps == 700.0).all()
    for _ in range(2):  # one sample to settle, the next exactly as if never capped
        t, tt = sim.step(), twin.step()
    for name in ("power_w", "sm_clock_mhz", "clock_event_reasons", "power_limit_w"):
        assert np.array_equal(col(t, name), col(tt, name)), name
    assert (col(t, "power_w")[:8] > 690).all()


def test_an_idle_gpu_under_a_cap_is_unchanged_and_does_no_work():
    sim, twin = busy_sim(), busy_sim()
    for s in (sim, twin):
        s.group_busy[0] = False  # nodes 0-3: idle
    sim.set_caps(np.arange(8), 200.0)
    for _ in range(20):
        t, tt = sim.step(), twin.step()
    for name in ("power_w", "sm_clock_mhz", "clock_event_reasons", "gpu_temp_c"):
        assert np.array_equal(col(t, name)[:8], col(tt, name)[:8]), name
    assert (col(t, "clock_event_reasons")[:8] == int(ClockEventReason.GPU_IDLE)).all()
    assert (col(t, "power_limit_w")[:8] == 200.0).all()
    assert (sim.work_done[:8] == 0).all() and (sim.work_uncapped[:8] == 0).all()


# ---- the facility and the work -----------------------------------------------------------------

def test_rack_pdu_site_meter_and_coolant_follow_the_capped_power():
    sim, twin = busy_sim(), busy_sim()
    for _ in range(5):
        sim.step(), twin.step()
    rack0 = np.flatnonzero(sim.gpu_rack == 0)
    sim.set_caps(rack0, 500.0)
    for _ in range(60):
        t, tt = sim.step(), twin.step()
    saved = col(tt, "power_w")[rack0].sum() - col(t, "power_w")[rack0].sum()
    assert 32 * 190 < saved < 32 * 205  # 32 GPUs from ~698 W to ~498 W
    pdu_drop = value(tt, "pdu-r01", "power_w") - value(t, "pdu-r01", "power_w")
    assert pdu_drop == pytest.approx(saved, rel=0.01)  # (the PDU's own 0.2% noise)
    assert value(t, "pdu-r02", "power_w") == value(tt, "pdu-r02", "power_w")
    meter_drop = value(tt, "meter-main", "power_w") - value(t, "meter-main", "power_w")
    assert meter_drop == pytest.approx(pdu_drop * 1.12, rel=0.001)  # plus the cooling overhead
    # The coolant carries less heat out of the capped rack (its return temperature lags, tau 20 s).
    assert value(t, "cdu-r01", "return_temp_c") < value(tt, "cdu-r01", "return_temp_c") - 0.5
    assert value(t, "cdu-r02", "return_temp_c") == value(tt, "cdu-r02", "return_temp_c")


@pytest.mark.parametrize("cap, kept", [(500.0, 0.84), (350.0, 0.50), (200.0, 0.26)])  # the README's table
def test_the_work_a_full_load_gpu_keeps_under_a_cap_is_the_curves(cap, kept):
    sim = busy_sim()
    sim.set_caps(np.array([5]), cap)
    for _ in range(300):
        sim.step()
    assert sim.work_uncapped[5] == pytest.approx(300.0, rel=0.002)  # GPU-seconds at full load
    assert sim.work_done[5] / sim.work_uncapped[5] == pytest.approx(kept, abs=0.02)
    assert sim.work_done[4] == sim.work_uncapped[4]


def test_out_of_range_caps_raise_and_set_nothing():
    sim = busy_sim()
    for bad in (199.0, 700.5, np.inf, -1.0):
        with pytest.raises(ValueError, match=r"GPU 5 \(r01-n01 gpu 5, GPU-.*\[200, 700\] W"):
            sim.set_caps(np.array([1, 5]), np.array([500.0, bad]))
        assert (sim.caps == 700.0).all()
    with pytest.raises(ValueError, match="out of range"):
        sim.set_caps(np.array([sim.n_gpus]), 500.0)
    sim.set_caps(np.array([1, 5]), np.array([200.0, 700.0]))  # the limits themselves are fine
    assert sim.caps[1] == 200.0 and sim.caps[5] == 700.0


# ---- properties ------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(caps=st.lists(st.one_of(st.just(float("nan")), st.floats(200.0, 700.0)), min_size=64, max_size=64),
       busy=st.lists(st.booleans(), min_size=2, max_size=2), intensity=st.floats(0.35, 1.0),
       seed=st.integers(0, 2**16))
def test_whatever_the_caps_power_holds_under_them_and_work_never_grows(caps, busy, intensity, seed):
    sim, twin = busy_sim(seed, racks=1, nodes_per_rack=8), busy_sim(seed, racks=1, nodes_per_rack=8)
    for s in (sim, twin):
        s.group_busy[:], s.group_intensity[1] = busy, intensity
    cap = np.array(caps)
    sim.set_caps(np.arange(64), cap)
    limit = np.where(np.isnan(cap), 700.0, cap)
    assert np.array_equal(sim.caps, limit)
    for _ in range(3):
        t, tt = sim.step(), twin.step()
    power, free = col(t, "power_w"), col(tt, "power_w")
    assert (power <= limit + 1e-3).all()
    assert (power <= free).all()
    held = power < free
    assert (col(t, "clock_event_reasons")[held] & SW_POWER_CAP).all()
    assert (col(t, "sm_clock_mhz") <= col(tt, "sm_clock_mhz")).all()
    assert np.array_equal(power[~held], free[~held])  # untouched where the cap is above the draw
    assert np.array_equal(col(t, "power_limit_w"), limit)
    assert (sim.work_done <= sim.work_uncapped).all()
    assert np.array_equal(sim.work_uncapped, twin.work_uncapped)
    idle = ~np.repeat(np.array(busy), 32)
    assert (sim.work_done[idle] == 0).all() and np.array_equal(power[idle], free[idle])


# ---- jobs differ: sensitivity -----------------------------------------------------------------

def test_a_memory_bound_job_keeps_more_of_its_work_and_its_memory_traffic_shows_it():
    """Same cap, same power, same clock: the compute-bound job keeps the curve's share of its
    work, the memory-bound one (a fifth of its time on compute) most of it; util_mem falls
    with the work kept, which is what Fleetwatch learns from (power/learn.py)."""
    sim, twin = busy_sim(), busy_sim()
    sim.group_sens[:] = twin.group_sens[:] = [1.0, 0.2]  # nodes 0-3, nodes 4-7
    sim.set_caps(np.arange(64), 350.0)
    for _ in range(60):
        t, tt = sim.step(), twin.step()
    kept = sim.work_done / sim.work_uncapped
    assert kept[:32] == pytest.approx(0.50, abs=0.02)                      # the curve's, as recorded
    assert kept[32:] == pytest.approx(float(keep(0.2, kept[:32].mean())), abs=0.02) and kept[32:].min() > 0.8
    assert np.array_equal(col(t, "sm_clock_mhz")[:32] > 0, col(t, "sm_clock_mhz")[32:] > 0)
    assert abs(np.median(col(t, "sm_clock_mhz")[:32]) - np.median(col(t, "sm_clock_mhz")[32:])) < 20
    mem, free = col(t, "util_mem"), col(tt, "util_mem")
    assert mem[:32] == pytest.approx(free[:32] * 0.5, abs=0.015)
    assert mem[32:] == pytest.approx(free[32:] * kept[32:], abs=0.015)


def test_sensitivities_come_from_their_own_stream():
    """Two seeds' fleets draw the same jobs from the fleet's generator whatever the
    sensitivities are; a seed always gives the same sensitivities."""
    a, b = (FleetSimulator(quiet(seed=5), start=START, curve=CURVE) for _ in range(2))
    assert np.array_equal(a.group_sens, b.group_sens) and np.array_equal(a.group_busy, b.group_busy)
    assert 0.0 < a.group_sens.min() and a.group_sens.max() <= 1.0
    state = a.rng.bit_generator.state
    a._draw_sensitivity(np.ones(4))
    assert a.rng.bit_generator.state == state  # the fleet's own draws are untouched
