"""Archives for the analytics' tests, written by the real writer (sinks/parquet.py), some
files as an older Fleetwatch wrote them: a fleet hour whose numbers are known, and the
simulated fleet detected by the real engine."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.bus import Message, Topic
from pipeline.config import Config
from pipeline.detect.engine import Engine
from pipeline.model import (FACILITY_SAMPLE, FACILITY_SAMPLE_V1, GPU_SAMPLE, GPU_SAMPLE_V3, NODE_HEALTH, Alert,
                            alerts_to_batch)
from pipeline.sinks.parquet import ArchiveWriter
from pipeline.sources.simulate import FleetSimulator

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc)
STEP_S = 10.0
N = 360  # one hour of 10 s samples


def batch(schema: pa.Schema, rows: dict) -> pa.RecordBatch:
    """Columns given, the schema's others null."""
    n = len(next(iter(rows.values())))
    return pa.RecordBatch.from_arrays([pa.array(rows[f.name], f.type) if f.name in rows else pa.nulls(n, f.type)
                                       for f in schema], schema=schema)


def gpu_rows(node: str, gpu: int, ks, util, power, limit) -> dict:
    ks = np.asarray(list(ks))
    full = lambda v: list(np.broadcast_to(np.asarray(v, np.float64), ks.shape))  # noqa: E731
    return {"ts": [T0 + timedelta(seconds=float(k) * STEP_S) for k in ks], "site": ["s1"] * len(ks),
            "rack": ["r01"] * len(ks), "node": [node] * len(ks), "gpu": [gpu] * len(ks),
            "gpu_uuid": [f"GPU-{node}-{gpu}"] * len(ks), "util_gpu": full(util), "power_w": full(power),
            "power_limit_w": full(limit)}


def alert(name: str, severity: str, labels: dict, start_s: float, end_s: float | None) -> Alert:
    return Alert({"alertname": name, "severity": severity, "site": "s1", "rack": "r01", **labels},
                 {"summary": name}, T0 + timedelta(seconds=start_s), "test", 1.0,
                 ends_at=None if end_s is None else T0 + timedelta(seconds=end_s))


def write_file(folder: Path, table: pa.Table, name: str) -> None:
    """A file as an older Fleetwatch wrote it, beside the writer's (same hive layout)."""
    part = folder / f"date={T0:%Y-%m-%d}" / f"hour={T0:%H}"
    part.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, part / name)


