"""The operations side of one process, as the daemon sees it: `Operations`.

    ops = Operations(cfg, roles)
    await ops.serve()             # HTTP (daemon.http) and the monitor start, before the bus and the warm-up
    ops.attach(ctx, running)      # the roles are built (warm) and started: judge them from now on
    await ops.stopping()          # stop requested: resolve the self-alerts before the alerts topic ends
    await ops.close()

The monitor wakes every TICK_S: it samples what needs awaiting (Kafka's reachability and
consumer lag, the MQTT links), judges health (ops/health.py), publishes self-alert state
changes on the alerts topic (ops/selfalerts.py; in a task of their own, so a full bus never
holds the monitor up) where one of the process's roles writes that topic (detect, power,
remediate, the archive, the facility collector: an agent's or the DCGM source's user needs
no right to write alerts, bus/acls.py; their own alerts are on their /metrics, and their
silence is NodeNotReporting), and tells systemd (ops/sdnotify.py): READY=1 once ready, WATCHDOG=1
while live. A blocked event loop sends nothing, and answers no probe.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

from pipeline.bus.base import Topic
from pipeline.bus.in_order import InOrder
from pipeline.bus.memory import MemoryBus
from pipeline.config import Config, host_port, read_secret
from pipeline.ops.health import LOOP_LIVE_S, TICK_S, Health, RoleInfo
from pipeline.ops.metrics import FleetwatchCollector, registry
from pipeline.ops.progress import Progress
from pipeline.ops.sdnotify import SdNotify
from pipeline.ops.selfalerts import STALLED, SelfAlerts, message
from pipeline.roles import ROLE_SPECS

log = logging.getLogger("fleetwatch")
# The health check's awaits (Kafka's reachability and lag) end within this, well inside LOOP_LIVE_S: the
# beat and systemd's watchdog go on while a broker is slow (it had taken 12 s, and the watchdog killed).
SAMPLE_TIMEOUT_S = LOOP_LIVE_S / 2



def http_token(cfg: Config, env: Mapping[str, str] | None = None) -> bytes | None:
    """The bearer token of the daemon's HTTP routes that change things (ConfigError where the setting
    names one that is not there; None: none set)."""
    return read_secret("daemon.http_token", cfg.daemon.http_token_env, cfg.daemon.http_token_file,
                       "the bearer token", "remove daemon.http_token_env to take changes from this host only", env)


class Operations:
    def __init__(self, cfg: Config, roles: frozenset[str], clock: Callable[[], float] = time.monotonic,
                 env: Mapping[str, str] | None = None) -> None:
        self.cfg, self.roles, self.clock = cfg, roles, clock
        self.health = Health(Progress(clock), cfg.daemon.stall_intervals, clock)
        self.sd = SdNotify(env)
        self.ctx = None
        self._collectors: list = []  # before attach: nothing but the build info of a starting process
        self.http = None
        host = socket.gethostname()
        if cfg.daemon.http:
            from pipeline.ops.http import HttpServer
            token = http_token(cfg, env)
            self.http = HttpServer(cfg.daemon.http, registry(lambda: self._collectors),
                                   lambda: self.health.unlive(self.clock()), lambda: self.health.unready(self.clock()),
                                   token)
        # Which process raised a self-alert: the address Prometheus scrapes it at, else the host and pid.
        self.instance = f"{host}:{host_port('daemon.http', cfg.daemon.http, 9410)[1]}" if cfg.daemon.http \
            else f"{host}/{os.getpid()}"
        site = cfg.fleet.site
        if len(roles) == 1 and (own := getattr(getattr(cfg, next(iter(roles)), None), "site", "")):
            site = own  # an agent's (or a DCGM scraper's) own site
        self.alerts = SelfAlerts(site, self.instance, cfg.alerts.runbook_base_url, watchdog="detect" in roles,
                                 resolve_after=cfg.daemon.stall_intervals, heartbeat_s=cfg.daemon.watchdog_heartbeat_s)
        self.publishes = any(Topic.ALERTS in ROLE_SPECS[r].outputs for r in roles if r in ROLE_SPECS)
        self._task: asyncio.Task | None = None
        self._publishing = InOrder("ops-alerts")
        self._stopping = False
        self._ready_since: float | None = None
        self._last_watchdog = float("-inf")
        self._said_unready: tuple[str, ...] = ()
        self._said_slow = False
        self.sample_timeout_s = SAMPLE_TIMEOUT_S

    # ---- the daemon's calls ------------------------------------------------------------

    async def serve(self) -> None:
        if self.http is not None:
            await self.http.start()
        self._task = asyncio.create_task(self._run(), name="ops-monitor")

    def attach(self, ctx, running) -> None:
        """The roles are built and started: `running` is the daemon's list (name, stage, work, task)."""
        from pipeline.roles import CONSUMER_STAGES
        self.ctx = ctx
        if self.http is not None:
            self.http.routes = ctx.routes  # what the roles serve (the power role's requests)
        h = self.health
        h.progress = ctx.progress
        h.in_process = isinstance(ctx.bus, MemoryBus)
        h.archive, h.flush_interval_s = ctx.writer, self.cfg.archive.flush_interval_s
        infos = []
        for r in running:
            consumer = r.stage in CONSUMER_STAGES
            deps = () if h.in_process else ("kafka",)
            if not consumer and mqtt_links(r.work):
                deps += ("mqtt",)
            infos.append(RoleInfo(r.name, consumer, 0.0 if consumer else interval_s(self.cfg, r.name), deps, r.task,
                                  paced=r.name in ROLE_SPECS and ROLE_SPECS[r.name].paced))
        h.attach(infos)
        ctx.collectors.append(FleetwatchCollector(ctx, ctx.progress, h, ctx.window().now,
                                                  lambda: list(self.alerts.firing.values())))
        self._collectors = ctx.collectors

    async def stopping(self) -> None:
        """The process was told to stop: not ready any more, self-alerts resolved (sent before it drains)."""
        self._stopping = self.health.stopping = True
        self.sd.stopping()
        if self.ctx is not None:
            self._publish(self.alerts.resolve_all())
        await self._publishing.drained(5.0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.http is not None:
            await self.http.close()

    # ---- the monitor --------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as e:  # the monitor must never take the process down
                log.exception("ops monitor: %r", e)
            await asyncio.sleep(TICK_S)

    async def tick(self) -> None:
        """One round: sample, judge, alert, notify systemd (tests call it directly)."""
        self.health.loop_beat = self.clock()
        if self.ctx is not None and not self._stopping:
            await self.sample()
            now = self.clock()
            unready = self.health.unready(now)
            changes = self.alerts.update(not unready, self.health.stalls(now))
            self._say(unready, changes)
            self._publish(changes)
            self._publish(self.alerts.heartbeats(), heartbeat=True)
        now = self.clock()
        if self.sd.enabled:
            if self._ready_since is None and self.ctx is not None and not self.health.unready(now):
                self.sd.ready()
            if not self.health.unlive(now) and now - self._last_watchdog >= self.sd.watchdog_interval_s:
                self.sd.watchdog()
                self._last_watchdog = now
        if self._ready_since is None and self.ctx is not None and not self.health.unready(now):
            self._ready_since = now

    async def sample(self) -> None:
        """What needs awaiting: Kafka's reachability and lag, each within sample_timeout_s (a slow
        broker, each of its partitions answering within 1 s one after another, must not stop the
        beat); the MQTT links; then the backlogs."""
        ctx, progress = self.ctx, self.health.progress
        if not isinstance(ctx.bus, MemoryBus):
            reachable = await self._bounded(ctx.bus.reachable(), "whether it is reachable")
            progress.deps["kafka"] = bool(reachable)  # (no answer in time: unreachable, for readiness)
            lag = await self._bounded(ctx.bus.lag(), "the consumers' lag")
            if lag is not None:
                progress.lag = lag
            if reachable is not None and lag is not None and self._said_slow:
                log.info("ops monitor: Kafka answers the health check in time again")
                self._said_slow = False
        links = [ok for work in ctx.sources.values() for ok in mqtt_links(work)]
        if links:
            progress.deps["mqtt"] = all(links)
        self.health.sample_backlogs()

    async def _bounded(self, check, what: str):
        try:
            return await asyncio.wait_for(check, self.sample_timeout_s)
        except TimeoutError:
            if not self._said_slow:
                log.warning("ops monitor: Kafka did not say %s within %g s: taken as unreachable until it does",
                            what, self.sample_timeout_s)
            self._said_slow = True
            return None

    def _publish(self, alerts: list, heartbeat: bool = False) -> None:
        if not alerts or not self.publishes:
            return
        bus = self.ctx.bus

        async def publish() -> None:
            for a in alerts:
                try:
                    await bus.publish(message(a, heartbeat))
                except Exception as e:
                    log.error("ops: cannot publish %s (%s): %r", a.alertname, a.status, e)
        self._publishing.then(publish)

    def _say(self, unready: list[str], changes: list) -> None:
        """Log what changed: readiness (once per change of reasons) and each self-alert."""
        if tuple(unready) != self._said_unready and self._ready_since is not None:
            if unready:
                log.warning("not ready: %s", "; ".join(unready))
            else:
                log.info("ready again")
        elif self._ready_since is None and not unready:
            log.info("ready: warmed up, every role read or published, its brokers reachable")
        self._said_unready = tuple(unready)
        for a in changes:
            if a.alertname == STALLED:
                (log.warning if a.ends_at is None else log.info)(
                    "%s %s: %s", a.alertname, "firing" if a.ends_at is None else "resolved", a.annotations["summary"])


def interval_s(cfg: Config, role: str) -> float:
    """A source's scrape interval in wall seconds: its section's interval_s, the simulator's
    sample interval at its speed (0 when flat out), the fleet's for the rest."""
    if role == "simulate":
        return cfg.fleet.sample_interval_s / cfg.fleet.speed if cfg.fleet.speed > 0 else 0.0
    return float(getattr(getattr(cfg, role, None), "interval_s", cfg.fleet.sample_interval_s))


def mqtt_links(work) -> list[bool]:
    """Whether each MQTT connection of a source is up: the facility collector's subscription,
    the simulator's BMS publisher."""
    out = []
    collector = getattr(work, "collector", None)
    if collector is not None and hasattr(collector, "subscribed"):
        out.append(collector.subscribed.is_set())
    bms = getattr(work, "bms", None)
    if bms is not None:
        out.append(bool(getattr(bms, "connected", False)))
    return out
