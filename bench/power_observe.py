"""The power role's cost per second of data at a 100,000-GPU site, delivered as Kafka carries it:
one GPU message per node (12,512 a scrape) and one facility message per rack (783).

Measured in one run, on the same synthetic site (782 racks x 16 nodes x 8 H100s, 70% of the
nodes busy), with a request held under caps (the controller's costly phase):

  before     each message observed alone (PowerRole.observe per message), with KeyIndex as it
             was (a hash of every known UUID built on each lookup: `OldKeyIndex` below)
  index      each message observed alone, with today's KeyIndex (a small batch looks up its
             own keys only)
  batch      the role's loop (`power_role`) with a read a scrape: its messages joined into a batch
             per run and observed once (the ticks after each read, the steps, timed apart)
  one batch  the scrape as one message (the in-process bus), for reference

and KeyIndex.slots alone: a node's 8 UUIDs looked up among the site's 100,096, before and now.

The per-message rows time a sample of each scrape's node messages (--sample) and scale it to
the scrape: observing all 12,512 one by one costs minutes. CPU seconds (process time).

    python bench/power_observe.py [--racks 782] [--seconds 4] [--sample 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from pipeline.bus import EndOfStream, Message, Topic  # noqa: E402
from pipeline.bus.batching import split_by  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.detect.state import KeyIndex  # noqa: E402
from pipeline.model import FACILITY_SAMPLE, GPU_SAMPLE  # noqa: E402
from pipeline.power.store import request_store  # noqa: E402
from pipeline.roles.power import DryRunActuator, PowerRole, power_role  # noqa: E402

NODES, GPUS = 16, 8
T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)


class OldKeyIndex:
    """KeyIndex before: every lookup probes the batch against a hash of all known keys, built anew."""

    def __init__(self, on_new=None) -> None:
        self.keys = pa.array([], pa.string())
        self._on_new = on_new
        self._last = None

    def __len__(self) -> int:
        return len(self.keys)

    def slots(self, keys: pa.Array) -> np.ndarray:
        if self._last is not None and self._last[0] is keys:
            return self._last[1]
        idx = pc.index_in(keys, value_set=self.keys)
        if idx.null_count:
            new = pc.unique(pc.filter(keys, pc.is_null(idx)))
            first_rows = pc.index_in(new, value_set=keys).to_numpy().astype(np.int64)
            self.keys = pa.concat_arrays([self.keys, new.cast(pa.string())])
            if self._on_new is not None:
                self._on_new(new, first_rows)
            idx = pc.index_in(keys, value_set=self.keys)
        out = idx.to_numpy().astype(np.int64)
        self._last = (keys, out)
        return out


class Site:
    """A scrape a second: the GPUs' rows (one message per node) and the PDUs' and the meter's."""

    def __init__(self, site: str, racks: int, seed: int = 1) -> None:
        self.site, self.racks = site, racks
        n = self.n = racks * NODES * GPUS
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.rack_of = np.repeat(np.arange(racks), NODES * GPUS)
        busy = np.repeat(rng.random(racks * NODES) < 0.7, GPUS)
        self.demand = np.where(busy, rng.uniform(450, 690, n), 71.0)
        nodes = [f"r{r:04d}-n{k:02d}" for r in range(racks) for k in range(NODES)]
        self.static = {"site": pa.array([site] * n), "rack": pa.array(np.repeat([f"r{r:04d}" for r in range(racks)],
                                                                                 NODES * GPUS)),
                       "node": pa.array(np.repeat(nodes, GPUS)),
                       "gpu": pa.array(np.tile(np.arange(GPUS), n // GPUS).astype(np.int16)),
                       "gpu_uuid": pa.array([f"GPU-{i:032x}" for i in range(n)]),
                       "model": pa.array(["NVIDIA H100 80GB HBM3"] * n),
                       "util_gpu": np.where(busy, 0.95, 0.0), "util_mem": np.where(busy, 0.3, 0.0),
                       "mem_used_bytes": np.where(busy, 60e9, 1e8).astype(np.int64),
                       "clock_event_reasons": np.zeros(n, np.int64)}

    def scrape(self, t: int, caps: dict[str, float]) -> tuple[pa.RecordBatch, pa.RecordBatch]:
        n, ts = self.n, np.datetime64(int(T0.timestamp() + t) * 10**9, "ns")
        limit = np.full(n, 700.0)
        if caps:
            slots = np.fromiter((int(u[4:], 16) for u in caps), np.int64, len(caps))
            limit[slots] = list(caps.values())
        power = np.round(np.minimum(self.demand * np.random.default_rng((self.seed, t)).normal(1, 0.01, n), limit - 2))
        cols = {**self.static, "ts": pa.array(np.full(n, ts), GPU_SAMPLE.field("ts").type), "power_w": power,
                "power_limit_w": limit}
        gpu = pa.RecordBatch.from_pydict({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in GPU_SAMPLE},
                                         schema=GPU_SAMPLE)
        per_rack = np.bincount(self.rack_of, weights=power, minlength=self.racks) + 5000.0
        k = self.racks + 1
        cols = {"ts": pa.array(np.full(k, ts), FACILITY_SAMPLE.field("ts").type), "site": [self.site] * k,
                "rack": [f"r{r:04d}" for r in range(self.racks)] + [""],
                "device": [f"pdu-r{r:04d}" for r in range(self.racks)] + ["meter-main"],
                "device_class": ["rack"] * self.racks + ["meter"], "metric": ["power_w"] * k,
                "value": np.concatenate([per_rack, [per_rack.sum() * 1.3]]), "quality": np.ones(k, np.int8)}
        facility = pa.RecordBatch.from_pydict({f.name: cols.get(f.name, pa.nulls(k, f.type))
                                               for f in FACILITY_SAMPLE}, schema=FACILITY_SAMPLE)
        return gpu, facility


def messages(gpu: pa.RecordBatch, facility: pa.RecordBatch) -> list[Message]:
    return split_by(Topic.GPU, gpu, "node") + split_by(Topic.FACILITY, facility, "rack")


class Sub:
    """The role's subscription: a read a second, each the scrape's messages. `cpu_s`: the process
    time from the first read to the end of the data (the role's close not included)."""

    def __init__(self, reads: list[list[Message]]) -> None:
        self.reads = list(reads)
        self.started = self.cpu_s = 0.0

    async def get_batch(self, max_messages: int, timeout_s: float) -> list[Message]:
        if not self.reads:
            self.cpu_s = time.process_time() - self.started
            raise EndOfStream
        if not self.started:
            self.started = time.process_time()
        return self.reads.pop(0)

    async def commit(self) -> None:
        pass


class Gate:
    async def screen(self, ms: list[Message]) -> list[Message]:
        return ms


def make_role(root: str, name: str, site: Site, old_index: bool) -> PowerRole:
    cfg = load_config(env={}, overrides={"data_dir": os.path.join(root, name),
                                         "power": {"dry_run": True, "default_class": 3, "baseline_s": 10}})

    async def publish(topic, batch) -> None:
        pass
    role = PowerRole(cfg, request_store(cfg.data_dir), DryRunActuator(), publish, utc_now=lambda: T0)
    if old_index:
        role.ctl.gpus.ids = OldKeyIndex(on_new=role.ctl.gpus._register)
    return role


def warm(role: PowerRole, site: Site, seconds: int) -> None:
    """The fleet known, a request taken and held under caps (every role the same data and request)."""
    role.store.add({"site": site.site, "start": (T0 + timedelta(seconds=12)).isoformat(), "duration_s": 3600,
                    "ramp_s": 10, "reduction_pct": 10}, "cli", T0)

    async def go() -> None:
        for t in range(seconds):
            gpu, facility = site.scrape(t, role.actuator.planned)
            role.observe(Message(Topic.GPU, gpu))
            role.observe(Message(Topic.FACILITY, facility))
            await role.tick()
    asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--racks", type=int, default=782)
    ap.add_argument("--seconds", type=int, default=4, help="scrapes timed per way")
    ap.add_argument("--sample", type=int, default=300, help="node messages timed per scrape, one by one")
    args = ap.parse_args()
    site = Site("site-a", args.racks)
    root = tempfile.mkdtemp(prefix="power-observe-")
    n_gpu = args.racks * NODES
    print(f"{site.n:,} GPUs, {args.racks} racks: {n_gpu:,} GPU messages and {args.racks + 1} facility messages "
          f"a scrape; {args.seconds} scrapes each")
    data = [site.scrape(30 + t, {}) for t in range(args.seconds)]
    rows = {}

    for name, old in (("before", True), ("index", False)):
        role = make_role(root, name, site, old)
        warm(role, site, 30)
        phase = f"{role.ctl.phase}, {int((~np.isnan(role.ctl.cap)).sum()):,} GPUs capped"
        per_msg, fac_msg = [], []
        for gpu, facility in data:
            ms = messages(gpu, facility)
            gpu_ms = [m for m in ms if m.topic == Topic.GPU]
            pick = np.linspace(0, len(gpu_ms) - 1, args.sample).astype(int)
            c0 = time.process_time()
            for i in pick:
                role.observe(gpu_ms[i])
            per_msg.append((time.process_time() - c0) / len(pick))
            fac = [m for m in ms if m.topic == Topic.FACILITY]
            c0 = time.process_time()
            for m in fac:
                role.observe(m)
            fac_msg.append((time.process_time() - c0) / len(fac))
        gpu_s, fac_s = float(np.mean(per_msg)), float(np.mean(fac_msg))
        rows[name] = (gpu_s * n_gpu + fac_s * (args.racks + 1), f"{1e3 * gpu_s:.3f} ms a GPU message, "
                      f"{1e3 * fac_s:.3f} ms a facility message ({phase})")

    role = make_role(root, "batch", site, False)
    warm(role, site, 30)
    phase = f"{role.ctl.phase}, {int((~np.isnan(role.ctl.cap)).sum()):,} GPUs capped"
    reads = [messages(gpu, facility) for gpu, facility in data]
    observed, ticks = [], [0.0]
    observe, tick = role.observe, role.tick
    role.observe = lambda m: (observed.append(len(m) if isinstance(m, list) else 1), observe(m))

    async def timed_tick() -> None:
        c0 = time.process_time()
        await tick()
        ticks[0] += time.process_time() - c0
    role.tick = timed_tick
    sub = Sub(reads)
    asyncio.run(power_role(role, sub, Gate(), None, 3600.0))
    rows["batch"] = ((sub.cpu_s - ticks[0]) / args.seconds,
                     f"{len(observed) / args.seconds:.0f} observes a scrape ({phase}); the role's ticks (steps, "
                     f"status) not included: {ticks[0] / args.seconds:.3f} s a scrape more")

    role = make_role(root, "one", site, False)
    warm(role, site, 30)
    c0 = time.process_time()
    for gpu, facility in data:
        role.observe(Message(Topic.GPU, gpu))
        role.observe(Message(Topic.FACILITY, facility))
    rows["one batch"] = ((time.process_time() - c0) / args.seconds, f"({role.ctl.phase})")

    uuids = site.static["gpu_uuid"]
    node = uuids.slice(8 * 777, 8)
    lookups = []
    for cls in (OldKeyIndex, KeyIndex):
        index = cls()
        index.slots(uuids)
        c0 = time.process_time()
        for _ in range(500):
            index.slots(node.slice(0))  # a new column object each time, as each message's is
        lookups.append((time.process_time() - c0) / 500)
    print(f"KeyIndex.slots of a node's 8 GPUs among {site.n:,} known: {1e3 * lookups[0]:.3f} ms before, "
          f"{1e3 * lookups[1]:.4f} ms now ({lookups[0] / lookups[1]:.0f}x)")
    base = rows["before"][0]
    print(f"{'':10s} {'CPU s / scrape':>15s} {'vs before':>10s}")
    for name, (s, note) in rows.items():
        print(f"{name:10s} {s:15.3f} {base / s:9.0f}x  {note}")


if __name__ == "__main__":
    main()
