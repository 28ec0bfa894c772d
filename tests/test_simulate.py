"""The simulated fleet behaves like the recorded H100 and like physics."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import polars as pl
import pytest

from pipeline.model import COOLANT_CP_J_PER_KG_K, ClockEventReason
from pipeline.sources.simulate import LIQUID_FRACTION, FleetSimulator
from tests.conftest import H100, make_config

START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def sim_frames(sim: FleetSimulator, ticks: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    gpu, fac = [], []
    for _ in range(ticks):
        t = sim.step()
        gpu.append(pl.from_arrow(t.gpu))
        fac.append(pl.from_arrow(t.facility))
    return pl.concat(gpu), pl.concat(fac)


def quiet(**fleet):
    return make_config(fleet={"fault_interval_s": 0, "gpu_reset_interval_s": 0, **fleet}).fleet


def test_same_seed_same_fleet_and_different_seed_differs():
    a, b, c = (FleetSimulator(quiet(seed=s), start=START) for s in (7, 7, 8))
    for _ in range(30):
        ta, tb, tc = a.step(), b.step(), c.step()
    assert ta.gpu.equals(tb.gpu) and ta.facility.equals(tb.facility)
    assert not ta.gpu.equals(tc.gpu)


def test_idle_and_busy_gpus_look_like_the_recorded_h100():
    gpu, _ = sim_frames(FleetSimulator(quiet(seed=1), start=START), 120)
    idle = gpu.filter(pl.col("util_gpu") == 0)
    busy = gpu.filter((pl.col("clock_event_reasons") & int(ClockEventReason.SW_POWER_CAP)) != 0)
    assert idle.height > 100 and busy.height > 100
    # Recorded idle: ~71 W, reason 0x1 (GPU idle).
    assert 69 < idle["power_w"].mean() < 73
    assert (idle["clock_event_reasons"] == int(ClockEventReason.GPU_IDLE)).all()
    # Recorded load: pinned just under 700 W, reason 0x4, SM ~1380-1395 MHz.
    assert 693 < busy["power_w"].mean() <= 700 and busy["power_w"].max() <= 700
    assert 1350 <= busy["sm_clock_mhz"].mean() <= 1410
    assert busy["util_gpu"].min() >= 0.99


def test_warm_up_matches_the_recorded_trace():
    """A node whose job starts: GPU 34 -> ~62 C and HBM 36 -> ~54 C over ~25 s, fast then slow,
    like the H100 trace (where about half the rise came within 1.5 s)."""
    trace = [json.loads(line) for line in (H100 / "h100_load_trace.jsonl").read_text().splitlines()]
    t0 = next(r["t"] for r in trace if r["power_mw"] > 300_000)
    rec = {round(r["t"] - t0): r for r in trace if r["t"] >= t0}
    sim = FleetSimulator(quiet(seed=2, racks=1, nodes_per_rack=4), start=START)
    sim.group_busy[:] = False
    sim.group_until[:] = 1e9
    sim._init_thermal_state()
    for _ in range(60):  # settle idle
        sim.step()
    sim.group_busy[:] = True
    sim.group_intensity[:] = 1.0
    temps = [pl.from_arrow(sim.step().gpu).select(pl.col("gpu_temp_c", "mem_temp_c").median()).row(0)
             for _ in range(26)]
    g0 = 34  # the recorded idle temperature
    for sec in (2, 10, 24):
        g_sim, m_sim = temps[sec - 1]
        assert abs(g_sim - rec[sec]["temp_c"]) <= 3, (sec, g_sim, rec[sec]["temp_c"])
        assert abs(m_sim - rec[sec]["fv_82"]) <= 3, (sec, m_sim, rec[sec]["fv_82"])
    assert (temps[1][0] - g0) / (temps[-1][0] - g0) > 0.4  # fast time constant
    assert temps[-1][0] - temps[4][0] >= 4                 # and a slow one


def test_coolant_carries_the_rack_heat_and_site_pue_above_one():
    sim = FleetSimulator(quiet(seed=3), start=START)
    gpu, fac = sim_frames(sim, 300)
    last = fac.filter(pl.col("ts") == pl.col("ts").max())
    point = {(r["device"], r["metric"]): r["value"] for r in last.iter_rows(named=True)}
    for rack in sim.rack_names:
        flow_kg_s = point[(f"cdu-{rack}", "flow_lpm")] / 60.0
        delta_t = point[(f"cdu-{rack}", "return_temp_c")] - point[(f"cdu-{rack}", "supply_temp_c")]
        heat_removed = flow_kg_s * COOLANT_CP_J_PER_KG_K * delta_t
        it_power = point[(f"pdu-{rack}", "power_w")]
        # Return temperature lags load changes (tau 20 s), so allow some slack.
        assert heat_removed == pytest.approx(LIQUID_FRACTION * it_power, rel=0.1)
        assert point[(f"cdu-{rack}", "leak")] == 0
    pdu_total = sum(point[(f"pdu-{r}", "power_w")] for r in sim.rack_names)
    assert point[("meter-main", "power_w")] / pdu_total > 1.05


def test_jobs_start_and_stop_on_groups_of_nodes():
    sim = FleetSimulator(quiet(seed=4), start=START)
    gpu, _ = sim_frames(sim, 1)
    changes = 0
    prev = None
    for _ in range(3600):
        t = sim.step()
        state = tuple(sim.group_busy)
        if prev is not None and state != prev:
            changes += 1
        prev = state
    assert changes >= 3  # jobs came and went within an hour
    per_node = pl.from_arrow(t.gpu).group_by("node").agg((pl.col("util_gpu") > 0).mean().alias("busy"))
    assert set(per_node["busy"].unique().to_list()) <= {0.0, 1.0}  # a job takes all GPUs of its nodes


def test_every_fault_is_labelled_with_its_target_and_window():
    from pipeline.faults import FAULT_TYPES, FAULTS_BY_NAME
    sim = FleetSimulator(make_config(fleet={"fault_interval_s": 20, "gpu_reset_interval_s": 0, "seed": 5}).fleet,
                         start=START)
    labels = []
    for _ in range(20 * 80):
        t = sim.step()
        if t.labels is not None:
            labels += t.labels.to_pylist()
    assert {lab["fault_type"] for lab in labels} == set(FAULT_TYPES)
    for lab in labels:
        assert lab["end"] > lab["start"] and lab["rack"]
        scope = FAULTS_BY_NAME[lab["fault_type"]].scope
        if scope == "rack":
            assert lab["node"] is None and lab["gpu"] is None
        elif scope == "node":
            assert lab["node"] and lab["gpu"] is None
        else:
            assert lab["node"] and lab["gpu"] is not None


def test_fault_effects_show_in_the_telemetry():
    sim = FleetSimulator(quiet(seed=6), start=START)
    sim.step()
    lost = sim.inject("gpu_fell_off_bus", gpu=3, duration_s=60)
    ecc = sim.inject("ecc_uncorrectable", gpu=12, duration_s=60)
    flow = sim.inject("coolant_flow_loss", rack=2, duration_s=60)
    t = sim.step()
    gpu = pl.from_arrow(t.gpu)
    assert sim.gpu_uuids[3] not in gpu["gpu_uuid"].to_list()
    assert gpu.height == sim.n_gpus - 1
    xids = sorted(e["code"] for e in t.events.to_pylist())
    assert 79 in xids and 48 in xids
    row = gpu.filter(pl.col("gpu_uuid") == sim.gpu_uuids[12]).row(0, named=True)
    assert row["ecc_dbe_volatile_total"] >= 1 and (row["remapped_rows_pending"] or row["remapped_rows_failure"])
    fac = pl.from_arrow(t.facility)
    flow_now = fac.filter((pl.col("device") == "cdu-r03") & (pl.col("metric") == "flow_lpm"))["value"][0]
    assert flow_now < 45
    assert lost.fault_id != ecc.fault_id != flow.fault_id


def test_gpu_reset_zeroes_counters_and_skips_one_scrape():
    sim = FleetSimulator(quiet(seed=7), start=START)
    for _ in range(5):
        before = pl.from_arrow(sim.step().gpu).filter(pl.col("gpu_uuid") == sim.gpu_uuids[9]).row(0, named=True)
    sim.inject("gpu_reset", gpu=9)
    during = pl.from_arrow(sim.step().gpu)
    assert sim.gpu_uuids[9] not in during["gpu_uuid"].to_list()
    after = pl.from_arrow(sim.step().gpu).filter(pl.col("gpu_uuid") == sim.gpu_uuids[9]).row(0, named=True)
    assert before["energy_j"] > 1e5 and after["energy_j"] < 2000


def test_a_fleet_scraped_every_30_s_is_the_fleet_read_every_30th_second():
    """The physics steps at most a second whatever the scrape: a slow scrape reads the same
    fleet (faults and jobs included) at fewer instants, and its energy counters still count
    every second between (a meter's energy over a scrape is its mean power, not one instant's)."""
    fast, slow = (FleetSimulator(quiet(seed=3, normal="simple", sample_interval_s=s, fault_interval_s=600), start=START)
                  for s in (1, 30))
    for _ in range(4):
        for _ in range(29):
            fast.step()
        a, b = fast.step(), slow.step()
        assert a.ts == b.ts and a.gpu.equals(b.gpu) and a.facility.equals(b.facility)


def test_a_slow_scrape_s_energy_counters_count_the_seconds_between():
    """Under the realistic normal (training jobs swing the site's power within a scrape), the
    counters a 30-s scrape reads are those a 1-s one reads at the same instant."""
    fast, slow = (FleetSimulator(quiet(seed=3, normal="realistic", sample_interval_s=s), start=START)
                  for s in (1, 30))
    for _ in range(5):
        for _ in range(30):
            fast.step()
        slow.step()
        assert slow.meter_energy == fast.meter_energy
        assert (slow.pdu_energy == fast.pdu_energy).all() and (slow.energy_j == fast.energy_j).all()


def test_a_gpu_reset_costs_one_scrape_at_a_scrape_interval_the_physics_divides_unevenly():
    """2.5-s scrapes step the physics in thirds: their times come from the scrape's count (summed,
    three thirds passed 2.5 by a hair, and a reset meant to last one scrape was missing for two)."""
    sim = FleetSimulator(quiet(seed=2, sample_interval_s=2.5, gpu_reset_interval_s=15), start=START)
    resets = missing = 0
    for _ in range(600):
        tick = sim.step()
        if tick.labels is not None:
            resets += sum(r["fault_type"] == "gpu_reset" for r in tick.labels.to_pylist())
        missing += sim.n_gpus - tick.gpu.num_rows
    assert resets > 50 and missing == resets


def test_a_benchmark_that_needs_only_rows_steps_once_a_scrape():
    """physics_step_s=inf: one physics step per 30-s scrape, its counters counting the scrape's
    instant (bench/archive_compaction.py writes a day of 1,000 nodes this way)."""
    sim = FleetSimulator(quiet(seed=3, sample_interval_s=30), start=START, physics_step_s=float("inf"))
    before = sim.meter_energy
    fac = pl.from_arrow(sim.step().facility).filter((pl.col("device_class") == "meter") & (pl.col("metric") == "power_w"))
    assert sim.t == 30.0 and sim.meter_energy - before == pytest.approx(fac["value"][0] * 30, rel=1e-6)
