"""Learning each GPU's power -> throughput curve from its samples (issue 15, item 2): a job's
sensitivity (its compute-bound share) from util_mem and power under a cap, never from the
simulator's hidden truth."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.power.curve import from_recording
from pipeline.power.learn import MIN_REF_S, PRIOR_WEIGHT, CurveLearner
from pipeline.power.planner import keep
from tests.test_simulate_caps import busy_sim, col

CURVE = from_recording()


def feed(learner: CurveLearner, tick) -> None:
    n = tick.gpu.num_rows
    learner.observe(np.arange(n), col(tick, "power_w"), col(tick, "util_gpu"), col(tick, "util_mem"),
                    col(tick, "power_limit_w"), 700.0)


def test_from_the_simulators_samples_each_job_s_sensitivity_is_learned():
    """Two jobs of known sensitivity (8 nodes of 8 GPUs, a job per 4 nodes):
    uncapped for 20 s, then capped for 20 s to 500 and 400 W; the learner sees only samples."""
    sim = busy_sim(racks=1, nodes_per_rack=8)
    truth = np.array([1.0, 0.3])
    sim.group_sens[:] = truth
    learner = CurveLearner(CURVE)
    for _ in range(20):
        feed(learner, sim.step())
    assert np.all(learner.sensitivity() == 1.0)  # nothing capped yet: the recorded curve's
    sim.set_caps(np.arange(64), np.where(np.arange(64) % 2 == 0, 500.0, 400.0))
    for _ in range(20):
        feed(learner, sim.step())
    s = learner.sensitivity()
    want = np.repeat(truth, 32)
    assert np.abs(s - want).max() < 0.1, (s.reshape(2, 32).mean(axis=1), truth)
    assert np.all(learner.upper() >= s) and np.mean(learner.upper() >= want - 0.02) > 0.9


def test_an_idle_gpu_forgets_its_job():
    sim = busy_sim(racks=1, nodes_per_rack=4)
    sim.group_sens[:] = 0.2
    learner = CurveLearner(CURVE)
    for _ in range(10):
        feed(learner, sim.step())
    sim.set_caps(np.arange(32), 450.0)
    for _ in range(10):
        feed(learner, sim.step())
    assert np.all(learner.sensitivity() < 0.4)
    sim.group_busy[:] = False  # the job ends; the next one is another's
    feed(learner, sim.step())
    assert np.all(learner.sensitivity() == 1.0) and np.all(learner.ref_n == 0)


def test_a_job_that_starts_under_a_cap_has_no_reference_and_stays_at_the_recorded_curve():
    sim = busy_sim(racks=1, nodes_per_rack=4)
    sim.group_sens[:] = 0.2
    sim.set_caps(np.arange(32), 400.0)
    learner = CurveLearner(CURVE)
    for _ in range(30):
        feed(learner, sim.step())
    assert np.all(learner.ref_n == 0) and np.all(learner.sensitivity() == 1.0)


@settings(max_examples=100, deadline=None)
@given(st.floats(0, 1), st.lists(st.floats(250, 650), min_size=1, max_size=30), st.floats(500, 698))
def test_exact_samples_give_the_least_squares_slope_with_the_prior(s, capped_w, ref_w):
    """Samples on the model itself (no rounding): the fit is (prior + sum xy) / (prior + sum xx)."""
    learner = CurveLearner(CURVE)
    one = np.array([0])
    for _ in range(int(MIN_REF_S)):  # (1 s apart)
        learner.observe(one, np.array([ref_w]), np.array([1.0]), np.array([0.34]), np.array([700.0]), 700.0)
    xs = []
    for p in capped_w:
        if p >= 0.97 * ref_w:
            continue  # not held by the cap: nothing to learn
        r = float(CURVE.at(p) / CURVE.at(ref_w))
        mem = 0.34 * float(keep(s, r))
        learner.observe(one, np.array([p]), np.array([1.0]), np.array([mem]), np.array([p + 1.0]), 700.0,
                        dt_s=30.0)  # (read 30 s apart: each reading a point by itself)
        xs.append(1.0 / r - 1.0)
    sxx = float(np.sum(np.square(xs)))
    # (the draw's distribution is kept in float32: its mean is exact to about 1e-7)
    assert learner.sensitivity()[0] == pytest.approx((PRIOR_WEIGHT + s * sxx) / (PRIOR_WEIGHT + sxx), abs=1e-5)
    assert learner.points[0] == len(xs)


def test_a_swinging_job_s_demand_is_its_compute_phase_draw_and_a_cap_does_not_lower_it():
    """A training job in lockstep: 700 W while it computes, 400 W while its GPUs communicate
    (a third of each 30 s step). Its demand is the compute phase's draw, not the mean or the
    last sample; under a 500 W cap its communication phases (drawn under the cap) leave the
    reference as it was, and what the cap holds it from is still 700 W."""
    learner = CurveLearner(CURVE)
    one = np.array([0])

    def second(t: int, cap_w: float) -> None:
        draw = 400.0 if t % 30 < 10 else 700.0
        power = min(draw, cap_w - 1.5)
        learner.observe(one, np.array([power]), np.array([1.0]), np.array([0.34]), np.array([cap_w]), 700.0)
    for t in range(300):
        second(t, 700.0)
    assert learner.demand()[0] == pytest.approx(698.5, abs=1.0)
    assert learner.demand_above(one, np.array([498.5]))[0] == pytest.approx(698.5, abs=1.0)
    assert learner.demand_above(one, np.array([350.0]))[0] == pytest.approx(600, abs=20)  # both phases
    for t in range(300, 900):
        second(t, 500.0)
    assert learner.demand()[0] == pytest.approx(698.5, abs=1.0)
    assert learner.demand_above(one, np.array([498.5]))[0] == pytest.approx(698.5, abs=1.0)
    # Never drawn this high: nothing known to credit, the level itself.
    assert learner.demand_above(one, np.array([720.0]))[0] == 720.0


@pytest.mark.parametrize("s", [0.95, 0.3])
def test_a_training_job_s_communication_under_its_cap_is_no_point_on_its_curve(s):
    """A training job in lockstep, capped at 500 W: it computes at the cap, losing work by its
    sensitivity, and communicates a third of each 30 s step at 400 W, under the cap, at full
    speed, moving less memory. Only the samples the cap holds are points, set against the
    memory its compute phases moved uncapped: before, the communication's counted as a cap that
    cost nothing, and a job of s 0.97 was learned at 0.17 (the planner then took it for
    memory-bound, capped it deepest and could break its class's bound)."""
    learner = CurveLearner(CURVE)
    one = np.array([0])
    r = float(CURVE.at(498.5) / CURVE.at(698.5))

    def second(t: int, cap_w: float) -> None:
        computing = t % 30 >= 10
        power = min(698.5 if computing else 400.0, cap_w - 1.5)
        # (communicating, its GPUs move less of their own memory: the reference is the compute phase's)
        mem = 0.34 * (float(keep(s, r)) if cap_w < 700 else 1.0) if computing else 0.15
        learner.observe(one, np.array([power]), np.array([1.0]), np.array([mem]), np.array([cap_w]), 700.0)
    for t in range(300):
        second(t, 700.0)
    for t in range(300, 900):
        second(t, 500.0)
    assert learner.sensitivity()[0] == pytest.approx(s, abs=0.02)
    assert learner.points[0] == pytest.approx(380, abs=1)  # the compute seconds only, but each phase's first


def test_a_load_that_steps_up_is_a_new_reference_for_its_memory_traffic_too():
    """A job at half load (470 W, util_mem 17%) steps up to the limit (700 W, 34%), then is
    capped at 500 W. Its memory traffic under the cap is set against the new level, not a blend
    of both (with it, the cap's samples moved more memory than the reference: s 0.07 for 0.2)."""
    s = 0.2
    learner = CurveLearner(CURVE)
    one = np.array([0])

    def second(power: float, mem: float, cap_w: float = 700.0) -> None:
        learner.observe(one, np.array([power]), np.array([1.0]), np.array([mem]), np.array([cap_w]), 700.0)
    for _ in range(300):
        second(470.0, 0.17)
    for _ in range(60):
        second(698.5, 0.34)
    r = float(CURVE.at(498.5) / CURVE.at(698.5))
    for _ in range(120):
        second(498.5, round(0.34 * float(keep(s, r)), 2), 500.0)
    assert learner.sensitivity()[0] == pytest.approx(s, abs=0.05)


def test_a_job_that_pauses_keeps_what_was_learned_and_one_that_ends_forgets_it():
    """A checkpoint stalls a training job for tens of seconds (idle, its memory held): the
    same job resumes. A job that ends frees its memory: the next one is another's."""
    learner = CurveLearner(CURVE)
    one = np.array([0])

    def sample(power, util, paused=False):
        learner.observe(one, np.array([power]), np.array([util]), np.array([0.34 * util]), np.array([700.0]), 700.0,
                        np.array([paused]))
    for _ in range(20):
        sample(690.0, 1.0)
    for _ in range(60):
        sample(90.0, 0.0, paused=True)
    assert learner.ref_n[0] == 20 and learner.demand()[0] == pytest.approx(690.0, abs=0.01)
    sample(90.0, 0.0, paused=False)
    assert learner.ref_n[0] == 0 and learner.demand()[0] == 0.0


def test_a_1000_w_gpus_draw_is_binned_on_its_own_scale_and_a_cap_credits_what_it_would_draw():
    """A B200 at its own 1,000 W: its draw's distribution reaches its limit (on the H100's 770 W
    bins everything above was one bin, and a cap at 900 W was credited nothing), and a cap's
    rate is read off the curve stretched to it (700 W is the H100's 490 W)."""
    learner = CurveLearner(CURVE)
    one = np.array([0])
    for t in range(200):
        draw = 600.0 if t % 30 < 10 else 990.0  # a training job's two phases
        learner.observe(one, np.array([draw]), np.array([1.0]), np.array([0.34]), np.array([1000.0]), 1000.0)
    assert learner.demand()[0] == pytest.approx(990.0, abs=2.0)
    assert learner.demand_above(one, np.array([900.0]))[0] == pytest.approx(990.0, abs=2.0)
    r = float(CURVE.at(0.7 * 698.0) / CURVE.at(0.7 * 990.0))
    for _ in range(60):  # held at 700 W, keeping the Amdahl share of a job of s = 0.5
        learner.observe(one, np.array([698.0]), np.array([1.0]), np.array([0.34 * float(keep(0.5, r))]),
                        np.array([700.0]), 1000.0)
    assert learner.sensitivity()[0] == pytest.approx(0.5, abs=0.05)


@settings(max_examples=60, deadline=None)
@given(st.floats(250, 350), st.floats(0.5, 0.9), st.floats(460, 650), st.floats(0, 1))
def test_over_a_30_s_scrape_a_swinging_job_s_shed_follows_the_share_of_it_at_the_cap(low_w, duty, cap_w, share):
    """A training job that draws 700 W while it computes and `low_w` while it communicates
    (`duty` of the time computing, uncapped). Scraped every 30 s, a scrape may hold more or
    fewer of its phases: its energy counter's mean tells how many, and what the cap took over it
    is the share at the cap times its draw above the cap (an instant had told only the phase it
    caught). Within 8% of the draw above the cap: the regression is shrunk by the scrape mean's
    noise (SHED_NOISE_W), up to 6% at a job 90% computing (it had been held to 5%, which hypothesis
    found a case of once)."""
    learner = CurveLearner(CURVE)
    one = np.array([0])
    for t in range(200):  # the uncapped reference, a second at a time
        draw = 700.0 if (t % 20) < 20 * duty else low_w
        learner.observe(one, np.array([draw]), np.array([1.0]), np.array([0.34]), np.array([700.0]), 700.0)
    mean_w = share * cap_w + (1 - share) * low_w  # the scrape's: `share` of it computing, held at the cap
    shed = learner.shed_over(one, np.array([cap_w]), np.array([mean_w]))[0]
    assert shed == pytest.approx(share * (700.0 - cap_w), abs=0.08 * (700.0 - cap_w) + 2.0)
    assert learner.shed_over(one, np.array([cap_w]), np.array([low_w]))[0] < 0.08 * (700.0 - cap_w) + 2.0


def test_a_steady_job_s_scrape_at_idle_sheds_nothing_and_never_more_than_its_draw_above_the_cap():
    """A steady job's reference (700 W, always) says nothing of a scrape it stalled in: the cap
    held it at most the share of the scrape its mean is above idle, and nothing where its readings
    show its load fell under the cap."""
    learner = CurveLearner(CURVE)
    one = np.array([0, 0])
    for _ in range(60):
        learner.observe(one[:1], np.array([699.0]), np.array([1.0]), np.array([0.34]), np.array([700.0]), 700.0)
    shed = learner.shed_over(one, np.array([500.0, 500.0]), np.array([80.0, 500.0]))
    assert shed[0] < 5.0 and shed[1] == pytest.approx(199.0, abs=2.0)
    assert learner.shed_over(one[:1], np.array([720.0]), np.array([700.0]))[0] == 0.0  # (never drawn that high)
    # Its load fell under the cap (read under it at both ends of the scrape): nothing; a mean over the
    # cap (the cap not applied yet): nothing.
    fell = learner.shed_over(one, np.array([500.0, 500.0]), np.array([480.0, 480.0]), np.array([False, True]))
    assert fell[0] == 0.0 and fell[1] > 150.0
    assert learner.shed_over(one[:1], np.array([500.0]), np.array([690.0]))[0] == 0.0


def aliased(low_w: float, duty: float, read_computing: float) -> tuple[CurveLearner, float]:
    """A training job (700 W computing `duty` of its step, `low_w` communicating) scraped every
    30 s, its step near a multiple of the scrape: its readings catch it computing in only
    `read_computing` of the scrapes (0: always communicating), while its energy counter's mean
    holds both phases. Returns the learner and that mean."""
    learner = CurveLearner(CURVE)
    one = np.array([0])
    level_w = duty * 700.0 + (1 - duty) * low_w
    for i in range(30):
        computing = (i + 0.5) * read_computing % 1.0 < read_computing
        learner.observe(one, np.array([700.0 if computing else low_w]), np.array([1.0]), np.array([0.34]),
                        np.array([700.0]), 700.0, dt_s=30.0, mean_w=np.array([level_w]))
    return learner, level_w


def test_read_in_one_phase_at_30_s_a_job_is_credited_by_its_energy_counter():
    """Seen only communicating (330 W) but drawing 589 W on average, a job held at 280 W sheds
    what its level says, not the 50 W over the cap its readings showed, and the planner takes it
    at that level all the time. Seen computing in 1 scrape of 10, its readings are weighed to its
    level: a cap at 500 W is credited the 140 W it sheds (the readings said 20). Seen only
    computing, the cap is credited its level less the scrape's mean, 140 W too (the readings said
    200 W)."""
    one = np.array([0])
    learner, level_w = aliased(330.0, 0.7, 0.0)
    assert learner.shed_over(one, np.array([280.0]), np.array([278.0]))[0] == pytest.approx(level_w - 280.0, rel=0.02)
    assert learner.demand()[0] == pytest.approx(level_w, abs=1.0)
    assert learner.duty(learner.demand(), 700.0)[0] == 1.0
    capped_mean = 0.7 * 498.0 + 0.3 * 330.0
    learner, _ = aliased(330.0, 0.7, 0.1)
    assert learner.shed_over(one, np.array([500.0]), np.array([capped_mean]))[0] == pytest.approx(140.0, rel=0.05)
    assert learner.demand()[0] == pytest.approx(700.0, abs=6.0)
    assert learner.duty(learner.demand(), 700.0)[0] == pytest.approx(0.7, abs=0.02)
    learner, level_w = aliased(330.0, 0.7, 1.0)
    shed = learner.shed_over(one, np.array([500.0]), np.array([capped_mean]))[0]
    assert shed == pytest.approx(140.0, rel=0.05)


def chord_w(level_w: float, cap_w: float) -> float:
    """The most a cap can take on average from a draw of mean `level_w` between idle (70 W) and
    700 W: max(X - cap, 0) is convex in X, so under the chord between those ends."""
    return (level_w - 70.0) * max(700.0 - cap_w, 0.0) / 630.0


@settings(max_examples=80, deadline=None)
@given(st.floats(250, 450), st.floats(0.5, 0.9), st.floats(220, 650), st.floats(0.0, 1.0))
def test_whatever_phases_its_readings_caught_a_cap_is_never_credited_more_than_it_shed(low_w, duty, cap_w, share):
    """Whatever share of a 30-s scrape's readings caught a two-level job computing, a cap over a
    scrape held like the job's average is never credited more than it shed (the readings had said
    up to 430 W over it), nor than any draw of the counter's mean could shed (the chord), and
    exactly what it shed unless the readings all caught the job communicating over the cap."""
    learner, level_w = aliased(low_w, duty, share)
    mean_w = duty * min(700.0, cap_w) + (1 - duty) * min(low_w, cap_w)
    shed = learner.shed_over(np.array([0]), np.array([cap_w]), np.array([mean_w]))[0]
    true_w = duty * max(700.0 - cap_w, 0.0) + (1 - duty) * max(low_w - cap_w, 0.0)
    assert 0.0 <= shed <= min(true_w + 3.0, chord_w(level_w, cap_w) + 1.0)
    readings_w = np.sum(learner.draw_w[0]) / np.sum(learner.draw[0])
    if readings_w > level_w or np.count_nonzero(learner.draw[0]) >= 2 or cap_w < low_w:
        assert shed == pytest.approx(true_w, rel=0.05, abs=3.0)


def test_a_job_s_level_is_its_own_and_fades_when_its_counter_stops():
    """The scrape across two jobs (the samples name the next) is neither's, and a level whose means
    stop coming (the fleet read every second again, a counter no longer trusted) fades with the
    readings: a job that then fell to 300 W is not taken at its old 690 W."""
    learner = CurveLearner(CURVE)
    one = np.array([0])

    def read(power_w, mean_w, new_job=False, n=1, dt_s=30.0):
        for _ in range(n):
            learner.observe(one, np.array([power_w]), np.array([1.0]), np.array([0.34]), np.array([700.0]), 700.0,
                            new_job=np.array([new_job]), dt_s=dt_s, mean_w=np.array([mean_w]))
    read(690.0, 690.0, n=20)
    assert learner.level_w(one)[0] == pytest.approx(690.0)
    read(300.0, 600.0, new_job=True)  # (its scrape: the last of job A, the first of B)
    read(300.0, 300.0, n=3)
    assert learner.level_w(one)[0] == pytest.approx(300.0)
    read(690.0, 690.0, new_job=True)
    read(690.0, 690.0, n=20)
    read(300.0, np.nan, n=120, dt_s=1.0)  # (back at 1 s: no means; the load fell)
    assert np.isnan(learner.level_w(one)[0]) and learner.demand()[0] < 400.0


def scattered_fits(s: float, scatter: float, points: int, jobs: int = 60) -> CurveLearner:
    """`jobs` GPUs of sensitivity s, each with `points` samples under caps of 350-600 W whose
    util_mem reads the truth times (1 + scatter x a normal draw): a scrape every 30 s catches
    any moment of a job's phases."""
    rng = np.random.default_rng(7)
    learner = CurveLearner(CURVE)
    slots = np.arange(jobs)
    ones, ref_w = np.ones(jobs), 650.0
    for _ in range(int(MIN_REF_S)):
        learner.observe(slots, np.full(jobs, ref_w), ones, np.full(jobs, 0.34), np.full(jobs, 700.0), 700.0)
    for _ in range(points):
        cap = rng.uniform(350.0, 600.0, jobs)
        work = keep(s, CURVE.at(cap) / CURVE.at(ref_w))
        mem = np.clip(0.34 * work * (1.0 + scatter * rng.standard_normal(jobs)), 0.01, 1.0)
        learner.observe(slots, cap - 1.0, ones, mem, cap, 700.0, dt_s=30.0)
    return learner


def test_scattered_points_keep_the_planner_s_bound_over_the_truth():
    """A compute-bound job read every 30 s: its points scatter, and the fit of 30 of them falls
    under the truth for many jobs (0.78 for 0.89 in an eval: its GPUs lost 52% under a 50%
    class). The bound the planner caps by rests on the points' own scatter: over the truth for
    nearly every job; points without scatter keep it tight."""
    truth = 0.9
    noisy = scattered_fits(truth, 0.08, 30)
    assert np.mean(noisy.sensitivity() < truth - 0.03) > 0.2  # the fit does wander under
    assert np.mean(noisy.upper() >= truth) >= 0.9  # (97% here; 67% by util_mem's resolution alone)
    exact = scattered_fits(truth, 0.0, 30)
    assert np.all(np.abs(exact.sensitivity() - truth) < 0.01) and np.all(exact.upper() - exact.sensitivity() < 0.06)


@pytest.mark.parametrize("under_w, comm_w", [(1.5, 395.0), (15.0, 350.0)])
def test_where_the_gpu_sends_its_clock_reasons_they_say_whether_the_cap_holds_it(under_w, comm_w):
    """A training job capped at 400 W whose GPUs communicate at 395 W, at full speed: within
    NOT_BINDING_W of the cap, but no power cap holds their clock (reason 0x4 clear). Counted,
    those seconds read as a cap that cost nothing (a job of s 0.95 learned at 0.14-0.20 in an
    eval at 30-s scrapes; capped deep, its GPUs lost 28% under a 25% class). A part that
    settles 15 W under its cap (reason 0x4 set) is held all the same (its job communicating at
    350 W). Where the source sends no clock reasons, the draw near the limit decides, as before."""
    s = 0.95
    held_w = 400.0 - under_w
    r = float(CURVE.at(held_w) / CURVE.at(698.5))

    def learned(reasons: bool) -> CurveLearner:
        learner = CurveLearner(CURVE)
        one = np.array([0])
        for t in range(900):
            computing, cap_w = t % 30 >= 10, (700.0 if t < 300 else 400.0)
            held = computing and cap_w < 700
            power = held_w if held else (698.5 if computing else comm_w)
            mem = 0.34 * (float(keep(s, r)) if held else 1.0)
            learner.observe(one, np.array([power]), np.array([1.0]), np.array([mem]), np.array([cap_w]), 700.0,
                            cap_reason=np.array([float(held)]) if reasons else None)
        return learner
    by_reasons, by_power = learned(True), learned(False)
    assert by_reasons.sensitivity()[0] == pytest.approx(s, abs=0.03)
    assert by_reasons.points[0] == pytest.approx(380, abs=1)  # the compute seconds only, but each phase's first
    if under_w < 10:  # its communication counted too
        assert by_power.points[0] == pytest.approx(600, abs=1) and by_power.sensitivity()[0] < 0.75
    else:  # nothing taken for held: the recorded curve, the most a cap can cost
        assert by_power.points[0] == 0 and by_power.sensitivity()[0] == 1.0


TICK, CAP_W, REF_W = 0.05, 400.0, 698.5
PER = int(round(1.0 / TICK))  # ticks in a second


def swinging_job(s: float, duration_s: float, offset_s: float, comm_w: float = 350.0):
    """A training job of sensitivity s ticked 20 times a second: computing at REF_W for 70% of
    each 17.3 s step (`offset_s` into one at 0), communicating at comm_w moving as much memory as
    it does computing uncapped; capped at CAP_W from 300 s on, which holds its compute."""
    t = np.arange(int(duration_s / TICK)) * TICK
    computing = (t + offset_s) % 17.3 >= 0.3 * 17.3
    capped = t >= 300.0
    held = computing & capped
    work = float(keep(s, CURVE.at(CAP_W - 1.0) / CURVE.at(REF_W)))
    return (capped, held, np.where(held, CAP_W - 1.0, np.where(computing, REF_W, comm_w)),
            np.where(held, 0.34 * work, 0.34))


def read_at(learner: CurveLearner, job, i: int, reason_at: int, dt_s: float = 1.0) -> None:
    """A reading at tick i as NVML gives it: the second before's means, the clock reason of tick
    `reason_at` (the instant's: i - 1)."""
    capped, held, power, mem = job
    learner.observe(np.array([0]), np.array([power[i - PER:i].mean()]), np.array([1.0]),
                    np.array([mem[i - PER:i].mean()]), np.array([CAP_W if capped[i - 1] else 700.0]), 700.0,
                    dt_s=dt_s, cap_reason=np.array([float(held[reason_at])]))


@pytest.mark.parametrize("s", [0.95, 0.5])
def test_readings_averaged_over_a_second_with_an_instant_clock_reason_keep_the_bound_over_the_truth(s):
    """NVML's power and utilisation (and dcgm-exporter's, read from them) are averages over the
    second before the reading; the clock reason is the instant's. A training job read every
    second, capped at 400 W, communicates at 350 W for 30% of each 17.3 s step, moving as much
    memory as it does computing uncapped: the first reading after each communication has the
    reason set and the communication blended into its draw and memory traffic. Taken for a
    point, it read as a cap that costs less than it does (0.92 for 0.95), and the bound was under
    the truth in every run. A point needs the cap to have held at the reading before too."""
    fits, bounds = [], []
    for seed in range(6):
        job, learner = swinging_job(s, 1200, np.random.default_rng(seed).uniform(0.0, 17.3)), CurveLearner(CURVE)
        for i in range(PER, job[0].size, PER):
            read_at(learner, job, i, i - 1)
        fits.append(learner.sensitivity()[0])
        bounds.append(learner.upper()[0])
        assert 500 <= learner.points[0] <= 640  # (of ~630 capped seconds computing: all but each phase's first)
    assert np.all(np.array(bounds) >= s), bounds
    assert np.all(np.array(fits) <= s + 0.06), fits  # (what is left errs on the safe side, a little)


@pytest.mark.parametrize("every_s", [10, 30])
@pytest.mark.parametrize("s", [0.95, 0.5])
def test_readings_far_apart_that_blend_a_phase_in_keep_the_bound_over_the_truth(s, every_s):
    """The same job read every 10 or 30 s (dcgm-exporter under Prometheus): the reading before
    says nothing of the second before this one, and a reading just after a communication blends
    it in with the reason set. Taken for points, they put the bound under the truth in 4-5 of 10
    half-hour runs at 10 s (fits 0.89-0.94 for 0.95, 0.47-0.50 for 0.5) and 2-4 of 10 at 30 s. A
    point needs a draw within NOT_BINDING_W of the least its job's held samples drew under their
    cap."""
    fits, bounds = [], []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        job, learner, step = swinging_job(s, 2100, rng.uniform(0.0, 17.3)), CurveLearner(CURVE), int(every_s / TICK)
        for i in range(PER + int(rng.integers(0, step)), job[0].size, step):
            read_at(learner, job, i, i - 1, float(every_s))
        fits.append(learner.sensitivity()[0])
        bounds.append(learner.upper()[0])
        assert learner.points[0] >= 1200 / every_s * 0.5  # (of ~1260 capped seconds computing)
    assert np.all(np.array(bounds) >= s), (bounds, fits)
    assert np.all(np.array(fits) <= s + 0.06), fits


@pytest.mark.parametrize("every_s", [10, 30])
@pytest.mark.parametrize("s", [0.95, 0.5])
def test_clock_reasons_read_up_to_a_second_off_the_power_s_second_keep_the_bound_over_the_truth(s, every_s):
    """dcgm-exporter hands on what DCGM last read of each field, each at its own time: the clock
    reason may be a compute instant's while the power is a communication second's. The worst
    case: a communication phase that draws within NOT_BINDING_W of the cap, so its reading, with
    a compute instant's reason, is a point at no cost. Up to 1 s apart (DCGM reads a GPU's fields
    in one pass) the bound stays over the truth in every run; 3 s apart, with such a
    communication phase, it was under it in 4-6 of 10 runs at 10 s (not covered)."""
    bounds = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        job = swinging_job(s, 2100, rng.uniform(0.0, 17.3), comm_w=392.0)
        learner, step = CurveLearner(CURVE), int(every_s / TICK)
        for i in range(2 * PER + int(rng.integers(0, step)), job[0].size - 2 * PER, step):
            read_at(learner, job, i, i - 1 + int(round(rng.uniform(-1.0, 1.0) / TICK)), float(every_s))
        bounds.append(learner.upper()[0])
        assert learner.points[0] >= 1200 / every_s * 0.5
    assert np.all(np.array(bounds) >= s), bounds


def test_a_job_read_in_one_phase_for_minutes_under_a_cap_at_that_phase_s_draw_keeps_its_learned_cost():
    """Read every 30 s, a job whose step is 29.9 s is read in one phase for many minutes on end.
    Learned at s 0.97 from its compute under a 500 W cap, it is then capped at 318 W, just under
    its communication's 320 W, and read communicating: held (0x4) at no cost (util_mem at the
    reference), while its unseen compute loses half its work. Taken for points, 40 of them put
    the fit at 0.02 here (0.33 on the eval's seed 3 at 30 s, where 23 GPUs lost 54% under a 50%
    class). A point far under a firm fit does not count."""
    s, learner, one = 0.97, CurveLearner(CURVE), np.array([0])

    def read(power_w, mem, limit_w, reason) -> None:
        learner.observe(one, np.array([power_w]), np.array([1.0]), np.array([mem]), np.array([limit_w]), 700.0,
                        dt_s=30.0, cap_reason=np.array([reason]))
    for i in range(60):  # uncapped: computing at 698 W, communicating at 320 W
        read(698.0 if i % 10 < 7 else 320.0, 0.34, 700.0, 0.0)
    work = float(keep(s, CURVE.at(499.0) / CURVE.at(698.0)))
    for _ in range(20):  # capped at 500 W, read computing
        read(499.0, 0.34 * work, 500.0, 1.0)
    learned = learner.sensitivity()[0]
    assert abs(learned - s) < 0.05 and learner.points[0] == 20
    for _ in range(40):  # capped at 318 W, read communicating (held just under its own draw)
        read(317.0, 0.34, 318.0, 1.0)
    assert learner.sensitivity()[0] >= learned - 0.02
    assert learner.upper()[0] >= s


def test_a_reading_over_its_limit_after_a_cap_is_lowered_shuts_no_job_out_of_learning():
    """A cap lowered within a reading's second: that reading averages part of the second at the old
    limit and draws over the new one. Counted as its draw under the limit (-50 W, or 0), every
    later reading of a part that settles 15 W under its cap was more than NOT_BINDING_W further
    under than it, and none was a point again: the job stayed at the prior s = 1."""
    s, learner, one = 0.5, CurveLearner(CURVE), np.array([0])

    def read(power_w, mem, limit_w, reason) -> None:
        learner.observe(one, np.array([power_w]), np.array([1.0]), np.array([mem]), np.array([limit_w]), 700.0,
                        cap_reason=np.array([reason]))
    for _ in range(30):
        read(698.0, 0.34, 700.0, 0.0)
    read(485.0, 0.34 * float(keep(s, CURVE.at(485.0) / CURVE.at(698.0))), 500.0, 1.0)
    read(450.0, 0.34 * float(keep(s, CURVE.at(450.0) / CURVE.at(698.0))), 400.0, 1.0)  # lowered within the second
    for _ in range(60):
        read(385.0, 0.34 * float(keep(s, CURVE.at(385.0) / CURVE.at(698.0))), 400.0, 1.0)
    assert learner.points[0] >= 60
    assert abs(learner.sensitivity()[0] - s) < 0.05


def test_a_fit_firm_on_light_caps_still_learns_from_a_deep_one():
    """Nine points under a light cap (660 W) say little about a job, and the prior (s = 1) still
    weighs on their fit: a point far under that fit at a deep cap is within the fit's error at its
    own x, and counts. Judged by the points' error alone, every 400-W point of a job of s 0.5 was
    dropped and its bound stayed at 1."""
    s, learner, one = 0.5, CurveLearner(CURVE), np.array([0])

    def read(power_w, limit_w) -> None:
        work = float(keep(s, CURVE.at(power_w) / CURVE.at(698.0))) if limit_w < 700 else 1.0
        learner.observe(one, np.array([power_w]), np.array([1.0]), np.array([0.34 * work]), np.array([limit_w]),
                        700.0, cap_reason=np.array([1.0 if limit_w < 700 else 0.0]))
    for _ in range(30):
        read(698.0, 700.0)
    for _ in range(10):
        read(659.0, 660.0)
    for _ in range(40):
        read(399.0, 400.0)
    assert learner.points[0] == 49  # (the first under the light cap: the reading before it was not held)
    assert abs(learner.sensitivity()[0] - s) < 0.05 and learner.upper()[0] < 0.7
