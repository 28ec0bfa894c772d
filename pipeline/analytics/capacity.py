"""`fleetwatch capacity`: where the fleet's GPU capacity went over a period, and the site's
power against its connection capacity.

Read from the archive (gpu_samples, facility_samples, alerts, node_health; on local disk or
archive.url's Delta tables) with polars (the full install's reader; DuckDB is only a test
dependency), by column name, so files of older schema versions in the same folder read with
the newer columns null (analytics/archive.py). A dataset that is missing or empty counts as
no data.

Each GPU sample stands for its GPU's sample interval: the median, over the GPU's 10-minute
stretches in the period, of their samples' mean spacing. Gaps thus count nothing; they are
what the GPU did not report. A sample is, in this order:

  - faulted: its node was failing (node_health: a critical alert on the node or one of its
    GPUs; a drained node gives no work), or a critical detector alert of GPU or node scope
    (the catalog's) fired on the GPU or its node;
  - idle: utilisation under power.planner.IDLE_UTIL (an idle GPU under a cap costs nothing);
  - capped: busy with an enforced power_limit_w more than 1 W under its default limit (the
    highest limit of its node in the period and the `DEFAULT_LOOKBACK` before it, as the
    straggler detector reads it: a node capped for all of a short period is still capped); the work
    lost is the sample's time x (1 - curve(min(cap, D)) / curve(D)), with the recorded H100's
    curve (power/curve.py) scaled to the GPU's default limit and D the GPU's mean draw
    while productive in the period (its default limit where it never was);
  - productive: the rest, and the work capped GPUs still did.

The period is what was asked, within the archive's GPU data (from its first sample to its
last plus one interval). Every GPU that reported in the period is expected for all of it:
the time its samples do not cover is faulted while a fault alert or a failing node holds the
GPU (it fell off the bus, its node went silent), `not_reporting` otherwise (a GPU silent for
the whole period is not seen). So total = GPUs x hours = productive + capped_lost + faulted + idle + not_reporting.

The site's power is its meter's (facility_samples: metric power_w of a device of class meter,
good quality), as 1-minute means summed over sites; the capacity factor is their average over
the connection capacity (`detect.site_power_cap_w` per site; 0 = unknown).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.analytics.archive import Place, dataset, place, reading
from pipeline.detect.catalog import DETECTOR_ALERTS
from pipeline.model import iso_utc
from pipeline.power.planner import IDLE_UTIL

DATASETS = ("gpu_samples", "facility_samples", "alerts", "node_health")
# What takes a GPU out of service: critical alerts the detectors raise on a GPU or a node (warnings
# such as a straggler or a cap that does not bind leave it working; rack and site alerts have their
# own runbooks and do not mark nodes failing either).
FAULT_ALERTS = tuple(a.name for a in DETECTOR_ALERTS if a.severity == "critical" and a.scope in ("gpu", "node"))
CAPPED_MARGIN_W = 1.0  # a limit this far under the default is a cap (detect/families/power_caps.py)
INTERVAL_BUCKET = "10m"  # stretches of samples whose mean spacing estimates a GPU's interval
DEFAULT_LOOKBACK = timedelta(days=7)  # a node's default limit is also read this long before the period
SITE_BUCKET = "1m"     # site power statistics are of 1-minute means (several meters add up per minute)
GPU_KEY = ["site", "node", "gpu"]
HOURS = ("productive", "faulted", "capped_lost", "idle", "not_reporting")  # these add up to the total


@dataclass
class SitePower:
    sites: int = 0                 # sites with meter readings in the period
    avg_kw: float = 0.0
    p95_kw: float = 0.0
    max_kw: float = 0.0            # of 1-minute means
    max_reading_kw: float = 0.0    # the highest single meter reading
    capacity_kw: float = 0.0       # detect.site_power_cap_w x sites; 0 = unknown
    metered_hours: float = 0.0     # minutes with readings, in hours
    energy_mwh: float = 0.0        # avg_kw x metered_hours

    @property
    def capacity_factor_pct(self) -> float | None:
        return 100.0 * self.avg_kw / self.capacity_kw if self.capacity_kw > 0 and self.sites else None


@dataclass
class CapacityReport:
    start: datetime | None         # the period read; with no GPU data, what was asked (None: not given)
    end: datetime | None
    gpus: int = 0
    sample_interval_s: float = 0.0  # median over GPUs of their intervals
    productive: float = 0.0         # GPU-hours, each; productive includes what capped GPUs still did
    capped: float = 0.0             # busy under a cap (of which capped_lost was lost)
    capped_lost: float = 0.0
    faulted: float = 0.0
    idle: float = 0.0
    not_reporting: float = 0.0
    site: SitePower = field(default_factory=SitePower)
    top_faulted: list[dict[str, Any]] = field(default_factory=list)  # nodes with the most faulted GPU-hours
    missing: list[str] = field(default_factory=list)  # datasets with no files
    # the archive's first and last GPU sample, whatever the period (a period it has nothing of says where it is)
    archived: tuple[datetime, datetime] | None = None

    @property
    def hours(self) -> float:
        return (self.end - self.start).total_seconds() / 3600.0 if self.start and self.end else 0.0

    @property
    def total(self) -> float:
        return sum(getattr(self, k) for k in HOURS)

    def shares_pct(self) -> dict[str, float]:
        total = self.total
        return {k: round(100.0 * getattr(self, k) / total, 2) if total > 0 else 0.0 for k in HOURS}

    def to_json(self) -> dict[str, Any]:
        s = self.site
        cf = s.capacity_factor_pct
        return {
            "from": iso_utc(self.start) if self.start else None,
            "to": iso_utc(self.end) if self.end else None,
            "hours": round(self.hours, 4),
            "gpus": self.gpus,
            "sample_interval_s": round(self.sample_interval_s, 3),
            "gpu_hours": {"total": round(self.total, 3), **{k: round(getattr(self, k), 3) for k in
                                                            ("productive", "faulted", "capped_lost", "capped",
                                                             "idle", "not_reporting")}},
            "shares_pct": self.shares_pct(),
            "site": {"sites": s.sites, "avg_kw": round(s.avg_kw, 2), "p95_kw": round(s.p95_kw, 2),
                     "max_kw": round(s.max_kw, 2), "max_reading_kw": round(s.max_reading_kw, 2),
                     "capacity_kw": round(s.capacity_kw, 2),
                     "capacity_factor_pct": None if cf is None else round(cf, 2),
                     "metered_hours": round(s.metered_hours, 3), "energy_mwh": round(s.energy_mwh, 3)},
            "top_faulted": self.top_faulted,
            "missing": self.missing,
            "archived": None if self.archived is None else {"first": iso_utc(self.archived[0]),
                                                            "last": iso_utc(self.archived[1])},
        }


# ---- reading -----------------------------------------------------------------------------


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _units(per_gpu) -> list[int]:
    """Per GPU slot (site, node, index): its physical position, one for two slots that held the same GPU (its
    UUID) one after the other (a node renamed, a GPU moved to an empty slot: one GPU expected for the period,
    not two: a renamed node's GPUs had been counted twice, and each name's time without them as not
    reporting, 23% of a fleet's capacity for 4%); slots that reported at once are two positions whatever
    passed between them (GPUs swapped, one moved and both slots refilled). A slot's GPUs replaced are one."""
    parent = list(range(per_gpu.height))
    seen = list(zip(per_gpu["seen_from"].to_list(), per_gpu["seen_to"].to_list()))
    apart = timedelta(minutes=10)  # (a rename's old and new name may overlap by a scrape or two)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    holders: dict[str, list[int]] = {}
    for i, uuids in enumerate(per_gpu["uuids"].to_list()):
        for u in uuids or ():
            for j in holders.setdefault(u, []):
                (a0, a1), (b0, b1) = seen[i], seen[j]
                if a0 >= b1 - apart or b0 >= a1 - apart:
                    parent[root(i)] = root(j)
            holders[u].append(i)
    return [root(i) for i in range(per_gpu.height)]


def newest(where: Place) -> datetime | None:
    """The last GPU sample's time (one column read)."""
    import polars as pl
    g = dataset(where, "gpu_samples")
    if g is None:
        return None
    t = g.select(pl.col("ts").max()).collect().item()
    return _utc(t) if t is not None else None


def report(where: Place | str, since: datetime | None = None, until: datetime | None = None,
           site_power_cap_w: float = 0.0, curve=None) -> CapacityReport:
    """The capacity report of the archive at `where` (`<data_dir>/archive`, or archive.url's
    Delta tables: analytics/archive.py's place) over [since, until) (None: from the first
    sample, to the last)."""
    import polars as pl
    where = Path(where) if isinstance(where, str) else where
    frames = {name: dataset(where, name) for name in DATASETS}
    missing = [name for name, f in frames.items() if f is None]
    since = _utc(since) if since else None
    until = _utc(until) if until else None

    archived = None

    def empty() -> CapacityReport:  # no GPU data in the period: the site's power over what was asked
        return CapacityReport(since, until, site=_site_power(frames["facility_samples"], since, until,
                                                             site_power_cap_w), missing=missing, archived=archived)

    g = frames["gpu_samples"]
    if g is None:
        return empty()
    history = g
    # The archive's own bounds: time before it began, or after its last write, is not the fleet's.
    bounds = g.select(pl.col("ts").min().alias("first"), pl.col("ts").max().alias("last")).collect()
    first, last = bounds["first"][0], bounds["last"][0]
    if first is None:
        return empty()
    archived = (_utc(first), _utc(last))
    g = within(g, since, until).select("ts", *GPU_KEY, "gpu_uuid", "power_w", "util_gpu", "power_limit_w")

    # The interval: per GPU and 10 minutes, the mean spacing of its samples; per GPU, the median of
    # those: robust to the stretches with gaps or a stray early sample, and no sort of every
    # sample (a median of every difference sorts them all in memory). A GPU with no such stretch
    # (sampled every 10 minutes or less often) takes its mean spacing over the period.
    spacing = (pl.col("last") - pl.col("first")).dt.total_nanoseconds() / (pl.col("n") - 1)
    per_gpu = (g.group_by(*GPU_KEY, pl.col("ts").dt.truncate(INTERVAL_BUCKET).alias("bucket"))
               .agg(pl.len().alias("n"), pl.col("ts").min().alias("first"), pl.col("ts").max().alias("last"),
                    pl.col("power_limit_w").max().alias("top_w"), pl.col("gpu_uuid").unique().alias("uuids"))
               .group_by(GPU_KEY)
               .agg(spacing.filter((pl.col("n") > 1) & (spacing > 0)).median().alias("interval_ns"),
                    ((pl.col("last").max() - pl.col("first").min()).dt.total_nanoseconds()
                     / (pl.col("n").sum() - 1)).alias("mean_ns"),
                    pl.col("n").sum(), pl.col("top_w").max(), pl.col("uuids").explode().drop_nulls().unique(),
                    pl.col("first").min().alias("seen_from"), pl.col("last").max().alias("seen_to"))
               .with_columns(pl.col("interval_ns").fill_null(pl.when(pl.col("mean_ns") > 0).then(pl.col("mean_ns"))))
               .collect(engine="streaming"))
    if per_gpu.height == 0:
        return empty()
    # A GPU with a single sample in the period takes the fleet's interval.
    fleet_ns = per_gpu["interval_ns"].median()
    per_gpu = per_gpu.with_columns(pl.col("interval_ns").fill_null(fleet_ns).fill_null(0.0),
                                   pl.Series("unit", _units(per_gpu)))
    interval_s = float(per_gpu["interval_ns"].median()) / 1e9

    start = max(_utc(first), since) if since else _utc(first)
    end_data = datetime.fromtimestamp(_utc(last).timestamp() + interval_s, timezone.utc)
    end = min(end_data, until) if until else end_data
    if end <= start:
        return empty()

    site = _site_power(frames["facility_samples"], start, end, site_power_cap_w)
    faults = _fault_intervals(frames["alerts"], frames["node_health"], start, end)
    # Each node's default limit: the highest it enforced in the period or the week before (a period
    # inside a long event is capped all along). Per node, not per model: a site may run some nodes
    # at a lower limit of its own, and a node never seen above a limit in all that time holds it.
    window = within(history, start - DEFAULT_LOOKBACK, end)
    node_default = (window.group_by("site", "node").agg(pl.col("power_limit_w").max().alias("default_w"))
                    .collect(engine="streaming").lazy())
    busy = pl.col("util_gpu").is_null() | (pl.col("util_gpu") >= IDLE_UTIL)
    capped = pl.col("power_limit_w") < pl.col("default_w") - CAPPED_MARGIN_W
    s = g.join(node_default, on=["site", "node"], how="left")
    s = _mark_faulted(s, g, faults)
    s = s.with_columns(
        pl.when(pl.col("faulted")).then(pl.lit("faulted"))
        .when(~busy).then(pl.lit("idle"))
        .when(capped.fill_null(False)).then(pl.lit("capped"))
        .otherwise(pl.lit("productive")).alias("cls"))
    # Per GPU, class and limit (caps vary over time): a small table; the curve applies to it.
    # One pass over the samples, joined only to small tables; a mean streams, a median would hold
    # every value.
    counts = (s.group_by(*GPU_KEY, "cls", pl.when(pl.col("cls") == "capped").then(pl.col("power_limit_w"))
                         .alias("cap_w"))
              .agg(pl.len().alias("n"), pl.col("default_w").first(), pl.col("power_w").mean().alias("mean_w"))
              .collect(engine="streaming"))
    # The draw a capped GPU would have: its mean while productive (busy, uncapped, not faulted).
    draw = counts.filter(pl.col("cls") == "productive").select(*GPU_KEY, pl.col("mean_w").alias("draw_w"))
    t = (counts.join(per_gpu.select(*GPU_KEY, "interval_ns", "unit"), on=GPU_KEY, how="left")
         .join(draw, on=GPU_KEY, how="left")
         .with_columns((pl.col("n") * pl.col("interval_ns") / 3.6e12).alias("h")))

    t = t.with_columns(pl.Series("lost_frac", _cap_loss(t, curve)))
    # Each GPU is expected for the whole period; what its samples cover beyond that (the last
    # sample's interval past a requested end, timing jitter) is scaled away, so the hours add up.
    period_h = (end - start).total_seconds() / 3600.0
    covered = t.group_by("unit").agg(pl.col("h").sum().alias("covered_h"))
    t = (t.join(covered, on="unit")
         .with_columns((pl.col("h") * pl.min_horizontal(pl.lit(1.0), period_h / pl.col("covered_h"))).alias("h")))
    by_cls = dict(t.group_by("cls").agg(pl.col("h").sum()).iter_rows())
    capped_h = by_cls.get("capped", 0.0)
    lost_h = float((t["h"] * t["lost_frac"]).sum())
    # Time a GPU did not report while a fault held it (it fell off the bus, its node went silent:
    # GpuFellOffBus, GpuNotReporting, NodeNotReporting are fault alerts) was lost to the fault.
    per = (t.group_by(*GPU_KEY, "unit")
           .agg(pl.col("h").sum().alias("reported_h"), pl.col("h").filter(pl.col("cls") == "faulted").sum()
                .alias("faulted_h"))
           .join(_fault_cover(faults, per_gpu.select(GPU_KEY), start, end), on=GPU_KEY, how="left")
           .with_columns(pl.col("reported_h").sum().over("unit").alias("unit_h"))
           .with_columns(pl.min_horizontal((pl.col("cover_h").fill_null(0.0) - pl.col("faulted_h")).clip(0.0),
                                           (period_h - pl.col("unit_h")).clip(0.0)).alias("silent_h"))
           .with_columns((pl.col("faulted_h") + pl.col("silent_h")).alias("gpu_hours")))
    silent_h = float(per["silent_h"].sum())
    gpus = per_gpu["unit"].n_unique()
    reported_h = sum(by_cls.values())
    top = (per.filter(pl.col("gpu_hours") > 0).group_by("site", "node").agg(pl.col("gpu_hours").sum())
           .sort(["gpu_hours", "node"], descending=[True, False]).head(5))
    return CapacityReport(
        start, end, gpus, interval_s,
        productive=by_cls.get("productive", 0.0) + capped_h - lost_h, capped=capped_h, capped_lost=lost_h,
        faulted=by_cls.get("faulted", 0.0) + silent_h, idle=by_cls.get("idle", 0.0),
        not_reporting=max(0.0, gpus * period_h - reported_h - silent_h), site=site,
        top_faulted=[{"site": r["site"], "node": r["node"], "gpu_hours": round(r["gpu_hours"], 3)}
                     for r in top.iter_rows(named=True)],
        missing=missing, archived=archived)


def _cap_loss(t, curve) -> np.ndarray:
    """Per row of capped samples, the share of the work lost; 0 for other rows."""
    if curve is None:
        from pipeline.power.curve import from_recording
        curve = from_recording()
    cap = t["cap_w"].fill_null(np.nan).to_numpy().astype(np.float64)
    default = t["default_w"].fill_null(np.nan).to_numpy().astype(np.float64)
    draw = t["draw_w"].fill_null(np.nan).to_numpy().astype(np.float64)
    draw = np.where(np.isnan(draw), default, np.fmin(draw, default))
    scale = curve.max_limit_w / default  # the H100's curve, stretched to this GPU's default limit
    with np.errstate(invalid="ignore", divide="ignore"):
        full = curve.at(np.nan_to_num(draw * scale))
        kept = curve.at(np.nan_to_num(np.fmin(cap, draw) * scale)) / full
        lost = np.clip(1.0 - kept, 0.0, 1.0)
    return np.where(np.isnan(cap) | np.isnan(default) | ~np.isfinite(lost), 0.0, lost)


def _fault_intervals(alerts, health, start: datetime, end: datetime):
    """(site, node, gpu or null for the whole node, start, end) of every fault overlapping the period."""
    import polars as pl
    cols = {"site": pl.String, "node": pl.String, "fgpu": pl.Int16,
            "fstart": pl.Datetime("us", "UTC"), "fend": pl.Datetime("us", "UTC")}
    parts = [pl.DataFrame(schema=cols)]
    if alerts is not None:
        # One episode per fingerprint and start (an alert that fires again is a new episode);
        # one still firing at its last record lasts to the end of the period.
        a = (alerts.filter(pl.col("alertname").is_in(FAULT_ALERTS) & pl.col("node").is_not_null()
                           & (pl.col("starts_at") < end))
             .group_by("fingerprint", "starts_at")
             .agg(pl.col("site").first(), pl.col("node").first(), pl.col("gpu").first(), pl.col("ends_at").max())
             .select("site", "node", pl.col("gpu").cast(pl.Int16, strict=False).alias("fgpu"),
                     pl.col("starts_at").alias("fstart"), pl.col("ends_at").alias("fend")))
        parts.append(a.collect().cast(cols))
    if health is not None:
        # A node's state holds from its row to the node's next row.
        h = (health.filter(pl.col("ts") < end).sort("ts")
             .with_columns(pl.col("ts").shift(-1).over("site", "node").alias("fend"))
             .filter(pl.col("state") == "failing")
             .select("site", "node", pl.lit(None, pl.Int16).alias("fgpu"), pl.col("ts").alias("fstart"), "fend"))
        parts.append(h.collect().cast(cols))
    out = pl.concat(parts)
    return out.filter(pl.col("fend").is_null() | (pl.col("fend") > start))


def _fault_cover(faults, gpus, start: datetime, end: datetime):
    """Per GPU, the hours within the period that a fault held it (the union of its own and its
    node's fault intervals)."""
    import polars as pl
    return (gpus.join(faults, on=["site", "node"])
            .filter(pl.col("fgpu").is_null() | (pl.col("fgpu") == pl.col("gpu")))
            .with_columns(pl.max_horizontal("fstart", pl.lit(start)).alias("fstart"),
                          pl.min_horizontal(pl.col("fend").fill_null(end), pl.lit(end)).alias("fend"))
            .filter(pl.col("fend") > pl.col("fstart"))
            .sort(*GPU_KEY, "fstart")
            # an interval that starts after every earlier one ended begins a new run of overlaps
            .with_columns((pl.col("fstart") > pl.col("fend").cum_max().shift(1)).fill_null(True)
                          .over(GPU_KEY).alias("new"))
            .with_columns(pl.col("new").cum_sum().over(GPU_KEY).alias("run"))
            .group_by(*GPU_KEY, "run").agg(pl.col("fstart").min(), pl.col("fend").max())
            .group_by(GPU_KEY)
            .agg(((pl.col("fend") - pl.col("fstart")).dt.total_nanoseconds().sum() / 3.6e12).alias("cover_h")))


def within(frame, since: datetime | None, until: datetime | None):
    """The rows of [since, until) (None: open), by their time and by their day's partition: the day reaches
    the scan, which reads only that period's files (by time alone, an archive of years read every footer)."""
    import polars as pl
    if since:
        frame = frame.filter((pl.col("date") >= since.date()) & (pl.col("ts") >= since))
    if until:
        frame = frame.filter((pl.col("date") <= until.date()) & (pl.col("ts") < until))
    return frame


def _mark_faulted(s, g, faults):
    """Adds `faulted` to the samples `s`: the faulted ones' keys are found first, in the samples
    `g` of the nodes that had a fault only, and joined as a small table."""
    import polars as pl
    if faults.height == 0:
        return s.with_columns(pl.lit(False).alias("faulted"))
    # Keyed by the sample (GPU and time), not a row number: joins need not keep row order.
    key = [*GPU_KEY, "ts"]
    nodes = faults.select("site", "node").unique().lazy()
    hit = (g.select(key).join(nodes, on=["site", "node"], how="semi")
           .join(faults.lazy(), on=["site", "node"])
           .filter((pl.col("ts") >= pl.col("fstart")) & (pl.col("fend").is_null() | (pl.col("ts") < pl.col("fend")))
                   & (pl.col("fgpu").is_null() | (pl.col("fgpu") == pl.col("gpu"))))
           .select(key).unique().with_columns(pl.lit(True).alias("faulted"))
           .collect(engine="streaming"))
    return s.join(hit.lazy(), on=key, how="left").with_columns(pl.col("faulted").fill_null(False))


def _site_power(facility, since: datetime | None, until: datetime | None, cap_w: float) -> SitePower:
    import polars as pl
    if facility is None:
        return SitePower(capacity_kw=cap_w / 1000.0)
    f = within(facility, since, until).filter((pl.col("metric") == "power_w") & (pl.col("device_class") == "meter")
                                              & (pl.col("quality") == 1) & pl.col("value").is_not_null())
    minutes = (f.group_by("site", "device", pl.col("ts").dt.truncate(SITE_BUCKET).alias("minute"))
               .agg(pl.col("value").mean())
               .group_by("minute").agg(pl.col("value").sum().alias("w"), pl.col("site").n_unique().alias("sites")))
    peak = f.select(pl.col("value").max().alias("max_w"), pl.col("site").n_unique().alias("sites"))
    minutes, peak = pl.collect_all([minutes, peak], engine="streaming")
    sites = int(peak["sites"][0] or 0)
    if minutes.height == 0:
        return SitePower(capacity_kw=cap_w / 1000.0)
    w = minutes["w"]
    avg = float(w.mean()) / 1000.0
    return SitePower(sites=sites, avg_kw=avg, p95_kw=float(w.quantile(0.95, "linear")) / 1000.0,
                     max_kw=float(w.max()) / 1000.0, max_reading_kw=float(peak["max_w"][0]) / 1000.0,
                     capacity_kw=cap_w * sites / 1000.0, metered_hours=minutes.height / 60.0,
                     energy_mwh=avg * minutes.height / 60.0 / 1000.0)


# ---- output ------------------------------------------------------------------------------


def text(r: CapacityReport) -> str:
    """A table a shift lead reads."""
    lines = []
    if r.gpus == 0:
        lines.append("no GPU samples in the archive for this period"
                     + (f" (missing: {', '.join(r.missing)})" if r.missing else "")
                     + (f"; it holds GPU samples from {r.archived[0]:%Y-%m-%d %H:%M:%S} to "
                        f"{r.archived[1]:%Y-%m-%d %H:%M:%S} UTC" if r.archived else ""))
    else:
        lines.append(f"fleet capacity {r.start:%Y-%m-%d %H:%M:%S} -> {r.end:%Y-%m-%d %H:%M:%S} UTC "
                     f"({r.hours:.2f} h), {r.gpus} GPUs, sample interval {r.sample_interval_s:g} s")
        shares = r.shares_pct()
        rows = [("productive", r.productive, shares["productive"]),
                ("  of which under caps", r.capped - r.capped_lost, None),
                ("lost to caps", r.capped_lost, shares["capped_lost"]),
                ("faulted", r.faulted, shares["faulted"]),
                ("idle", r.idle, shares["idle"]),
                ("not reporting", r.not_reporting, shares["not_reporting"]),
                ("total", r.total, 100.0 if r.total > 0 else 0.0)]
        lines.append(f"{'':22}{'GPU-hours':>11}{'share':>9}")
        for name, h, pct in rows:
            lines.append(f"{name:22}{h:11.2f}" + (f"{pct:8.1f}%" if pct is not None else ""))
        if r.top_faulted:
            lines.append("most faulted: " + ", ".join(f"{x['node']} {x['gpu_hours']:.2f} GPU-h" for x in r.top_faulted))
    s = r.site
    if s.sites == 0:
        lines.append("site power: no site meter readings in this period")
    else:
        lines.append(f"site power (meter, 1-minute means): avg {s.avg_kw:.1f} kW, p95 {s.p95_kw:.1f} kW, "
                     f"max {s.max_kw:.1f} kW (highest reading {s.max_reading_kw:.1f} kW); {s.energy_mwh:.3f} MWh "
                     f"over {s.metered_hours:.2f} h")
        cf = s.capacity_factor_pct
        lines.append(f"connection capacity {s.capacity_kw:.1f} kW: capacity factor {cf:.1f}%" if cf is not None else
                     "connection capacity unknown: set detect.site_power_cap_w for the capacity factor")
    if r.missing and r.gpus:
        lines.append(f"no data in the archive for: {', '.join(r.missing)}")
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------


def add_parser(sub) -> argparse.ArgumentParser:
    """`fleetwatch capacity`, on the CLI's subparsers."""
    cp = sub.add_parser("capacity", help="where the fleet's GPU capacity went over a period, and the site's power "
                                         "against its connection capacity")
    cp.add_argument("--config", metavar="FILE", help="TOML config file (see docs/configuration.md)")
    cp.add_argument("--data-dir", metavar="DIR", help="the daemon's data_dir")
    period_options(cp, "the whole archive")
    cp.add_argument("--json", action="store_true", help="the report as JSON")
    return cp


def period_options(p: argparse.ArgumentParser, default: str) -> None:
    """--since, --from, --to: a period of the archive (`period`)."""
    p.add_argument("--since", metavar="DURATION",
                   help="the last 24h, 7d, ... (from the newest data if the archive is ahead of the clock, as a "
                        f"simulation's is); default: {default}")
    p.add_argument("--from", dest="start", metavar="TIME", help="start, ISO 8601 (UTC unless it says otherwise)")
    p.add_argument("--to", dest="end", metavar="TIME", help="end, ISO 8601 (default: the archive's last data)")


def period(args: argparse.Namespace, where: Place) -> tuple[datetime | None, datetime | None]:
    """The period `period_options` asked for: (since, until), None where not given."""
    from pipeline.config import ConfigError
    from pipeline.sinks.silences import parse_duration
    if args.since and args.start:
        raise ConfigError("--since and --from: give one of them")
    since = _iso("--from", args.start) if args.start else None
    until = _iso("--to", args.end) if args.end else None
    if args.since:
        seconds = parse_duration(args.since, "--since")
        ref = until or max([datetime.now(timezone.utc), *filter(None, [newest(where)])])
        since = datetime.fromtimestamp(ref.timestamp() - seconds, timezone.utc)
    if since and until and until <= since:
        raise ConfigError(f"--to {args.end}: must be after the start ({iso_utc(since)})")
    return since, until


def _iso(flag: str, text: str) -> datetime:
    from pipeline.config import ConfigError
    try:
        return _utc(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected an ISO 8601 time such as 2026-11-26T05:00:00Z") from None


def cmd_capacity(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    cfg = load_config(args.config, overrides={"data_dir": args.data_dir} if args.data_dir is not None else None)
    where = place(cfg)
    with reading("capacity", where):
        since, until = period(args, where)
        r = report(where, since, until, cfg.detect.site_power_cap_w)
    print(json.dumps(r.to_json(), indent=2) if args.json else text(r))
    return 0
