"""What a process tells its operator: the live status line (a terminal) or periodic log
lines, and the summary when it stops. Each part shows only for the roles the process runs."""

from __future__ import annotations

import logging
import time

from pipeline import roles as registry
from pipeline.roles import whole
from pipeline.roles.context import Context
from pipeline.waits import wait_set

log = logging.getLogger("fleetwatch")


def status_text(ctx: Context, rate: float) -> str:
    roles, engine, writer, notifier = ctx.roles, ctx.engine, ctx.writer, ctx.notifier
    published = ctx.gpu_samples_published()
    parts = ["fleetwatch"]
    if "simulate" in roles:
        parts.append(f"sim {ctx.simulator().now:%Y-%m-%d %H:%M:%S}")
    scraping = any(spec.stage == registry.SOURCE and spec.name in roles - {"simulate"} for spec in registry.ROLE_TABLE)
    if scraping and "detect" not in roles:
        parts.append(f"{published:,} GPU samples scraped")
    if "detect" in roles:
        h = engine.health.counts(len(engine.node_names))
        parts += [f"{rate:,.0f} GPU samples/s",
                  f"alerts firing {len(engine.active_alerts())} (raised {engine.stats.alerts_fired})",
                  f"nodes healthy {h['healthy']} suspect {h['suspect']} failing {h['failing']}"]
    elif "simulate" in roles:
        parts.append(f"{published:,} GPU samples published")
    if "archive" in roles and not whole(roles):
        parts.append(f"{sum(writer.rows_written.values()) if writer is not None else 0:,} rows archived")
    if writer is not None and writer.outage is not None and (
            trouble := writer.outage.status(writer.held_rows(), sum(writer.rows_dropped.values()))):
        parts.append(trouble)
    if notifier is not None and notifier.deliveries:
        d = notifier.stats
        parts.append(f"alerts delivered {d.delivered} pending {d.pending}"
                     + (f" dead-lettered {d.dead_lettered}" if d.dead_lettered else ""))
    return "  ".join(parts)


async def status_role(ctx: Context, interval_s: float) -> None:
    console = ctx.console
    period = 1.0 if console.tty else interval_s

    def processed() -> int:
        return ctx.engine.stats.gpu_samples if ctx.engine is not None else 0
    last_n, last_t = processed(), time.monotonic()
    while not ctx.stop.is_set():
        await wait_set(ctx.stop, period)
        now = time.monotonic()
        rate = (processed() - last_n) / max(now - last_t, 1e-9)
        last_n, last_t = processed(), now
        text = status_text(ctx, rate)
        if console.tty:
            console.status(text)
        else:
            log.info(text)


def log_summary(ctx: Context, summary) -> None:
    """The log lines at the end of a run: what was done, what went wrong, per role."""
    engine, writer, bus = ctx.engine, ctx.writer, ctx.bus
    invalid = engine.stats.invalid_values if engine is not None else {}
    log.info("stopped after %.1f s: %d GPU samples published, %d GPU samples, %d alerts raised, %d rows archived "
             "in %d files, %d invalid values skipped%s, %d messages dead-lettered, %d redelivered messages already "
             "archived%s", summary.wall_s, summary.gpu_samples_published, summary.gpu_samples, summary.alerts_fired,
             sum(summary.rows_archived.values()), writer.files_written if writer is not None else 0,
             sum(invalid.values()), f" {invalid}" if invalid else "",
             bus.dead_letters if bus is not None else 0, writer.redelivered_skipped if writer is not None else 0,
             f", producer outbox peak {bus.outbox_peak_bytes / 2**20:.1f} MB, {bus.delivery_failures} messages "
             f"Kafka rejected" if hasattr(bus, "outbox_peak_bytes") else "")
    if writer is not None and writer.outage is not None and (writer.outage.failures
                                                             or any(writer.rows_dropped.values())):
        log.warning("archive: %d failed write attempts in %d outages, %d rows dropped%s", writer.outage.failures,
                    writer.outage.outages, sum(writer.rows_dropped.values()),
                    f" {({k: v for k, v in writer.rows_dropped.items() if v})}" if any(writer.rows_dropped.values())
                    else "")
    for source in ctx.sources.values():
        if (report := getattr(source, "report", None)) is not None:
            report(log)
    for g in ctx.gates:
        if g.rejected:
            log.warning("%s: %d rows rejected at intake %s, dead-lettered to %s", g.group, sum(g.rejected.values()),
                        g.rejected, g.dead_letters.where)
