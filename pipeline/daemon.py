"""Runs the roles of one process over a bus until told to stop.

The roles are the rows of the role table (pipeline/roles/__init__.py): sources
(simulate, agent, the facility collector: sources/base.py), detect, and sinks
(archive, notify: sinks/base.py), and between them remediation, which acts on detect's
verdicts. `fleetwatch run` runs the configured source, the
collectors with something to read and every consumer, in one process over the
in-process bus; `fleetwatch simulate|agent|facility|detect|power|remediate|archive|notify` runs one
(Kafka between the processes; any number of detect, archive and notify processes
share the work through their consumer groups). A process builds only what its
roles need (roles/context.py): a notify-only process never builds the detector.

Shutdown (SIGINT, SIGTERM, SIGHUP or --duration) drains in data order: the sources
stop, then the collectors once what those sent them stopped arriving, their topics
end, detect finishes what it has and ends its topics, remediation finishes and ends
its topic, then the sinks finish and flush. A process without a source drains what was on the bus when it was told to
stop. Nothing accepted is dropped.

Beside the roles, `pipeline/ops` watches the process: /metrics, /healthz and /readyz on
daemon.http, Fleetwatch's alerts about itself, and systemd's notifications.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass

from pipeline.bus import Bus, MemoryBus
from pipeline.config import Config, ConfigError, Unavailable
from pipeline.ops.monitor import Operations
from pipeline import roles as registry
from pipeline.roles import (ACT, ACT_TOPICS, COLLECTOR, DETECT, DETECT_TOPICS, SINK, SOURCE, SOURCE_TOPICS, builder,
                            run_roles, whole)
from pipeline.roles.context import Context
from pipeline.roles.status import log_summary, status_role
from pipeline.sinks.console import Console
from pipeline.waits import unless_set

log = logging.getLogger("fleetwatch")


@dataclass
class RunSummary:
    gpu_samples: int          # processed by detect
    wall_s: float
    alerts_fired: int
    rows_archived: dict[str, int]
    gpu_samples_published: int = 0  # produced by the sources


def check_roles(cfg: Config, roles: frozenset[str]) -> None:
    """Each role's own needs (the facility role: a broker to read); roles apart need a bus
    between processes."""
    for spec in registry.ROLE_TABLE:
        if spec.name in roles and (problem := spec.check(cfg)):
            raise ConfigError(problem)
    if not whole(roles) and not cfg.kafka.bootstrap and cfg.daemon.source == "none" and "detect" in roles:
        raise ConfigError("daemon.source = none: `fleetwatch run` reads no source of its own; give --kafka HOST:PORT "
                          "(kafka.bootstrap), where the agents publish, or an MQTT broker (mqtt.broker)")
    if not whole(roles) and not cfg.kafka.bootstrap:
        raise ConfigError(f"the {'/'.join(sorted(roles))} role alone needs Kafka between the processes: "
                          f"give --kafka HOST:PORT (kafka.bootstrap), or use `fleetwatch run`")


SIGNAL_REPEAT_S = 3.0  # signals this close to the first are one stop request
DRAIN_SAY_S = 30.0     # a drain that takes longer says which roles it waits on, this often


class StopRequests:
    """SIGINT, SIGTERM and SIGHUP ask the daemon to stop: it drains the pipeline and exits 0.
    Signals within repeat_s of the first are that same request: `timeout` sends SIGTERM to the
    process and then to its process group, a terminal's Ctrl-C reaches every process of the
    foreground group, systemd and an operator may cross. A signal later than that is a
    deliberate second request: exit at once, without draining (on_signal says 'exit').
    `clock` is injectable (tests)."""

    def __init__(self, repeat_s: float = SIGNAL_REPEAT_S, clock=time.monotonic) -> None:
        self.repeat_s = repeat_s
        self.clock = clock
        self.first: float | None = None

    def on_signal(self) -> str:
        """'stop' (the first signal), 'same' (one within repeat_s of it) or 'exit' (a later one)."""
        now = self.clock()
        if self.first is None:
            self.first = now
            return "stop"
        return "same" if now - self.first < self.repeat_s else "exit"


@dataclass
class Running:
    """A role of this process, built and then started."""
    name: str
    stage: str
    work: object                        # a Source, or the consumer's coroutine function
    stop: asyncio.Event | None = None   # a source's stop request (a collector's is its own)
    task: asyncio.Task | None = None


def build_roles(ctx: Context) -> list[Running]:
    """Build the roles of ctx.roles, in the table's order; a role its configuration turns off is left out."""
    running = []
    for spec in registry.ROLE_TABLE:
        if spec.name not in ctx.roles:
            continue
        work = builder(spec)(ctx, spec)
        if work is None:
            continue
        if spec.stage in (SOURCE, COLLECTOR):
            ctx.sources[spec.name] = work
        running.append(Running(spec.name, spec.stage, work,
                               asyncio.Event() if spec.stage == COLLECTOR else ctx.stop if spec.stage == SOURCE
                               else None))
    return running


