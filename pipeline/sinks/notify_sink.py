"""Alert delivery as a sink (sinks/base.py): the alerts topic -> the Notifier (sinks/notify.py).

The offsets are committed once the console, alerts.jsonl, the receivers' outboxes and
the routing state have a batch (until then the alerts topic is the outbox). A disk
that cannot take them (full, read-only) stops nothing: the batch is tried again with
backoff until it can, and nothing is committed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pipeline.bus.base import Message
from pipeline.model import alert_rows
from pipeline.sinks.base import SinkBase, consume
from pipeline.sinks.heartbeats import Heartbeats
from pipeline.sinks.notify import Notifier

log = logging.getLogger("fleetwatch")


class NotifySink(SinkBase):
    def __init__(self, notifier: Notifier, retry_max_s: float = 30.0, heartbeats: Heartbeats | None = None) -> None:
        self.notifier, self.retry_max_s = notifier, retry_max_s
        self.heartbeats = heartbeats or Heartbeats(notifier.cfg.daemon.watchdog_heartbeat_s)
        self.alerts: list[dict] = []
        self.taken = False  # a batch was added since the last flush (it may have no alerts left)

    async def start(self) -> None:
        await self.notifier.start()
        # A Watchdog firing before a restart: its process must go on beating, or it resolves.
        self.heartbeats.seed(self.notifier.firing_at_start)

    def wait_s(self) -> float:
        return self.heartbeats.wait_s()  # input or not, look at the heartbeats this often

    def add(self, messages: list[Message]) -> bool:
        # Heartbeats (repeats of a firing Watchdog) change nothing; a Watchdog whose beats stopped resolves.
        self.alerts += self.heartbeats.take([a for m in messages for a in alert_rows(m.value)])
        self.alerts += self.heartbeats.expired()
        self.taken |= bool(messages) or bool(self.alerts)
        return self.taken  # every batch is made durable before the next is read

    async def flush(self) -> bool:
        if not self.taken:
            return True
        alerts, self.alerts, self.taken = self.alerts, [], False
        delay, failed_since = 0.5, None
        while True:
            try:
                await self.notifier.handle(alerts, retry=failed_since is not None)
                break
            except OSError as e:
                if failed_since is None:
                    failed_since = time.monotonic()
                    log.error("notify: cannot write alerts.jsonl or the outboxes under %s (%s): %d alert "
                              "changes shown on the console wait to be made durable and sent; retrying with "
                              "backoff. Free space or fix permissions there", self.notifier.data,
                              e.strerror or e, len(alerts))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
        if failed_since is not None:
            log.warning("notify: writing again after %.0f s; the held alert changes are durable and on their way",
                        time.monotonic() - failed_since)
        return True

    async def close(self) -> None:
        await self.notifier.close()


async def notify_role(sub, notifier: Notifier, gate=None, retry_max_s: float = 30.0) -> None:
    """Alerts in, delivered (see the module doc), until the alerts topic ends."""
    await consume(sub, NotifySink(notifier, retry_max_s), gate)


def preflight(cfg, env=None, warn: bool = True) -> None:
    """Before notify starts: receivers (URLs, names, secrets, CA files), inhibit rules, external URL."""
    from pipeline.sinks.routing import inhibit_rules
    from pipeline.sinks.webhook import check_url, load_receivers
    load_receivers(cfg.alerts, env, warn=warn)
    inhibit_rules(cfg.alerts)
    if cfg.alerts.external_url:
        check_url("alerts.external_url", cfg.alerts.external_url)


def build(ctx, spec):
    """The notify role: its Notifier (receivers checked now: ConfigError before anything runs)."""
    cfg = ctx.cfg
    notifier = ctx.notifier = Notifier(cfg, ctx.console if cfg.alerts.console else None)
    sub = ctx.bus.subscribe(list(spec.inputs), spec.group)
    gate = ctx.gate(sub, spec.group)
    return lambda: notify_role(sub, notifier, gate)
