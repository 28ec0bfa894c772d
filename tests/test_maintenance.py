"""A node drained for maintenance (a rolling reboot, a driver upgrade) says so with an
event before it goes down: it is not reported missing for detect.maintenance_s."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

from pipeline.bus import Message, Topic
from pipeline.detect.engine import Engine
from pipeline.model import EVENT
from pipeline.sources.simulate import FleetSimulator
from tests.conftest import make_config

T0 = datetime(2026, 6, 1, tzinfo=timezone.utc)


def _announce(node: str, rack: str, kind: str, at: datetime) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([{"ts": at, "site": "site-a", "rack": rack, "node": node, "gpu": None,
                                        "gpu_uuid": None, "kind": kind, "code": None,
                                        "text": "drained for a rolling reboot"}], schema=EVENT)


def _run(kind: str | None, maintenance_s: float = 1800.0) -> list[str]:
    """A small simulated fleet, steady; node 3 announces `kind` (or nothing) and is silent
    for 5 minutes. What fired, by alertname and node."""
    cfg = make_config(fleet={"racks": 1, "nodes_per_rack": 4, "gpus_per_node": 2, "fault_interval_s": 0,
                             "gpu_reset_interval_s": 0, "normal": "simple"},
                      detect={"maintenance_s": maintenance_s})
    sim = FleetSimulator(cfg.fleet, start=T0)
    engine = Engine(cfg)
    fired = []
    down = sim.node_names[3]
    for i in range(900):
        tick = sim.step()
        gpu = tick.gpu
        if i == 300 and kind:
            engine.process(Message(Topic.EVENTS, _announce(down, sim.rack_names[0], kind, sim.now)))
        if 310 <= i < 610:  # down
            gpu = gpu.filter(pa.compute.not_equal(gpu.column("node"), down))
        out = engine.process(Message(Topic.GPU, gpu))
        engine.process(Message(Topic.FACILITY, tick.facility))
        fired += [f"{a.labels['alertname']} {a.labels.get('node', '')}" for _, a in out.alerts if a.status == "firing"]
    return fired


def test_a_node_announced_for_a_reboot_or_an_upgrade_is_not_missing_while_down():
    for kind in ("node_reboot", "driver_upgrade"):
        assert _run(kind) == [], kind


def test_without_the_announcement_or_past_the_window_it_is():
    assert any(f.startswith("NodeNotReporting") for f in _run(None))
    assert any(f.startswith("NodeNotReporting") for f in _run("node_reboot", maintenance_s=60.0))


def _stuck_alerts(stuck_at: int | None, job_ends: bool = False, idle_capped: bool = False) -> tuple[list[str], str]:
    """A fleet whose GPU power is read to whole watts (an idle H100, 71.0 +- 0.2 W, repeats
    for minutes); with `stuck_at`, one busy GPU's sensor freezes at that tick (and with
    `job_ends` its job ends 10 s later); with `idle_capped`, every idle GPU is held at the
    lowest limit (demand response caps idle GPUs first)."""
    cfg = make_config(fleet={"racks": 1, "nodes_per_rack": 4, "fault_interval_s": 0, "gpu_reset_interval_s": 0,
                             "normal": "realistic", "seed": 3})
    sim = FleetSimulator(cfg.fleet, start=T0, phenomena=("power_quantization",))
    engine = Engine(cfg)
    fired, victim = [], ""
    for i in range(1500):
        if idle_capped and i % 60 == 0:
            idle = [g for g in range(sim.n_gpus) if not sim.group_busy[sim.node_group[sim.gpu_node[g]]]]
            sim.set_caps(idle, sim.curve.min_limit_w)
            sim.set_caps([g for g in range(sim.n_gpus) if g not in idle], float("nan"))
        if i == stuck_at:
            busy = [g for g in range(sim.n_gpus) if sim.group_busy[sim.node_group[sim.gpu_node[g]]]
                    and not (job_ends and sim.normal.gpu_inference[g])]  # (a service never ends)
            g = busy[0]
            victim = f"{sim.node_names[sim.gpu_node[g]]}/{g % cfg.fleet.gpus_per_node}"
            sim.inject("stuck_power_sensor", gpu=g, duration_s=600)
        if job_ends and stuck_at is not None and i == stuck_at + 10:
            job = sim.gpu_job[g]
            sim.group_busy[job], sim.group_until[job] = False, 1e12
        out = engine.process(Message(Topic.GPU, sim.step().gpu))
        fired += [f"{a.labels['node']}/{a.labels['gpu']}" for _, a in out.alerts
                  if a.labels["alertname"] == "GpuPowerSensorStuck" and a.status == "firing"]
    return fired, victim


def test_an_idle_gpu_read_to_whole_watts_is_not_a_stuck_sensor_and_a_frozen_busy_one_is():
    assert _stuck_alerts(None) == ([], "")
    fired, victim = _stuck_alerts(600)
    assert fired == [victim]


def test_a_sensor_frozen_at_its_jobs_draw_is_found_after_the_job_ends_and_capped_idle_gpus_are_not():
    """A sensor that froze under load and still reads a job's watts after the job ended is
    judged as under load (no idle GPU draws a quarter of its limit), not by the idle runs
    (a 128-node eval missed one frozen at 697 W for its 518 s); idle GPUs held at the lowest
    cap still read their 71 W to the watt, and are judged as idle (their default limit, not
    the cap, says what idle is)."""
    fired, victim = _stuck_alerts(600, job_ends=True)
    assert fired == [victim]
    assert _stuck_alerts(None, idle_capped=True) == ([], "")