async def start_roles(ctx: Context, running: list[Running]) -> None:
    """Collectors first (each ready before the sources that send to it start), then the rest."""
    for r in sorted(running, key=lambda r: r.stage != COLLECTOR):
        work = r.work.run(ctx.emitter(r.name), r.stop) if r.stop is not None else r.work()
        r.task = asyncio.create_task(work, name=r.name)
        if r.stage == COLLECTOR and (ready := getattr(r.work, "ready", None)) is not None:
            await ready(r.task, ctx.cfg.kafka.connect_timeout_s, ctx.stop)


async def drain(ctx: Context, running: list[Running]) -> None:
    """Stop in data order (the module doc)."""
    def of(stage: str) -> list[Running]:
        return [r for r in running if r.stage == stage]
    await asyncio.gather(*(r.task for r in of(SOURCE)))
    for r in of(COLLECTOR):
        if of(SOURCE) and (settle := getattr(r.work, "settle", None)) is not None:
            await settle()  # what the sources sent it (over MQTT) is still arriving
        r.stop.set()
        await r.task
    await ctx.bus.end(SOURCE_TOPICS)
    for r in of(DETECT):
        await r.task
    await ctx.bus.end(DETECT_TOPICS)
    for r in of(ACT):
        await r.task
    await ctx.bus.end(ACT_TOPICS)
    await asyncio.gather(*(r.task for r in of(SINK)))


async def drain_saying(ctx: Context, running: list[Running], every_s: float | None = None) -> None:
    """drain(), saying every DRAIN_SAY_S which roles it still waits on: a stop held by a write to a
    hung disk had said nothing until its supervisor killed it."""
    every_s = DRAIN_SAY_S if every_s is None else every_s
    started = time.monotonic()
    draining = asyncio.create_task(drain(ctx, running))
    try:
        while not (await asyncio.wait({draining}, timeout=every_s))[0]:
            waiting = [r.name for r in running if r.task is not None and not r.task.done()]
            log.warning("stopping: still draining after %.0f s, waiting on role %s (a write to a hung disk, a "
                        "backlog to hand over); another SIGTERM or SIGINT exits at once without draining (unflushed "
                        "data is lost)", time.monotonic() - started, ", ".join(waiting) or "(the bus)")
    except asyncio.CancelledError:  # the drain with it, ended before this ends
        draining.cancel()
        await asyncio.wait({draining})
        raise
    await draining


