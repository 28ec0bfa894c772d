"""Archive storage and query time, before and after compaction (sinks/compaction.py).

Writes HOURS of a simulated fleet (NODES nodes x 8 GPUs, one sample every INTERVAL seconds,
the simple normal, faults off) through the archive's own writer, flushed every 10 simulated
seconds as the daemon at real time does (about 360 files per dataset and hour), then in one run:

  files, bytes, bytes per metric value    of gpu_samples, as written and compacted
                                          (a metric value: one non-null reading)
  "per-node p99 GPU temperature"          DuckDB over `fleetwatch query`'s view, and
                                          polars over analytics.archive.scan, best of 3,
                                          on the archive as written and compacted
  identical                               both answers the same before and after

and prints each pair with its ratio.

    python bench/archive_compaction.py [--hours 2] [--nodes 32] [--interval 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import polars as pl  # noqa: E402

from pipeline.analytics.archive import scan  # noqa: E402
from pipeline.analytics.archive_stats import file_values  # noqa: E402
from pipeline.analytics.query import Archive  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.sinks.compaction import compact  # noqa: E402
from pipeline.sinks.parquet import ArchiveWriter  # noqa: E402
from pipeline.sources.simulate import FleetSimulator  # noqa: E402

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
FLUSH_S = 10
SQL = "select node, quantile_cont(gpu_temp_c, 0.99) as p99 from gpu_samples group by node order by node"


def write(archive: Path, hours: float, nodes: int, interval_s: float) -> None:
    racks = max(1, nodes // 8)
    cfg = load_config(env={}, overrides={"fleet": {"normal": "simple", "racks": racks, "nodes_per_rack": nodes // racks,
                                                    "fault_interval_s": 0.0, "gpu_reset_interval_s": 0.0,
                                                    "sample_interval_s": interval_s}})
    sim = FleetSimulator(cfg.fleet, start=T0, physics_step_s=float("inf"))  # (rows only: one step a scrape)
    w = ArchiveWriter(archive, writer_id="bench")
    flush_every = max(1, round(FLUSH_S / interval_s))
    for i in range(int(hours * 3600 / interval_s)):
        tick = sim.step()
        w.add("gpu_samples", tick.gpu)
        w.add("facility_samples", tick.facility)
        if (i + 1) % flush_every == 0:
            w.flush()
    w.flush()


def storage(archive: Path) -> dict:
    files = sorted((archive / "gpu_samples").glob("*/*/*.parquet"))
    size = sum(f.stat().st_size for f in files)
    values = sum(file_values(f)[1] for f in files)
    return {"files": len(files), "bytes": size, "bytes_per_value": size / values if values else None}


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def queries(archive: Path) -> dict:
    duck_s, duck = timed(lambda: Archive(archive).run(SQL).to_pylist())
    polars_s, pol = timed(lambda: scan(archive / "gpu_samples").group_by("node").agg(
        pl.col("gpu_temp_c").quantile(0.99, "linear").alias("p99")).sort("node").collect().to_dicts())
    return {"duckdb_s": duck_s, "polars_s": polars_s, "answer": duck, "polars_answer": pol}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hours", type=float, default=2.0)
    p.add_argument("--nodes", type=int, default=32)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between a GPU's samples")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fw-compaction-"))
    try:
        archive = root / "archive"
        t = time.perf_counter()
        write(archive, a.hours, a.nodes, a.interval)
        written_s = time.perf_counter() - t
        before = {**storage(archive), **queries(archive)}
        t = time.perf_counter()
        stats = compact(archive, after_s=0.0, now=T0 + timedelta(days=365))
        compact_s = time.perf_counter() - t
        after = {**storage(archive), **queries(archive)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    same = before["answer"] == after["answer"] and before["polars_answer"] == after["polars_answer"]
    agree = all(abs(d["p99"] - q["p99"]) < 1e-9 for d, q in zip(after["answer"], after["polars_answer"]))
    result = {"hours": a.hours, "gpus": a.nodes * 8, "interval_s": a.interval, "rows": stats.rows, "write_s": round(written_s, 1),
              "compact_s": round(compact_s, 2), "identical_before_after": same, "duckdb_polars_agree": agree,
              **{f"{k}_{when}": round(v, 4) if isinstance(v, float) else v for when, d in (("before", before),
                 ("after", after)) for k, v in d.items() if k in ("files", "bytes", "bytes_per_value", "duckdb_s",
                                                                   "polars_s")}}
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{a.hours:g} h of {a.nodes * 8} GPUs at {a.interval:g} s ({stats.rows:,} rows in all datasets), written in "
          f"{written_s:.0f} s, compacted in {compact_s:.2f} s; answers identical before and after: {same}; "
          f"DuckDB and polars agree: {agree}")
    print(f"{'gpu_samples':24s} {'as written':>12s} {'compacted':>12s} {'ratio':>8s}")
    for k, fmt in (("files", "d"), ("bytes", ",d"), ("bytes_per_value", ".3f"), ("duckdb_s", ".3f"),
                   ("polars_s", ".3f")):
        b, c = before[k], after[k]
        print(f"{k:24s} {format(b, fmt):>12s} {format(c, fmt):>12s} {b / c if c else float('nan'):8.1f}x")


if __name__ == "__main__":
    main()
