"""The process's Prometheus metrics (docs/operations.md, Metrics), collected at scrape time.

`FleetwatchCollector.collect()` runs on the event loop (ops/http.py), between two steps of
the roles, and reads what they count already: the progress counters (ops/progress.py), the
intake gates, the archive's writer, the notifier's deliveries, the detector's trackers and
node health, and the latest GPU batches and power readings detect read. Nothing is kept
in a global registry: each process renders its own `CollectorRegistry` over
`Context.collectors`, where roles add theirs (the NVML agent's DCGM-named GPU metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline import __version__
from pipeline.bus import intake
from pipeline.model import PointKind, point_kind
from pipeline.ops.health import Health
from pipeline.ops.progress import Progress

INTAKE_REASONS = (intake.NULL_FIELD, intake.EMPTY_IDENTITY, intake.OUT_OF_RANGE, intake.VALUE_OUT_OF_RANGE,
                  intake.BAD_TIMESTAMP, intake.TIME_AHEAD, intake.TOO_OLD, intake.BAD_ALERT, intake.DETECTOR_ERROR)
GPU_LABELS = ["site", "rack", "node", "gpu", "UUID"]


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels or [])


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


class FleetwatchCollector(Collector):
    """`ctx`: the process's Context (roles/context.py); `wall`: the receiver's clock (unix
    seconds; the simulator's where it runs in this process), for event-time lag; `own_alerts()`:
    the process's firing self-alerts."""

    def __init__(self, ctx: Any, progress: Progress, health: Health, wall: Callable[[], float],
                 own_alerts: Callable[[], Iterable] = tuple) -> None:
        self.ctx, self.progress, self.health, self.wall, self.own_alerts = ctx, progress, health, wall, own_alerts

    def collect(self) -> Iterator[Metric]:
        yield from self._process()
        yield from self._ingest()
        if self.progress.detect_seconds is not None:
            yield from self.progress.detect_seconds.collect()
        yield from self._archive()
        yield from self._notify()
        yield from self._dead_letters()
        yield from self._alerts()
        yield from self._fleet()

    # ---- the process and its roles ------------------------------------------------------

    def _process(self) -> Iterator[Metric]:
        info = _gauge("fleetwatch_build_info", "1, labelled with the running version", ["version"])
        info.add_metric([__version__], 1)
        yield info
        up = _gauge("fleetwatch_up", "1 while the role's loop runs", ["role"])
        now = self.health.clock()
        hung = self.health.hung(now)
        for r in self.health.roles:
            running = r.task is None or not r.task.done()
            up.add_metric([r.name], 1 if running and r.name not in hung else 0)
        yield up

    def _ingest(self) -> Iterator[Metric]:
        rows = _counter("fleetwatch_samples_ingested_total", "rows a role produced (a source) or read (a consumer)",
                        ["role", "dataset"])
        values = _counter("fleetwatch_values_ingested_total", "metric values in those rows", ["role"])
        lag = _gauge("fleetwatch_event_time_lag_seconds", "now minus the newest sample's timestamp",
                     ["role", "dataset"])
        now = self.wall()
        for name, p in self.progress.roles.items():
            for dataset, n in p.rows.items():
                rows.add_metric([name, dataset], n)
            values.add_metric([name], p.values)
            for dataset, ns in p.newest_ns.items():
                lag.add_metric([name, dataset], now - ns / 1e9)
        consumer = _gauge("fleetwatch_consumer_lag_messages", "Kafka: end offset minus position",
                          ["group", "topic", "partition"])
        for (group, topic, partition), n in sorted(self.progress.lag.items()):
            consumer.add_metric([group, topic, str(partition)], n)
        yield from (rows, values, lag, consumer)

    # ---- sinks --------------------------------------------------------------------------

    def _archive(self) -> Iterator[Metric]:
        w = self.ctx.writer
        if w is None:
            return
        since = w.last_durable if w.last_durable is not None else self.health.started
        if since is not None:
            age = _gauge("fleetwatch_archive_last_flush_age_seconds",
                         "seconds since the archive last made its data durable")
            age.add_metric([], max(0.0, self.health.clock() - since))
            yield age
        files = _counter("fleetwatch_archive_files_written_total", "Parquet files written", ["dataset"])
        rows = _counter("fleetwatch_archive_rows_written_total", "rows written", ["dataset"])
        for dataset, n in w.rows_written.items():
            rows.add_metric([dataset], n)
            files.add_metric([dataset], w.files_by_dataset.get(dataset, 0))
        yield from (files, rows)

    def _notify(self) -> Iterator[Metric]:
        n = self.ctx.notifier
        if n is None:
            return
        pending = _gauge("fleetwatch_outbox_pending", "notifications waiting in the receiver's outbox", ["receiver"])
        dead = _counter("fleetwatch_notifications_dead_lettered_total", "notifications given up on", ["receiver"])
        for name, d in sorted(n.deliveries.items()):
            pending.add_metric([name], d.outbox.pending)
            dead.add_metric([name], d.stats.dead_lettered)
        yield from (pending, dead)

    def _dead_letters(self) -> Iterator[Metric]:
        counts: dict[tuple[str, str], int] = {}
        for g in self.ctx.gates:  # every reason of every gate, 0 until one happens
            for reason in (*INTAKE_REASONS, *g.rejected):
                counts[(g.group, reason)] = counts.get((g.group, reason), 0) + g.rejected.get(reason, 0)
        # Kafka: messages that did not decode, of the consumer groups and the listeners (`listen:<topic>`)
        for sub in (*getattr(self.ctx.bus, "subscriptions", ()), *getattr(self.ctx.bus, "listeners", ())):
            counts[(sub.group, "undecodable")] = counts.get((sub.group, "undecodable"), 0) + sub.dead_letters
        for name, source in self.ctx.sources.items():  # the MQTT collector's rejected messages
            collector = getattr(source, "collector", None)
            stats = getattr(collector, "stats", None)
            if isinstance(getattr(stats, "dead_letters", None), dict):
                from pipeline.sources.bms_tree import Reason
                for reason in (*Reason, *stats.dead_letters):
                    counts[(name, str(reason))] = stats.dead_letters.get(reason, 0)
        if counts:
            m = _counter("fleetwatch_dead_letters_total", "rows or messages rejected at intake", ["group", "reason"])
            for (group, reason), n in sorted(counts.items()):
                m.add_metric([group, reason], n)
            yield m

    # ---- detect ----------------------------------------------------------------------

    def _alerts(self) -> Iterator[Metric]:
        """Alerts firing now in this process: detect's, the archive's outage alert, the
        process's own (ops/selfalerts.py); 0 for each it can raise that does not fire."""
        from pipeline.detect.catalog import ALERTS_BY_NAME
        counts: dict[str, int] = {"FleetwatchStalled": 0}
        engine, writer = self.ctx.engine, self.ctx.writer
        if engine is not None:
            counts["FleetwatchWatchdog"] = 0
            for tier in (engine, self.ctx.site_engine):
                for name, tr in (tier.trackers.items() if tier is not None else ()):
                    counts[name] = counts.get(name, 0) + len(tr.active)
        if writer is not None:
            counts["FleetwatchArchiveFailing"] = int(writer.outage is not None and writer.outage.alert is not None)
        for alert in self.own_alerts():
            counts[alert.alertname] = counts.get(alert.alertname, 0) + 1
        firing = _gauge("fleetwatch_alerts_firing", "alerts firing now (detect, and Fleetwatch's own)",
                        ["alertname", "severity"])
        for name, n in counts.items():
            firing.add_metric([name, ALERTS_BY_NAME[name].severity], n)
        yield firing
        if engine is not None:
            late = _counter("fleetwatch_late_samples_total", "rows behind their series' newest by more than "
                            "detect.lateness_s: archived, not detected on", [])
            late.add_metric([], engine.stats.late_samples)
            yield late
            bad = _counter("fleetwatch_bad_quality_readings_total", "facility readings their BMS marked bad or "
                           "uncertain (quality not 1): archived, not detected on", [])
            bad.add_metric([], engine.stats.bad_quality)
            yield bad
            fenced = _counter("fleetwatch_partitions_fenced_total", "partitions this process lost to a newer owner "
                              "while it held them (a frozen process that woke up): nothing of them was committed", [])
            fenced.add_metric([], sum(getattr(sub, "fenced", 0) for sub in getattr(self.ctx.bus, "subscriptions", ())))
            yield fenced
            nodes = _gauge("fleetwatch_nodes", "nodes per health state", ["state"])
            for state, n in engine.health.counts(len(engine.node_names)).items():
                nodes.add_metric([state], n)
            yield nodes

    def _fleet(self) -> Iterator[Metric]:
        if self.ctx.engine is None:
            return
        yield from gpu_gauges(self.progress.fleet.gpu_batches())
        yield from power_gauges(self.progress.fleet.power_readings(), self.ctx.cfg)


def gpu_gauges(batches: Iterable) -> Iterator[Metric]:
    """Each GPU's latest temperature, margin to its HW slowdown threshold and power (the
    first batch a GPU is in is its latest)."""
    temp = _gauge("fleetwatch_gpu_temperature_celsius", "latest GPU temperature (detect)", GPU_LABELS)
    margin = _gauge("fleetwatch_gpu_slowdown_margin_celsius", "HW slowdown threshold minus temperature", GPU_LABELS)
    power = _gauge("fleetwatch_gpu_power_watts", "latest GPU power", GPU_LABELS)
    seen: set[str] = set()
    for b in batches:
        cols = [b.column(c).to_pylist() for c in ("site", "rack", "node", "gpu", "gpu_uuid", "gpu_temp_c",
                                                   "slowdown_temp_c", "power_w")]
        for site, rack, node, gpu, uuid, t, slowdown, w in zip(*cols):
            if uuid in seen:
                continue
            seen.add(uuid)
            labels = [site, rack, node, str(gpu), uuid]
            if t is not None:
                temp.add_metric(labels, t)
                if slowdown is not None:
                    margin.add_metric(labels, slowdown - t)
            if w is not None:
                power.add_metric(labels, w)
    yield from (temp, margin, power)


def power_gauges(readings: list[tuple[str, str, str, float]], cfg) -> Iterator[Metric]:
    """Each rack's PDU power (with its rating) and each site's meter (with its cap, if set)."""
    racks: dict[tuple[str, str], float] = {}
    sites: dict[str, float] = {}
    for site, rack, cls, w in readings:  # read by device class, as the detectors read it
        kind = point_kind(cls, "power_w")
        if kind == PointKind.SITE_POWER:
            sites[site] = sites.get(site, 0.0) + w
        elif kind == PointKind.PDU_POWER:
            racks[(site, rack)] = racks.get((site, rack), 0.0) + w
    rack_w = _gauge("fleetwatch_rack_power_watts", "the rack PDU's power", ["site", "rack"])
    rating = _gauge("fleetwatch_rack_power_rating_watts", "the PDU's rating (fleet.pdu_rating_w)", ["site", "rack"])
    for (site, rack), w in sorted(racks.items()):
        rack_w.add_metric([site, rack], w)
        rating.add_metric([site, rack], cfg.fleet.pdu_rating_w)
    site_w = _gauge("fleetwatch_site_power_watts", "the site meter's power", ["site"])
    cap = _gauge("fleetwatch_site_power_cap_watts", "detect.site_power_cap_w (absent when 0)", ["site"])
    for site, w in sorted(sites.items()):
        site_w.add_metric([site], w)
        if cfg.detect.site_power_cap_w > 0:
            cap.add_metric([site], cfg.detect.site_power_cap_w)
    yield from (rack_w, rating, site_w, cap)


class Collectors(Collector):
    """Every collector of `source()` (the Context's list, which roles extend while they build);
    a metric with no sample now (Kafka's consumer lag in-process, no site cap) is left out."""

    def __init__(self, source: Callable[[], list]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        for c in list(self.source()):
            yield from (m for m in c.collect() if m.samples)


def registry(source: Callable[[], list]) -> CollectorRegistry:
    """A registry of its own for this process (never prometheus_client's global one)."""
    r = CollectorRegistry(auto_describe=False)
    r.register(Collectors(source))
    return r
