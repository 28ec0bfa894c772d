"""The recorded H100's power-cap steps through the fleet detectors (issue 16, item 5): real
caps are not faults. (The recorded load and cooldown, eight GPUs at different points of
it, are tests/test_nvml.py::test_eight_replayed_gpus_out_of_step_raise_no_alert.)"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from pipeline.bus import Message, Topic
from pipeline.detect.engine import Engine
from pipeline.sources.nvml import NvmlAgent
from pipeline.sources.nvml_replay import NvmlReplay
from tests.conftest import H100, make_config

TRACE = [json.loads(line) for line in (H100 / "h100_powercap_trace.jsonl").read_text().splitlines() if line]
HZ = 10


def _recorded(gpus: int, lag_scrapes: int) -> list[dict[str, np.ndarray]]:
    """Each 10 Hz scrape of `gpus` GPUs playing the power-cap recording, GPU g `lag_scrapes`
    x g scrapes behind GPU 0 (a planner's caps reach a job's GPUs a little apart)."""
    t = np.array([r["t"] for r in TRACE])
    scrapes = np.arange(0.0, t[-1], 1.0 / HZ)
    out = []
    for k in range(scrapes.size - lag_scrapes * (gpus - 1)):
        at = scrapes[k + lag_scrapes * (gpus - 1 - np.arange(gpus))]
        rows = [TRACE[i] for i in np.searchsorted(t, at, side="right") - 1]
        col = {name: np.array([r[name] for r in rows], np.float64) for name in rows[0] if name != "t_wall"}
        col["busy"] = col["power_instant_mw"] > 100_000  # the matmul runs (its first TFLOP/s report is 0.6 s later)
        out.append(col)
    return out


def test_the_recorded_cap_steps_raise_no_alert():
    """700 -> 500 -> 350 -> 200 -> 700 W under a steady matmul load, on a node's eight GPUs
    a tenth of a second apart (one job, its caps set one GPU after the other): power,
    clocks and temperatures fall and rise with the limit, clock reason 0x4 (SW power cap)
    on, one 1 s power average of 0 W as recorded, and no detector calls it a fault."""
    cfg = make_config()
    replay = NvmlReplay(H100, gpus=8, latency=False)
    engine = Engine(cfg)
    with replay.installed():
        agent = NvmlAgent(cfg.agent, "node-1")
        agent.open()
        template = agent.scrape().samples
    t0 = 1.8e9
    scrapes = _recorded(8, lag_scrapes=1)
    for i, c in enumerate(scrapes):
        busy = c["busy"]
        cols = {
            "ts": pa.array(np.full(8, int((t0 + i / HZ) * 1e9)), pa.int64()).cast(template.schema.field("ts").type),
            "power_w": c["power_mw"] / 1000, "power_limit_w": c["enforced_mw"] / 1000,
            "sm_clock_mhz": c["sm_mhz"], "clock_event_reasons": c["reasons"].astype(np.int64),
            "gpu_temp_c": c["temp_c"], "mem_temp_c": c["temp_c"] - 2, "energy_j": c["energy_mj"] / 1000,
            "util_gpu": np.where(busy, 1.0, 0.0), "util_mem": np.where(busy, 0.3, 0.0),
        }
        batch = template
        for name, values in cols.items():
            j = batch.schema.get_field_index(name)
            batch = batch.set_column(j, name, pa.array(values).cast(batch.schema.field(j).type))
        fired = [x.annotations["summary"] for _, x in engine.process(Message(Topic.GPU, batch)).alerts]
        assert fired == [], f"scrape {i}: {fired}"
    capped = [c for c in scrapes if (c["enforced_mw"] < 700_000).all() and c["busy"].all()]
    assert len(capped) > 200  # the steps were played, under load
    assert engine.stats.gpu_samples == 8 * len(scrapes)
