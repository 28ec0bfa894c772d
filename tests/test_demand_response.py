"""`fleetwatch eval --power-requests N` in-process (the command: tests/e2e/test_eval.py): issue
15's targets on a short run, and the fair comparison with uniform capping."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.analytics.demand_response import uniform_cap
from pipeline.analytics.evaluate import score, simulate
from tests.conftest import make_config


def test_requests_are_met_by_the_meter_and_by_the_truth_and_capping_raises_no_fault_alert():
    cfg = make_config(fleet={"seed": 1, "fault_interval_s": 300}, power={"default_class": 3})
    with_dr = score(simulate(cfg, 1500, 2))
    without = score(simulate(cfg, 1500, 0))
    dr = with_dr["demand_response"]
    assert dr["requests"] == dr["met"] == 2 and dr["rejected"] == 0
    assert dr["time_to_target_p99_s"] <= 30 and dr["reduction_shortfall_max_pct"] < 2
    assert dr["reduction_true_min_pct"] >= 98          # what the caps really shed, not only what is claimed
    assert dr["restore_over_site_cap"] == 0
    # Measured on the same work model, the same watts each second; two events leave little
    # learned before each (its first caps probe every job), so no gain is asserted here.
    assert 0 < dr["throughput_cost_pct"] <= 1.05 * dr["uniform_cap_cost_pct"]
    # A capped GPU is not a straggler, a power brake or a thermal anomaly.
    assert with_dr["false_alerts_by_alertname"] == without["false_alerts_by_alertname"]
    assert {k: f["detected"] for k, f in with_dr["faults"].items()} == {k: f["detected"] for k, f in
                                                                     without["faults"].items()}


@pytest.mark.parametrize("shed", [0.0, 100.0, 1234.5, 5000.0])
def test_the_uniform_cap_sheds_exactly_the_watts(shed):
    rng = np.random.default_rng(3)
    draw = np.where(rng.random(64) < 0.7, rng.uniform(300, 700, 64), 71.0)
    cap = uniform_cap(draw, shed, 200.0)
    assert np.maximum(draw - cap, 0.0).sum() == pytest.approx(shed, abs=1e-6)
    assert uniform_cap(draw, 1e9, 200.0) == 200.0  # no lower than the minimum limit


def test_on_the_realistic_normal_what_the_meter_credits_is_what_the_caps_shed():
    """Training jobs swing whole racks by tens of kW every 15-45 s, checkpoints stall them,
    inference follows the day: the adjusted baseline credits the caps with what they shed
    by the simulator's truth, not the jobs' own swings (a job's uncapped draw above its cap,
    not its mean: before, the loop measured 90% where the caps shed 150-500% and capped on)."""
    cfg = make_config(fleet={"seed": 1, "fault_interval_s": 0, "normal": "realistic"}, power={"default_class": 3})
    dr = score(simulate(cfg, 1500, 2))["demand_response"]
    assert dr["requests"] == 2 and dr["rejected"] == 0
    # Every minute of each hold as measured within 20% of the target of the same minute by the
    # truth (11.5% here; 89.9% when the reference was the draw's mean). A job that pauses or ends
    # during a hold takes its share with it: on a fleet this small a shortfall can be real, and
    # the truth shows it too.
    assert dr["credit_error_max_pct"] <= 20
    assert 0 < dr["throughput_cost_pct"] <= 1.05 * dr["uniform_cap_cost_pct"]
    # The planner handed the truth each second (20.3% here, uniform 27.3%): the loop, on curves it
    # learned, costs about as little (20.1%; 29.1% when communication phases under a cap were
    # learned as caps that cost nothing). The oracle is the least on the planner's concave model of
    # the curve; the simulator's curve dips under it near 350 W, where a plan can do a little better.
    assert 0 < dr["oracle_cap_cost_pct"] < 0.9 * dr["uniform_cap_cost_pct"]
    assert dr["throughput_cost_pct"] < 1.05 * dr["oracle_cap_cost_pct"]


def test_a_class_is_a_promise_about_work_kept_by_the_truth():
    """Class 1 (a job may lose at most 10% of its work) on the realistic normal: over two hours
    and 8 requests, no GPU loses more of its work over a request than that, by the simulator's
    truth. The learner had taken a training job's communication phases under its cap (at full
    speed, far under it) for a cap that cost nothing, and learned compute-bound jobs as
    memory-bound: 353 GPUs lost more than 10% and the fleet 10.2% of its work over the requests."""
    cfg = make_config(fleet={"seed": 3, "fault_interval_s": 300, "normal": "realistic"}, power={"default_class": 1})
    dr = score(simulate(cfg, 7200, 8))["demand_response"]
    assert dr["requests"] == 8 and dr["met"] >= 1  # (the rest refused: more than class 1 can shed)
    assert dr["class_bound_exceeded"] == 0
    assert 0 < dr["throughput_cost_pct"] < 10


def test_a_gpu_no_agent_reaches_is_no_free_watts_for_uniform_capping_or_the_oracle():
    """A GPU fallen off the bus still draws and does no work. Neither the uniform cap nor the
    oracle can cap it, as the loop cannot: its watts had been free for both (the oracle shed
    300 W there at no cost). It counts as a GPU never capped."""
    from datetime import timedelta

    from pipeline.analytics.demand_response import DemandResponse, _Event
    from pipeline.power.request import PowerRequest
    from pipeline.sources.simulate import FleetSimulator
    cfg = make_config(fleet={"seed": 1, "fault_interval_s": 0, "racks": 1}, power={"default_class": 3})
    sim = FleetSimulator(cfg.fleet)
    lost = 3
    sim.inject("gpu_fell_off_bus", gpu=lost, duration_s=600)
    for _ in range(3):
        sim.step()
    assert sim.unreachable[lost] and sim.power_uncapped[lost] > 500.0  # busy, drawing, doing no work

    def costs(dr: DemandResponse) -> tuple[float, float]:
        e = _Event(0.0, 0.1, 600.0, request=PowerRequest(site=cfg.fleet.site, start=sim.now, duration_s=600,
                                                         reduction_pct=10))
        sim.scrape_shed_j = 300.0 * cfg.fleet.sample_interval_s  # (the caps shed 300 W this scrape)
        dr._truth([e], sim.now + timedelta(seconds=1))
        return e.uniform_lost, e.oracle_lost
    off_the_bus = costs(DemandResponse(cfg, sim, 3600, 1))
    assert off_the_bus[1] > 0
    sim.unreachable[lost] = False
    never_capped = DemandResponse(cfg, sim, 3600, 1)
    never_capped.flex_class[lost] = 0
    never_capped.flexible[lost] = False
    assert off_the_bus == costs(never_capped)