def known_archive(tmp_path: Path) -> Path:
    """One hour of a 7-GPU fleet whose split is known:
    n01 g0 productive; g1 idle; g2 capped to 500 W for the second half (700 W before);
    g3 an uncorrectable ECC alert (critical) for minutes 10-20;
    n02 failing per node_health for minutes 30-45, a straggler warning all along (not a fault),
        g1 silent for minutes 20-30, alerted as not reporting (a fault) for the last 5;
    n03 g0 productive, in a file of gpu_sample v3 (no power_limit_w column);
    a rack-scope critical alert (not a GPU's fault); the site meter 100 kW then 200 kW, the second
    half in a facility_sample v1 file (no device_class)."""
    data = tmp_path / "data"
    w = ArchiveWriter(data / "archive", writer_id="test")
    half = N // 2
    for rows in (gpu_rows("n01", 0, range(N), 0.9, 700, 700),
                 gpu_rows("n01", 1, range(N), 0.0, 70, 700),
                 gpu_rows("n01", 2, range(half), 0.95, 700, 700),
                 gpu_rows("n01", 2, range(half, N), 0.95, 499, 500),
                 gpu_rows("n01", 3, range(N), 0.9, 690, 700),
                 gpu_rows("n02", 0, range(N), 0.9, 600, 700),
                 gpu_rows("n02", 1, [*range(120), *range(180, N)], 0.9, 650, 700)):
        w.add("gpu_samples", batch(GPU_SAMPLE, rows))
    old = gpu_rows("n03", 0, range(N), 0.9, 680, 0)
    del old["power_limit_w"]
    write_file(data / "archive" / "gpu_samples", pa.Table.from_batches([batch(GPU_SAMPLE_V3, old)]),
               "part-0-old-000001.parquet")
    w.add("alerts", alerts_to_batch([
        (T0 + timedelta(seconds=600), alert("GpuUncorrectableEcc", "critical", {"node": "n01", "gpu": "3"}, 600, None)),
        (T0 + timedelta(seconds=1200), alert("GpuUncorrectableEcc", "critical", {"node": "n01", "gpu": "3"}, 600, 1200)),
        (T0 + timedelta(seconds=1500), alert("GpuNotReporting", "critical", {"node": "n02", "gpu": "1"}, 1500, None)),
        (T0 + timedelta(seconds=1800), alert("GpuNotReporting", "critical", {"node": "n02", "gpu": "1"}, 1500, 1800)),
        (T0, alert("GpuStraggler", "warning", {"node": "n02", "gpu": "0"}, 0, None)),
        (T0, alert("CoolantLeak", "critical", {}, 0, None))]))
    w.add("node_health", batch(NODE_HEALTH, {
        "ts": [T0 - timedelta(hours=1), T0 + timedelta(seconds=1800), T0 + timedelta(seconds=2700)],
        "site": ["s1"] * 3, "rack": ["r01"] * 3, "node": ["n02"] * 3,
        "state": ["suspect", "failing", "suspect"], "previous": ["healthy", "suspect", "failing"],
        "reasons": ["GpuStraggler", "GpuStraggler,GpuUncorrectableEcc", "GpuStraggler"]}))

    def meter(ks, kw: float, schema: pa.Schema, cls: bool) -> pa.RecordBatch:
        ks = list(ks)
        rows = {"ts": [T0 + timedelta(seconds=k * STEP_S) for k in ks], "site": ["s1"] * len(ks),
                "rack": [""] * len(ks), "device": ["meter-main"] * len(ks), "metric": ["power_w"] * len(ks),
                "value": [kw * 1000.0] * len(ks), "quality": [1] * len(ks)}
        if cls:
            rows["device_class"] = ["meter"] * len(ks)
        return batch(schema, rows)
    w.add("facility_samples", meter(range(half), 100.0, FACILITY_SAMPLE, True))
    # Not the site's power: a rack PDU's, and a reading of bad quality.
    w.add("facility_samples", batch(FACILITY_SAMPLE, {
        "ts": [T0, T0], "site": ["s1"] * 2, "rack": ["r01", ""], "device": ["pdu-r01", "meter-main"],
        "metric": ["power_w"] * 2, "value": [5e6, 9e6], "quality": [1, 0], "device_class": ["rack", "meter"]}))
    w.flush()
    write_file(data / "archive" / "facility_samples",
               pa.Table.from_batches([meter(range(half, N), 200.0, FACILITY_SAMPLE_V1, False)]),
               "part-0-old-000002.parquet")
    return data


def simulated_archive(archive: Path, cfg: Config, steps: int,
                      actions: dict[int, Callable[[FleetSimulator], None]] | None = None) -> FleetSimulator:
    """`steps` ticks of the simulated fleet from T0, detected by the real engine, every dataset
    it makes archived (samples, events, fault labels, alerts, node health); `actions[i]` acts on the
    simulator before tick i (a fault injected, caps set)."""
    sim = FleetSimulator(cfg.fleet, start=T0)
    engine = Engine(cfg)
    w = ArchiveWriter(archive, writer_id="sim")
    for i in range(steps):
        if actions and i in actions:
            actions[i](sim)
        tick = sim.step()
        w.add("gpu_samples", tick.gpu)
        w.add("facility_samples", tick.facility)
        if tick.events is not None:
            w.add("events", tick.events)
        if tick.labels is not None:
            w.add("fault_labels", tick.labels)
        for topic, b in ((Topic.GPU, tick.gpu), (Topic.FACILITY, tick.facility), (Topic.EVENTS, tick.events)):
            if b is not None:
                out = engine.process(Message(topic, b))
                if out.alerts:
                    w.add("alerts", alerts_to_batch(out.alerts))
                if out.health:
                    w.add("node_health", pa.RecordBatch.from_pylist(out.health, schema=NODE_HEALTH))
    w.flush()
    return sim
