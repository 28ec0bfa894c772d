"""The remediation role: reads the alerts (and, for the breaker's shares, which nodes exist
from the GPU samples), drives each failing node's case (pipeline/remediate/), publishes every
transition on the remediation topic (archived as remediation_events) and its own alerts
(RemediationBreakerOpen, RemediationDrainOverdue) on the alerts topic.

Its state (open cases, the guardrails' history, alerts firing) is saved to
<data_dir>/state/remediation.json after every round that changed it, and read back at start
(remediate/store.py): a restarted role goes on with its cases. `fleetwatch remediation status`
reads the same file.
One remediation process per site: it is a decision maker, not a worker to scale out.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import pyarrow.compute as pc

from pipeline.bus import EndOfStream, Message, Topic
from pipeline.bus.base import HEARTBEAT
from pipeline.bus.in_order import InOrder
from pipeline.config import Config, ConfigError
from pipeline.remediate import store
from pipeline.model import alerts_to_batch
from pipeline.remediate.cases import AlertChange, events_to_batch
from pipeline.remediate.remediator import Remediator

log = logging.getLogger("pipeline.remediate")


def make_remediator(cfg: Config) -> Remediator:
    """The backend and validation the configuration names, the state saved last."""
    from pipeline.remediate.backends import backend_for
    from pipeline.remediate.validate import validation_for
    rem = Remediator(cfg, backend_for(cfg), validation_for(cfg))
    store.load(cfg, rem)
    return rem


def preflight(cfg: Config, env=None, warn: bool = True) -> None:
    """A backend that is asked for but cannot be used fails at start, not at the first fault."""
    from pipeline.remediate.backends import backend_for
    backend_for(cfg)
    if not cfg.remediate.dry_run and cfg.remediate.backend == "none":
        raise ConfigError("remediate.dry_run = false needs remediate.backend (slurm, command): with none there is "
                          "nothing to apply remediations through")


def build(ctx, spec):
    cfg = ctx.cfg
    rem = make_remediator(cfg)
    sub = ctx.bus.subscribe(list(spec.inputs), spec.group)
    gate = ctx.gate(sub, spec.group)
    log.info("remediation: %s, backend %s, %d alertnames allowed, %d open cases", "dry-run (plans only)"
             if rem.dry_run else "applying", cfg.remediate.backend, len(rem.allowed), len(rem.cases))
    ctx.remediator = rem
    return lambda: remediate_role(rem, sub, gate, ctx.emit, ctx.window().now, store.saver(cfg, rem),
                                  cfg.kafka.commit_interval_s)


def nodes_of(batch) -> dict[str, str]:
    """node -> rack of a GPU batch (a few distinct pairs per batch)."""
    pairs = pc.unique(pc.binary_join_element_wise(batch.column("node"), batch.column("rack"), "\x00"))
    return dict(p.split("\x00", 1) for p in pairs.to_pylist())


async def remediate_role(rem: Remediator, sub, gate, emit, now, save, commit_interval_s: float) -> None:
    """Read, step, publish, save; until the alerts end."""
    next_commit = time.monotonic() + commit_interval_s
    # The role reads the alerts topic it publishes on: in-process, waiting for room in its own full
    # queue (a slow backend call while the bus ran on) would never end.
    alerting = InOrder("remediation-alerts")
    while True:
        try:
            messages = await sub.get_batch(max_messages=4096, timeout_s=min(rem.rc.interval_s, 1.0))
        except EndOfStream:
            break
        changes: list[AlertChange] = []
        for m in await gate.screen(messages):
            changes.extend(_read(rem, m))
        # A backend call may block (a subprocess): off the loop. A dry-run step calls nothing.
        events, alerts = rem.step(now(), changes) if rem.dry_run else await asyncio.to_thread(rem.step, now(), changes)
        if events:
            await emit(Topic.REMEDIATION, events_to_batch(events))
        if alerts:
            alerting.then(functools.partial(emit, Topic.ALERTS,
                                            alerts_to_batch([(a.ends_at or a.starts_at, a) for a in alerts])))
        if events or alerts or changes:
            await asyncio.to_thread(save)
        if time.monotonic() >= next_commit:
            await sub.commit()
            next_commit = time.monotonic() + commit_interval_s
    await alerting.drained()
    await asyncio.to_thread(save)
    await sub.commit()


def _read(rem: Remediator, m: Message) -> list[AlertChange]:
    if m.topic == Topic.GPU:
        rem.see(nodes_of(m.value))
        return []
    if HEARTBEAT in m.headers:
        return []
    return AlertChange.rows(m.value)