async def cancel_all(tasks: list[asyncio.Task], round_s: float = 1.0) -> None:
    """Cancel `tasks` and wait until every one has ended. A task that swallowed its cancel
    (Python 3.11's wait_for can, when what it waits for completes at the same moment) is
    cancelled again each round: a failed role must end the process, never leave it hanging."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=round_s)
    for task in tasks:  # what they ended with was said by the caller or by the role itself
        if not task.cancelled():
            task.exception()


async def run_daemon(cfg: Config, duration_s: float | None = None, console: Console | None = None,
                     roles: frozenset[str] | None = None) -> RunSummary:
    roles = run_roles(cfg) if roles is None else roles
    check_roles(cfg, roles)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    requests = StopRequests()

    def on_signal(sig: signal.Signals) -> None:
        what = requests.on_signal()
        if what == "exit":  # a deliberate second request while draining: the user wants out now
            log.warning("%s again: exiting without draining; unflushed data is lost", sig.name)
            os._exit(130)
        if what == "same":
            log.info("%s: part of the same stop request (signals within %g s of the first are one)", sig.name,
                     requests.repeat_s)
            return
        log.info("%s: stopping (another signal, %g s or more from now, exits at once without draining)",
                 sig.name, requests.repeat_s)
        stop.set()
    # A SIGHUP ignored at start (nohup) stays ignored: a habitual `kill -HUP` "reload" must not stop it.
    signals = tuple(sig for sig in signals if sig != signal.SIGHUP or signal.getsignal(sig) != signal.SIG_IGN)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    console = console or Console()
    started = time.monotonic()
    bus: Bus | None = None
    ctx: Context | None = None
    summary = RunSummary(0, 0.0, 0, {})
    ops = Operations(cfg, roles)
    try:
        await ops.serve()  # probes answer while Kafka is reached and the kernels compile
        k = cfg.kafka
        if k.bootstrap:
            from pipeline.bus.acls import topics_used
            from pipeline.bus.kafka import KafkaBus
            bus = KafkaBus.from_config(k, topics=topics_used([registry.ROLE_SPECS[r] for r in roles]))
        else:
            bus = MemoryBus()
        if not await unless_set(bus.start(), stop):  # (a stop while Kafka is out of reach: nothing to drain)
            log.info("stopped while reaching Kafka at %s: no role had started", k.bootstrap)
            return summary
        ctx = Context(cfg, roles, bus, stop, console)
        if "detect" in roles:  # compiled (or loaded) off the loop, which answers the probes meanwhile: a cache
            from pipeline.detect import kernels  # that missed had blocked it for minutes (a liveness kill)
            await asyncio.to_thread(kernels.warm_up)
        running = build_roles(ctx)
        log.info("fleetwatch running %s: %s, bus %s, archive %s, alerts %s",
                 "all roles" if whole(roles) else "role " + "/".join(sorted(roles)), ctx.describe_sources(),
                 f"Kafka at {k.bootstrap}" if k.bootstrap else "in-process", cfg.archive.url or cfg.archive_dir,
                 cfg.alerts_log)
        await start_roles(ctx, running)
        ops.attach(ctx, running)
        status = asyncio.create_task(status_role(ctx, cfg.daemon.status_interval_s), name="status")
        everything = [r.task for r in running]
        stopper = asyncio.create_task(stop.wait())
        timer = asyncio.create_task(asyncio.sleep(duration_s if duration_s is not None else 1e12))
        done, _ = await asyncio.wait([*everything, stopper, timer], return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        timer.cancel()
        failed = [t for t in done & set(everything) if t.exception() is not None]
        if failed:  # a role died: say which (setup errors say it themselves), stop the rest, exit non-zero
            if not isinstance(failed[0].exception(), (ConfigError, Unavailable)):
                log.error("role %s failed: %r", failed[0].get_name(), failed[0].exception())
            for r in running:
                if r.stop is not None:
                    r.stop.set()
            await cancel_all([*everything, status])
            raise failed[0].exception()
        log.info("stopping: draining the pipeline and flushing the archive")
        await ops.stopping()
        await drain_saying(ctx, running)
        await status
    finally:
        await ops.close()
        if bus is not None:
            await bus.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
        console.close()
    summary.wall_s = time.monotonic() - started
    if ctx.engine is not None:
        summary.gpu_samples, summary.alerts_fired = ctx.engine.stats.gpu_samples, ctx.engine.stats.alerts_fired
    summary.rows_archived = dict(ctx.writer.rows_written) if ctx.writer is not None else {}
    summary.gpu_samples_published = ctx.gpu_samples_published()
    log_summary(ctx, summary)
    return summary
