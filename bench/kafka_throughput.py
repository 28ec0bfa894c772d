"""GPU telemetry through a real Kafka broker, against the same work in-process.

Throughput (each stage in a process of its own, on the same backlog: a simulated fleet of
RACKS x 8 nodes x 8 GPUs, TICKS scrapes, faults as configured by default):

  produce   the simulate role's scrapes, keyed by rack (bus/keys.py) and published through
            KafkaBus, as `fleetwatch simulate` does (the simulation itself timed apart)
  kafka     ONE consumer process running the daemon's detect and archive roles over the
            broker, built as `fleetwatch` builds them (roles/context.py, daemon.build_roles):
            detect's rack tier (group detect: GPU, facility, events; event-time aligner,
            a transactional producer per input partition) and site tier (group
            detect-site: the rack summaries), and the archive (group archive: Parquet),
            each behind its intake gate; it drains the backlog as the daemon drains at a stop
  baseline  the same two roles over the in-process bus (one message per topic and tick,
            no encoding), the same scrapes queued before it starts: `fleetwatch run`'s path

and prints GPU samples/s and metric values/s (GPU samples x the GPU metrics; facility
readings come on top) of each, the consumer's ratio to the baseline, and the CPU seconds
per million metric values (getrusage of the process: all its threads) of each role: the
source, detect (rack and site tier apart: CPU of their asyncio tasks), archive, notify.
For that, a second backlog is read by a detect-only process, then an archive-only and a
notify-only process, as separate `fleetwatch detect|archive|notify` processes would.

Then live, at LIVE_SPEED x real time for LIVE_SECONDS, the daemon's own roles with
frequent faults: the source publishes, detect (exactly-once over Kafka: a transaction
per 1 s commit) raises alerts, and a reader of the alerts topic times each alert from
the publication of the scrape that raised it (produce-to-alert latency), while the
detect group's lag is sampled twice a second. The same run on the in-process bus is
the baseline. A broker is started from Maven Central's jars (tests/services.py)
unless --bootstrap names one.

    python bench/kafka_throughput.py [--racks 32] [--ticks 300] [--rounds 1] [--live-seconds 60]
                                     [--live-speed 1] [--commit-interval 1] [--bootstrap HOST:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import collections.abc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from pipeline.bus import EndOfStream, MemoryBus, Topic  # noqa: E402
from pipeline.bus.kafka import KafkaBus  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.model import GPU_METRICS  # noqa: E402
from pipeline.sources.simulate import FleetSimulator, SimulatorSource  # noqa: E402

VALUES = len(GPU_METRICS)


# ---- throughput: each stage in a process of its own ------------------------------------

class _TimedCoroutine(collections.abc.Coroutine):
    """A task's coroutine whose steps add their CPU time (this thread's) to cpu[label]."""

    __slots__ = ("coro", "cpu", "label")

    def __init__(self, coro, cpu: dict[str, float], label: str) -> None:
        self.coro, self.cpu, self.label = coro, cpu, label

    def send(self, value):
        t = time.thread_time()
        try:
            return self.coro.send(value)
        finally:
            self.cpu[self.label] += time.thread_time() - t

    def throw(self, *exc):
        t = time.thread_time()
        try:
            return self.coro.throw(*exc)
        finally:
            self.cpu[self.label] += time.thread_time() - t

    def close(self):
        return self.coro.close()

    def __await__(self):
        return self


def _label(coro) -> str:
    """Which role an asyncio task works for, by its coroutine (the rest: the Kafka clients,
    the producer's outbox pump)."""
    name = getattr(coro, "__qualname__", "")
    if name == "detect_role":
        return f"detect {coro.cr_frame.f_locals.get('tier', 'rack')} tier"
    if name.endswith("both_tiers"):  # the rack tier runs in this task; the site tier in a task of its own
        return "detect rack tier"
    if name in ("archive_role", "notify_role", "consume"):
        sink = coro.cr_frame.f_locals.get("sink")
        return "notify" if "notify" in name or "Notif" in type(sink).__name__ else "archive"
    if name == "SimulatorSource.run" or name == "SimulatorSource._simulate":
        return "simulate"
    return "loop: Kafka clients, other"


def time_tasks(loop: asyncio.AbstractEventLoop) -> dict[str, float]:
    """CPU seconds of the loop's tasks from now on, by role (_label)."""
    cpu: dict[str, float] = collections.defaultdict(float)

    def factory(loop, coro, **kwargs):
        return asyncio.Task(_TimedCoroutine(coro, cpu, _label(coro)), loop=loop, **kwargs)
    loop.set_task_factory(factory)
    return cpu


def cpu_now() -> tuple[float, float, float]:
    """(wall, CPU of the process: every thread, CPU of this thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime + r.ru_stime, time.thread_time()


def bench_config(args, data_dir: str, prefix: str | None = None) -> Config:
    """The configuration of every stage: the default one, this fleet, a data dir of its own;
    over Kafka on this run's topic prefix. The daemon's status line stays quiet."""
    over: dict = {"data_dir": data_dir, "fleet": {"racks": args.racks, "seed": args.seed},
                  "daemon": {"status_interval_s": 3600.0}}
    if prefix is not None:
        over["kafka"] = {"bootstrap": args.bootstrap, "topic_prefix": prefix, "partitions": args.partitions}
    return load_config(env={}, overrides=over)


async def scrapes(cfg: Config, ticks: int, start: float) -> list[tuple[Topic, pa.RecordBatch]]:
    """What the simulate role emits for `ticks` scrapes (SimulatorSource, flat out), in its order."""
    sim = FleetSimulator(cfg.fleet, start=datetime.fromtimestamp(start, timezone.utc))
    source, stop, out = SimulatorSource(sim, 0.0), asyncio.Event(), []
    scraped = 0

    async def keep(topic: Topic, batch: pa.RecordBatch) -> None:
        nonlocal scraped
        out.append((topic, batch))
        scraped += topic == Topic.GPU
        if scraped >= ticks:
            stop.set()  # the source finishes this scrape's emits, then stops
    await source.run(keep, stop)
    return out


def counts(emitted: list[tuple[Topic, pa.RecordBatch]]) -> dict[str, int]:
    return {"gpu_samples": sum(b.num_rows for t, b in emitted if t == Topic.GPU),
            "facility_readings": sum(b.num_rows for t, b in emitted if t == Topic.FACILITY)}


async def child_produce(args) -> dict:
    """The source's side: simulate, then key, encode and publish (acks=all) through KafkaBus."""
    from pipeline.roles.context import Context
    from pipeline.sinks.console import Console
    cfg = bench_config(args, tempfile.mkdtemp(prefix="fw-bench-"), args.prefix)
    w0, c0, _ = cpu_now()
    emitted = await scrapes(cfg, args.ticks, args.start)
    w1, c1, _ = cpu_now()
    bus = KafkaBus.from_config(cfg.kafka, client_id="bench-simulate")
    await bus.start()
    ctx = Context(cfg, frozenset({"simulate"}), bus, asyncio.Event(), Console(open(os.devnull, "w")))
    emit = ctx.emitter("simulate")
    w2, c2, _ = cpu_now()
    for topic, batch in emitted:
        await emit(topic, batch)
    await bus.flush()
    w3, c3, _ = cpu_now()
    await bus.close()
    return {**counts(emitted), "simulate_cpu_s": c1 - c0, "simulate_wall_s": w1 - w0,
            "publish_cpu_s": c3 - c2, "publish_wall_s": w3 - w2}


async def child_consume(args) -> dict:
    """The daemon's roles `args.roles` in this process, over Kafka (args.prefix) or in-process
    (the scrapes queued first), draining the backlog as the daemon drains at a stop."""
    from pipeline.daemon import build_roles, drain, start_roles
    from pipeline.roles.context import Context
    from pipeline.sinks.console import Console
    roles = frozenset(args.roles.split(","))
    cfg = bench_config(args, tempfile.mkdtemp(prefix="fw-bench-"), args.prefix)
    kafka = args.prefix is not None
    queued = [] if kafka else await scrapes(cfg, args.ticks, args.start)
    bus = KafkaBus.from_config(cfg.kafka, client_id="bench-consumer") if kafka else \
        MemoryBus(queue_size=len(queued) + 8192)
    await bus.start()
    ctx = Context(cfg, roles, bus, asyncio.Event(), Console(open(os.devnull, "w")))
    running = build_roles(ctx)
    for topic, batch in queued:  # in-process: everything waits in the consumers' queues
        await ctx.emit(topic, batch)
    first: list[float] = []
    for sub in getattr(bus, "subscriptions", ()):  # over Kafka: when the first data comes (after joining)
        def note_first(get_batch=sub.get_batch):
            async def get(*a, **kw):
                got = await get_batch(*a, **kw)
                if got and not first:
                    first.append(time.perf_counter())
                return got
            return get
        sub.get_batch = note_first()
    tasks = time_tasks(asyncio.get_running_loop())
    w0, c0, t0 = cpu_now()
    await start_roles(ctx, running)
    taken = asyncio.create_task(all_taken(ctx, roles, args.expect))
    await drain(ctx, running)
    w1, c1, t1 = cpu_now()
    done = await taken
    tasks = dict(tasks)
    await bus.close()
    start = first[0] if first else w0
    out = {"wall_s": w1 - w0, "wall_from_first_s": w1 - start, "cpu_s": c1 - c0,
           "threads_cpu_s": (c1 - c0) - (t1 - t0), "tasks_cpu_s": tasks,
           # until every GPU sample was detected on and taken by the archive (without the end of the
           # stream: a consumer's last wait for more, the final flush), and the CPU until then
           "taken_s": (done[0] - start) if done else None, "taken_cpu_s": (done[1] - c0) if done else None}
    if ctx.engine is not None:
        out["detected_gpu_samples"] = ctx.engine.stats.gpu_samples
        out["alerts_fired"] = ctx.engine.stats.alerts_fired + (ctx.site_engine.stats.alerts_fired
                                                               if ctx.site_engine is not None else 0)
    if ctx.writer is not None:
        out["archived_rows"] = dict(ctx.writer.rows_written)
    if getattr(ctx, "notifier", None) is not None:
        out["notify"] = True
    out["dead_letters"] = getattr(bus, "dead_letters", 0)
    if queued:
        out.update(counts(queued))
    return out


async def all_taken(ctx, roles: frozenset[str], expect: int) -> tuple[float, float] | None:
    """(wall, process CPU) when detect has judged and the archive taken all `expect` GPU samples
    (polled every 5 ms; None without an expectation)."""
    if not expect:
        return None
    while True:
        detected = ctx.engine.stats.gpu_samples + ctx.engine.stats.late_samples if ctx.engine is not None else expect
        archived = ctx.progress.roles["archive"].rows.get("gpu_samples", 0) if "archive" in ctx.progress.roles \
            else 0 if "archive" in roles else expect
        if detected >= expect and archived >= expect:
            w, c, _ = cpu_now()
            return w, c
        await asyncio.sleep(0.005)


def child(args) -> None:
    import logging
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    result = asyncio.run(child_produce(args) if args.child == "produce" else child_consume(args))
    print("RESULT " + json.dumps(result))


def stage(args, what: str, prefix: str | None, roles: str = "", expect: int = 0) -> dict:
    """Run one stage in a fresh Python process; its RESULT line."""
    cmd = [sys.executable, __file__, "--child", what, "--racks", str(args.racks), "--ticks", str(args.ticks),
           "--seed", str(args.seed), "--start", repr(args.start), "--partitions", str(args.partitions),
           "--bootstrap", args.bootstrap or ""]
    if prefix is not None:
        cmd += ["--prefix", prefix]
    if roles:
        cmd += ["--roles", roles, "--expect", str(expect)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"stage {what} {roles} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def throughput(args) -> None:
    gpus = args.racks * 64
    rounds = []
    for r in range(args.rounds):
        prefix = f"bench{uuid.uuid4().hex[:6]}."
        produced = stage(args, "produce", prefix)
        samples = produced["gpu_samples"]  # (a GPU that fell off the bus sends none for a while)
        kafka = stage(args, "consume", prefix, "detect,archive", samples)
        base = stage(args, "consume", None, "detect,archive", samples)
        for name, res in (("kafka", kafka), ("baseline", base)):
            if res.get("detected_gpu_samples") != samples or res["archived_rows"].get("gpu_samples") != samples:
                raise RuntimeError(f"{name}: detected {res.get('detected_gpu_samples')}, archived "
                                   f"{res['archived_rows'].get('gpu_samples')} of {samples} GPU samples")
        rounds.append((produced, kafka, base))
        print(f"round {r + 1}: consumer {samples / kafka['taken_s']:,.0f} GPU samples/s, baseline "
              f"{samples / base['taken_s']:,.0f}: x{base['taken_s'] / kafka['taken_s']:.2f} "
              f"(CPU x{base['taken_cpu_s'] / kafka['taken_cpu_s']:.2f}; to the end of the drain "
              f"x{base['wall_s'] / kafka['wall_from_first_s']:.2f})", flush=True)
    produced, kafka, base = rounds[-1]
    samples = produced["gpu_samples"]
    values = samples * VALUES
    per_m = 1e6 / values
    print(f"\nfleet: {gpus} GPUs, {args.ticks} scrapes, {samples:,} GPU samples x {VALUES} metric values "
          f"(+ {produced['facility_readings']:,} facility readings); {args.partitions} partitions; "
          f"{os.cpu_count()} CPUs, the broker on the same machine")
    print(f"{'stage (one process each; the last round)':52s} {'GPU samples/s':>14s} {'values/s':>12s} "
          f"{'x baseline':>10s} {'CPU s':>7s} {'CPU s/M values':>15s}")
    print(f"{'produce: key, encode, publish (acks=all)':52s} {samples / produced['publish_wall_s']:14,.0f} "
          f"{values / produced['publish_wall_s']:12,.0f} {'':10s} {produced['publish_cpu_s']:7.2f} "
          f"{produced['publish_cpu_s'] * per_m:15.2f}")
    ratios = [b["taken_s"] / k["taken_s"] for _, k, b in rounds]
    for name, res in (("consume: detect + archive over Kafka, one process", kafka),
                      ("baseline: detect + archive in-process", base)):
        ratio = f"{np.median(ratios):10.2f}" if "Kafka" in name else f"{1:10.2f}"
        print(f"{name:52s} {samples / res['taken_s']:14,.0f} {values / res['taken_s']:12,.0f} {ratio} "
              f"{res['taken_cpu_s']:7.2f} {res['taken_cpu_s'] * per_m:15.2f}")
    print("(from the first message read to the last GPU sample detected on and taken by the archive; the median "
          "ratio of the rounds)")
    if args.rounds > 1:
        print("ratio per round: " + ", ".join(f"{x:.2f}" for x in ratios) +
              "; CPU ratio per round: " + ", ".join(f"{b['taken_cpu_s'] / k['taken_cpu_s']:.2f}" for _, k, b in rounds))
    for name, res in (("Kafka consumer", kafka), ("baseline", base)):
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(res["tasks_cpu_s"].items()))
        print(f"  {name}, to the end of the drain ({res['wall_from_first_s']:.1f} s, {res['cpu_s']:.2f} CPU s): "
              f"CPU s by task: {parts}; other threads (Parquet writes) {res['threads_cpu_s']:.2f}")

    if not args.roles_cpu:
        return
    # CPU per role, each in a process of its own, as `fleetwatch detect|archive|notify` run
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    produced2 = stage(args, "produce", prefix)
    samples = produced2["gpu_samples"]
    values = samples * VALUES
    per_m = 1e6 / values
    detect = stage(args, "consume", prefix, "detect", samples)
    archive = stage(args, "consume", prefix, "archive", samples)
    notify = stage(args, "consume", prefix, "notify")
    t = detect["tasks_cpu_s"]
    rack, site = t.get("detect rack tier", 0.0), t.get("detect site tier", 0.0)
    def rate(res: dict, key: str = "taken_s") -> float | None:
        return samples / res[key] if res.get(key) else None
    rows = [("simulate: the simulator alone (not a Fleetwatch cost in production)", produced2["simulate_cpu_s"],
             samples / produced2["simulate_wall_s"]),
            ("source: key, encode, publish (any source's bus side)", produced2["publish_cpu_s"],
             samples / produced2["publish_wall_s"]),
            ("detect process (both tiers, Kafka clients, all threads)", detect["cpu_s"], rate(detect)),
            ("  of which the rack tier's task (fetch, decode, align, gate, detect, publish)", rack, None),
            ("  of which the site tier's task", site, None),
            ("  of which the Kafka clients' tasks, other threads", detect["cpu_s"] - rack - site, None),
            ("archive process", archive["cpu_s"], rate(archive)),
            (f"notify process ({detect.get('alerts_fired', 0)} alerts)", notify["cpu_s"], None)]
    print(f"\nCPU per role, one process each, second backlog ({samples:,} GPU samples, {values:,} metric values); "
          f"GPU samples/s: wall, from its first message to its last sample taken:")
    print(f"{'role':80s} {'CPU s':>7s} {'CPU s/M values':>15s} {'GPU samples/s':>14s}")
    for name, cpu, wall in rows:
        print(f"{name:80s} {cpu:7.2f} {cpu * per_m:15.2f} {f'{wall:,.0f}' if wall else '':>14s}")
    fleet = 100_000 * VALUES  # values/s of 100,000 GPUs at 1 Hz
    print("(at this fleet's CPU per value: a fleet of few racks per partition pays more per value for its per-scrape "
          "costs than a large one; BENCHMARKS.md)")
    for name, cpu in (("detect", detect["cpu_s"]), ("archive", archive["cpu_s"]),
                      ("source bus side", produced2["publish_cpu_s"])):
        cores = fleet * cpu / values
        print(f"100,000 GPUs at 1 Hz ({fleet / 1e6:.1f} M values/s): {name} needs {cores:.1f} cores, "
              f"{int(np.ceil(cores / 0.6))} processes at 60% of a core each")


def ns(column: pa.Array) -> list[int]:
    return column.cast(pa.timestamp("ns", "UTC")).cast(pa.int64()).to_pylist()


class TimedPublisher:
    """The source's emit (the daemon's: roles/context.py, keyed and bundled as it does), noting
    when each scrape's first message went out."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.published_at: dict[int, float] = {}  # sample time (ns) -> wall clock

    async def emit(self, topic: Topic, batch: pa.RecordBatch) -> None:
        if topic == Topic.GPU and batch.num_rows:
            self.published_at.setdefault(ns(batch.column("ts"))[0], time.time())
        await self.ctx.emit(topic, batch)


async def live(bootstrap: str | None, racks: int, seconds: float, speed: float, commit_s: float) -> dict[str, float]:
    """Produce-to-alert latency and detect's lag at `speed` x real time: the detect role as the
    daemon builds it (over Kafka both tiers, the aligner, a transaction per input partition)."""
    from pipeline.daemon import build_roles, drain, start_roles
    from pipeline.roles.context import Context
    from pipeline.sinks.console import Console
    over = {"data_dir": tempfile.mkdtemp(prefix="fw-bench-live-"), "daemon": {"status_interval_s": 3600.0},
            "fleet": {"racks": racks, "speed": speed, "fault_interval_s": 2.0,
                      "faults": ["gpu_fell_off_bus", "ecc_uncorrectable", "coolant_leak", "pcie_replay_storm",
                                 "nvlink_crc_storm", "pdu_overload"]},
            "kafka": {"commit_interval_s": commit_s, "partitions": 6}}
    if bootstrap:
        over["kafka"].update(bootstrap=bootstrap, topic_prefix=f"live{uuid.uuid4().hex[:6]}.")
    cfg = load_config(env={}, overrides=over)
    bus = KafkaBus.from_config(cfg.kafka, client_id="bench-live") if bootstrap else MemoryBus()
    await bus.start()
    stop = asyncio.Event()
    ctx = Context(cfg, frozenset({"detect"}), bus, stop, Console(open(os.devnull, "w")))
    running = build_roles(ctx)
    sub = next(s for s in bus.subscriptions if s.group == "detect") if bootstrap else bus._subs[(Topic.GPU, "detect")]
    alerts_sub = bus.subscribe([Topic.ALERTS], "bench-alerts")
    timed = TimedPublisher(ctx)
    latencies, lags = [], []

    async def read_alerts() -> None:
        while True:
            try:
                got = await alerts_sub.get_batch(timeout_s=0.2)
            except EndOfStream:
                return
            now = time.time()
            for m in got:
                for status, ts in zip(m.value.column("status").to_pylist(), ns(m.value.column("starts_at"))):
                    if status == "firing" and ts in timed.published_at:
                        latencies.append(now - timed.published_at[ts])

    async def sample_lag() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.5)
            if bootstrap:
                tps = sub.consumer.assignment()
                committed = [await sub.consumer.committed(tp) or 0 for tp in tps]
                lags.append(sum((sub.consumer.highwater(tp) or 0) - c for tp, c in zip(tps, committed)))
            else:
                lags.append(sub.queue.qsize())

    # (whole seconds: an alert's start, in microseconds, then matches its scrape's time)
    source = SimulatorSource(FleetSimulator(cfg.fleet, start=datetime.fromtimestamp(int(time.time()), timezone.utc)),
                             speed)
    await start_roles(ctx, running)
    tasks = [asyncio.create_task(source.run(timed.emit, stop)), asyncio.create_task(read_alerts()),
             asyncio.create_task(sample_lag())]
    await asyncio.sleep(seconds)
    stop.set()
    await tasks[0]
    await drain(ctx, running)  # the source's topics end, detect finishes, its topics end
    await asyncio.gather(*tasks[1:])
    await bus.close()
    lat = np.array(latencies) * 1000
    return {"samples/s": source.stats()["gpu_samples"] / seconds, "alerts": len(lat),
            "p50 ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
            "p99 ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
            "lag p50": float(np.percentile(lags, 50)), "lag max": float(max(lags))}


def print_live(results: dict[str, dict[str, float]], racks: int, seconds: float, speed: float,
               commit_s: float) -> None:
    print(f"\nlive: {racks * 64} GPUs at {speed:g}x real time for {seconds:.0f} s, faults every 2 s; "
          f"detect commits every {commit_s:g} s")
    print(f"{'bus':40s} {'values/s':>10s} {'alerts':>7s} {'latency p50':>12s} {'p99':>9s} "
          f"{'lag p50 msgs':>13s} {'lag max':>8s}")
    for name, r in results.items():
        print(f"{name:40s} {r['samples/s'] * VALUES:10,.0f} {r['alerts']:7d} {r['p50 ms']:10.1f}ms "
              f"{r['p99 ms']:7.1f}ms {r['lag p50']:13.0f} {r['lag max']:8.0f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--racks", type=int, default=32)
    ap.add_argument("--ticks", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=1, help="throughput: produce, consume and baseline this often")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-roles-cpu", dest="roles_cpu", action="store_false",
                    help="skip the per-role CPU runs (a second backlog)")
    ap.add_argument("--live-seconds", type=float, default=60.0)
    ap.add_argument("--live-speed", type=float, default=1.0)
    ap.add_argument("--commit-interval", type=float, default=1.0, help="detect's kafka.commit_interval_s")
    ap.add_argument("--bootstrap")
    # a stage in its own process (throughput())
    ap.add_argument("--child", choices=("produce", "consume"), help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    ap.add_argument("--roles", default="", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--expect", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    # The scrapes end now: within the intake window (intake.max_age_s, max_ahead_s) of every stage.
    args.start = time.time() - args.ticks * 1.0
    broker = None
    if not args.bootstrap:
        from tests.services import KafkaBroker
        broker = KafkaBroker().start()
    bootstrap = args.bootstrap = args.bootstrap or broker.bootstrap
    try:
        if args.ticks > 0:
            throughput(args)
        if args.live_seconds > 0:
            results = {}
            for name, where in (("in-process (baseline)", None), ("Kafka (exactly-once detect)", bootstrap)):
                results[name] = asyncio.run(live(where, args.racks, args.live_seconds, args.live_speed,
                                                 args.commit_interval))
            print_live(results, args.racks, args.live_seconds, args.live_speed, args.commit_interval)
    finally:
        if broker is not None:
            broker.close()

if __name__ == "__main__":
    main()
