"""`fleetwatch report`: one self-contained HTML page of a period of the archive, for a shift
lead to read in two minutes; or its charts as PNG files (`--format png`), for chat and
tickets.

The page: the fleet in numbers (GPUs, node-hours, alerts by name and severity, the nodes
that failed); a timeline of the alerts and of the nodes' failing spells; a rack x node
heat map of the hottest GPU reading and of the least margin to the GPU's own slowdown
threshold; each rack's PDU power against its rating and the site meter against its cap;
each rack's coolant delta-T measured against what its PDU power predicts
(`detect.liquid_fraction` of it carried by the coolant, as the heat balance detector
reads it); where the GPU-hours went (analytics/capacity.py); the nodes with the most
alerts, and the repeat offenders: nodes alerting on 3 or more of the 7 days to the
period's end, as fleet operators escalate them.

Every number comes from the archive through DuckDB (analytics/query.py's views); charts
are drawn by matplotlib (static PNGs, embedded as data: URIs: the page loads nothing
from anywhere, and opens offline). A section whose data the archive lacks says so.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from pipeline.analytics.archive import Place, place, reading, shown
from pipeline.analytics.query import Archive
from pipeline.model import COOLANT_CP_J_PER_KG_K, iso_utc

REPEAT_DAYS, REPEAT_MIN_DAYS = 7, 3
SEVERITY_COLOR = {"critical": "#c0392b", "warning": "#e67e22", "none": "#7f8c8d"}


@dataclass
class Chart:
    name: str      # file name stem for --format png
    title: str
    png: bytes


@dataclass
class Section:
    id: str
    title: str
    html: str = ""
    charts: list[Chart] = field(default_factory=list)


@dataclass(frozen=True)
class Period:
    """[since, until), and its bounds as SQL literals."""
    since: datetime
    until: datetime

    @property
    def lo(self) -> str:
        return iso_utc(self.since, "microseconds")

    @property
    def hi(self) -> str:
        return iso_utc(self.until, "microseconds")

    def where(self, column: str = "ts") -> str:
        return f"{column} >= '{self.lo}' and {column} < '{self.hi}'"


PERIOD_ONLY = ("gpu_samples", "facility_samples")  # what the report reads of its period alone (and just after)
READS = (*PERIOD_ONLY, "alerts", "node_health", "fault_labels")  # every dataset it reads


def build(where: Place, since: datetime, until: datetime, cfg) -> list[Section]:
    """The page's sections for [since, until)."""
    from pipeline.analytics.evaluate import GRACE_S
    from pipeline.faults import FAULTS
    # The views it reads only (a damaged file elsewhere is not its concern); the samples of the period's days
    # only (on an archive of years, binding every file's footer was most of a report's time) and of the score
    # window after it (a fault labelled in its last minutes is scored if the data goes on); the alerts and
    # node health whole: an alert or a failing spell may start before it.
    after = timedelta(seconds=max(f.score_window_s for f in FAULTS) + GRACE_S)
    last = until + after - timedelta(microseconds=1)  # (an end at midnight reads no day past it)
    days = (since.astimezone(timezone.utc).date(), last.astimezone(timezone.utc).date())
    con = Archive.at(where).connect(READS, days={name: days for name in PERIOD_ONLY})
    p = Period(since, until)
    try:
        return [_summary(con, p), _timeline(con, p), _heat(con, p), _power(con, p, cfg), _coolant(con, p, cfg),
                _capacity(where, p, cfg), _offenders(con, p)]
    finally:
        con.close()


def _q(con, sql: str) -> list[dict[str, Any]]:
    rel = con.sql(sql)
    cols = rel.columns
    return [dict(zip(cols, r)) for r in rel.fetchall()]


def _table(head: list[str], body: list[list[Any]]) -> str:
    if not body:
        return "<p class='none'>none</p>"
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    tr = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{th}</tr>{tr}</table>"


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _figure(width: float = 10.0, height: float = 3.5):
    import matplotlib
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(width, height))


def _summary(con, p: Period) -> Section:
    [g] = _q(con, f"select count(distinct gpu_uuid) as gpus, count(distinct node) as nodes from gpu_samples "
                  f"where {p.where()}")
    # As reported: each node's GPU that reported most, its scrapes times its interval (the median step between
    # them), so that a node silent for a while counts none of its silence (its first and last sample had
    # spanned it); per GPU, as the agent stamps each GPU at its own read, milliseconds apart
    [h] = _q(con, f"""
        with t as (select distinct node, gpu, ts from gpu_samples where {p.where()}),
        g as (select node, gpu, epoch(ts) - epoch(lag(ts) over (partition by node, gpu order by ts)) as step from t),
        per_gpu as (select node, count(*) * coalesce(median(step) filter (where step > 0), 0) as s
                    from g group by node, gpu)
        select coalesce(sum(s), 0) / 3600.0 as node_hours from (select node, max(s) as s from per_gpu group by node)""")
    alerts = _q(con, f"select alertname, severity, count(*) as n from alerts where status = 'firing' and "
                     f"{p.where('starts_at')} group by all order by n desc, alertname")
    failed = _q(con, f"select node, count(*) as times, min(ts) as first from node_health where state = 'failing' "
                     f"and {p.where()} group by node order by times desc, node")
    facts = (f"<p class='facts'><b>{g['gpus']:,}</b> GPUs on <b>{g['nodes']:,}</b> nodes, "
             f"<b>{h['node_hours']:,.1f}</b> node-hours reported, from {iso_utc(p.since)} to {iso_utc(p.until)}; "
             f"<b>{sum(a['n'] for a in alerts):,}</b> alerts raised; <b>{len(failed)}</b> nodes failed."
             + _time_to_detect(con, p) + "</p>")
    return Section("summary", "The fleet", facts
                   + "<h3>Alerts by name and severity</h3>"
                   + _table(["alert", "severity", "raised"], [[a["alertname"], a["severity"], a["n"]] for a in alerts])
                   + "<h3>Nodes that failed</h3>"
                   + _table(["node", "times", "first"], [[f["node"], f["times"], iso_utc(f["first"])] for f in failed]))


def _time_to_detect(con, p: Period) -> str:
    """Where the archive holds the truth (`fault_labels`: a simulation's, or an operator's
    labels), how soon the faults were alerted on: an alert named for the fault's type on its
    target, from its start to its end plus the eval's grace, of the faults whose score window
    the data covers, or one still firing when it started (analytics/evaluate.py's rules)."""
    from pipeline.analytics.evaluate import GRACE_S
    from pipeline.faults import FAULTS
    pairs = ", ".join(f"('{f.name}', '{a}')" for f in FAULTS for a in f.alertnames)
    windows = ", ".join(f"('{f.name}', {f.score_window_s:g})" for f in FAULTS)
    [t] = _q(con, f"""
        with pairs(fault_type, alertname) as (values {pairs}),
        windows(fault_type, window_s) as (values {windows}),
        f as (select fault_id, fault_type, rack, node, gpu, start, "end" from fault_labels join windows using (fault_type)
              where not normal and {p.where('start')}
                and start + to_seconds(window_s) <= (select max(ts) from gpu_samples)),  -- (scored as the eval does)
        episode as (select fingerprint, alertname, rack, node, gpu, starts_at, max(ends_at) as ends_at
                    from alerts group by all),  -- (ends_at null: still firing)
        hit as (select f.fault_id, min(greatest(a.starts_at, f.start)) as first from f join pairs using (fault_type)
                join episode a on a.alertname = pairs.alertname and a.rack = f.rack
                 and (f.node is null or a.node = f.node) and (f.gpu is null or a.gpu = cast(f.gpu as varchar))
                 and a.starts_at <= f."end" + interval {GRACE_S:g} second
                 and (a.starts_at >= f.start or a.ends_at is null or a.ends_at >= f.start)  -- (already firing)
                group by f.fault_id)
        select count(*) as faults, count(hit.first) as found,
               quantile_cont(greatest(epoch(hit.first) - epoch(f.start), 0), 0.5) as p50,
               quantile_cont(greatest(epoch(hit.first) - epoch(f.start), 0), 0.99) as p99
        from f left join hit using (fault_id)""")
    if not t["faults"]:
        return ""
    return (f" Of <b>{t['faults']}</b> labelled faults, <b>{t['found']}</b> were alerted on"
            + (f", in {t['p50']:.0f} s (p50) and {t['p99']:.0f} s (p99)" if t["found"] else "") + ".")


def _timeline(con, p: Period) -> Section:
    s = Section("timeline", "Alerts and node health over time")
    lo, hi, since, until = p.lo, p.hi, p.since, p.until
    spans = _q(con, f"""
        select coalesce(node, rack, site, 'site') as who, alertname, severity, starts_at,
               coalesce(max(ends_at), timestamptz '{hi}') as ends_at  -- (still firing: to the period's end)
        from alerts where starts_at < '{hi}'
        group by fingerprint, who, alertname, severity, starts_at
        having coalesce(max(ends_at), timestamptz '{hi}') >= '{lo}' order by who, starts_at""")
    failing = _q(con, f"""
        select * from (
          select node, ts as start, lead(ts, 1, timestamptz '{hi}') over (partition by node order by ts) as stop, state
          from node_health where ts < '{hi}' qualify state = 'failing')
        where stop >= '{lo}'""")  # (a spell that ended before the period is not in it)
    if not spans and not failing:
        s.html = "<p class='none'>no alerts and no node health changes in the period</p>"
        return s
    import matplotlib.dates as mdates
    who = sorted({x["who"] for x in spans} | {f["node"] for f in failing})[:40]
    fig, ax = _figure(10.0, max(2.5, 0.28 * len(who) + 1.0))
    for i, w in enumerate(who):
        for f in (f for f in failing if f["node"] == w):
            ax.barh(i, mdates.date2num(f["stop"]) - mdates.date2num(f["start"]), left=mdates.date2num(f["start"]),
                    height=0.9, color="#f5b7b1")
        for a in (a for a in spans if a["who"] == w):
            start = max(a["starts_at"], since)
            ax.barh(i, max(mdates.date2num(a["ends_at"]) - mdates.date2num(start), 1e-4),
                    left=mdates.date2num(start), height=0.5, color=SEVERITY_COLOR.get(a["severity"], "#34495e"))
    ax.set_yticks(range(len(who)), who, fontsize=7)
    ax.invert_yaxis()
    ax.xaxis_date()
    ax.set_xlim(mdates.date2num(since), mdates.date2num(until))
    ax.set_title("alerts (red critical, orange warning) and failing nodes (pink band)", fontsize=9)
    s.charts.append(Chart("timeline", s.title, _png(fig)))
    s.html = f"<p>{len(spans)} alerts on {len({x['who'] for x in spans})} nodes or racks (the first 40 shown).</p>"
    return s


def _heat(con, p: Period) -> Section:
    s = Section("heat", "GPU temperature and margin to slowdown, rack x node")
    cells = _q(con, f"""
        select rack, node, dense_rank() over (partition by rack order by node) as slot,
               max(gpu_temp_c) as hottest_c, min(slowdown_temp_c - gpu_temp_c) as margin_c
        from gpu_samples where {p.where()} group by rack, node order by rack, node""")
    if not cells:
        s.html = "<p class='none'>no GPU samples in the period</p>"
        return s
    import numpy as np
    racks = sorted({c["rack"] for c in cells})
    width = max(c["slot"] for c in cells)
    for key, title, cmap in (("hottest_c", "hottest GPU reading (C)", "inferno"),
                             ("margin_c", "least margin to the GPU's slowdown threshold (C)", "RdYlGn")):
        grid = np.full((len(racks), width), np.nan)
        for c in cells:
            if c[key] is not None:
                grid[racks.index(c["rack"]), c["slot"] - 1] = c[key]
        fig, ax = _figure(min(12.0, 1.0 + 0.7 * width), 0.5 * len(racks) + 1.2)
        im = ax.imshow(grid, cmap=cmap, aspect="auto")
        for (r, n), v in np.ndenumerate(grid):
            if not np.isnan(v):
                red, green, blue, _ = im.cmap(im.norm(v))  # (white on a dark cell)
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(n, r, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
        ax.set_yticks(range(len(racks)), racks, fontsize=8)
        ax.set_xticks(range(width), [str(i + 1) for i in range(width)], fontsize=8)
        ax.set_xlabel("node in rack (by name)")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
        s.charts.append(Chart(key.replace("_c", ""), title, _png(fig)))
    worst = min((c for c in cells if c["margin_c"] is not None), key=lambda c: c["margin_c"], default=None)
    if worst is not None:
        m = worst["margin_c"]
        s.html = (f"<p>Least margin: <b>{worst['node']}</b>, {abs(m):.0f} C {'under' if m >= 0 else 'over'} its "
                  f"GPUs' slowdown threshold (hottest {worst['hottest_c']:.0f} C).</p>")
    return s


def _minutes(con, p: Period, device_class: str, metric: str) -> list[dict[str, Any]]:
    """Per rack (a site's meters: per site) and minute: each device's mean, summed over the devices (a rack fed
    by A and B PDUs, a site of two meters: their means had been averaged, the rack at half its power)."""
    return _q(con, f"""
        select who, minute, sum(value) as value from (
          select if(rack = '', site, rack) as who, device, date_trunc('minute', ts) as minute, avg(value) as value
          from facility_samples
          where {p.where()} and device_class = '{device_class}' and metric = '{metric}' and quality = 1
          group by all)
        group by all order by who, minute""")


def _power(con, p: Period, cfg) -> Section:
    s = Section("power", "Power: racks against their PDU rating, the site against its cap")
    pdu, meter = _minutes(con, p, "rack", "power_w"), _minutes(con, p, "meter", "power_w")
    if not pdu and not meter:
        s.html = "<p class='none'>no PDU or meter readings in the period</p>"
        return s
    rating, cap = cfg.fleet.pdu_rating_w, cfg.detect.site_power_cap_w
    if pdu:
        fig, ax = _figure()
        for rack in sorted({p["who"] for p in pdu}):
            mine = [p for p in pdu if p["who"] == rack]
            ax.plot([p["minute"] for p in mine], [p["value"] / 1000.0 for p in mine], label=rack, linewidth=1)
        ax.axhline(rating / 1000.0, color="#c0392b", linestyle="--", linewidth=1, label="PDU rating")
        ax.set_ylabel("kW (1-minute means)")
        ax.legend(fontsize=7, ncol=6)
        s.charts.append(Chart("rack_power", "rack PDU power", _png(fig)))
    if meter:
        fig, ax = _figure(10.0, 2.8)
        for site in sorted({m["who"] for m in meter}):
            mine = [m for m in meter if m["who"] == site]
            ax.plot([m["minute"] for m in mine], [m["value"] / 1000.0 for m in mine], linewidth=1,
                    label=f"{site} meters")
        if cap:
            ax.axhline(cap / 1000.0, color="#c0392b", linestyle="--", linewidth=1, label="site cap")
        ax.set_ylabel("kW (1-minute means)")
        ax.legend(fontsize=7)
        s.charts.append(Chart("site_power", "site power", _png(fig)))
    peak = max(pdu, key=lambda p: p["value"], default=None)
    # A rack's PDUs summed against one PDU's rating: with A and B feeds, what one feed carries when the other
    # fails (PduOverload judges each PDU alone).
    s.html = ("<p>" + (f"Highest rack minute: <b>{peak['who']}</b> at {peak['value'] / 1000:.1f} kW (its PDUs "
                       f"summed), {100 * peak['value'] / rating:.0f}% of one PDU's {rating / 1000:g} kW rating, "
                       f"what one feed carries if the other fails. " if peak else "")
              + (f"Site cap {cap / 1000:g} kW." if cap else "No site cap configured (detect.site_power_cap_w).")
              + "</p>")
    return s


def _coolant(con, p: Period, cfg) -> Section:
    s = Section("coolant", "Coolant delta-T per rack: measured against what its power predicts")
    rows_ = _q(con, f"""
        with m as (
          select rack, date_trunc('minute', ts) as minute,
                 avg(value) filter (where metric = 'supply_temp_c') as supply,
                 avg(value) filter (where metric = 'return_temp_c') as ret,
                 avg(value) filter (where metric = 'flow_lpm') as flow
          from facility_samples where {p.where()} and device_class = 'cdu' and quality = 1 group by all),
        p as (  -- (each PDU's mean, summed over the rack's: its A and B feeds)
          select rack, minute, sum(power) as power from (
            select rack, device, date_trunc('minute', ts) as minute, avg(value) as power
            from facility_samples where {p.where()} and device_class = 'rack' and metric = 'power_w' and quality = 1
            group by all) group by all)
        select m.rack, m.minute, m.ret - m.supply as measured,
               {cfg.detect.liquid_fraction} * p.power / (m.flow / 60.0 * {COOLANT_CP_J_PER_KG_K}) as predicted
        from m join p using (rack, minute) where m.flow > 0 order by m.rack, m.minute""")
    if not rows_:
        s.html = "<p class='none'>no CDU and PDU readings together in the period</p>"
        return s
    racks = sorted({r["rack"] for r in rows_})
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(racks), 1, figsize=(10.0, 1.4 * len(racks) + 0.6), sharex=True, squeeze=False)
    for ax, rack in zip(axes[:, 0], racks):
        mine = [r for r in rows_ if r["rack"] == rack]
        ax.plot([r["minute"] for r in mine], [r["measured"] for r in mine], linewidth=1, label="measured")
        ax.plot([r["minute"] for r in mine], [r["predicted"] for r in mine], linewidth=1, linestyle="--",
                label="predicted")
        ax.set_ylabel(rack, fontsize=8)
    axes[0, 0].legend(fontsize=7)
    axes[0, 0].set_title("delta-T, C (1-minute means)", fontsize=9)
    s.charts.append(Chart("coolant", s.title, _png(fig)))
    off = {rack: sum(abs(r["measured"] - r["predicted"]) for r in rows_ if r["rack"] == rack)
           / sum(1 for r in rows_ if r["rack"] == rack) for rack in racks}
    worst = max(off, key=off.get)
    s.html = f"<p>Furthest from its prediction: <b>{worst}</b>, {off[worst]:.2f} C on average.</p>"
    return s


def _capacity(where: Place, p: Period, cfg) -> Section:
    from pipeline.analytics.capacity import report
    s = Section("capacity", "Where the GPU-hours went")
    r = report(where, p.since, p.until, cfg.detect.site_power_cap_w)
    if not r.total:
        s.html = "<p class='none'>no GPU samples in the period</p>"
        return s
    parts = [("productive", r.productive - r.capped_lost, "#27ae60"), ("lost to caps", r.capped_lost, "#f1c40f"),
             ("faulted", r.faulted, "#c0392b"), ("idle", r.idle, "#95a5a6"),
             ("not reporting", r.not_reporting, "#34495e")]
    fig, ax = _figure(10.0, 1.6)
    left = 0.0
    for name, hours, color in parts:
        ax.barh(0, hours, left=left, color=color, label=f"{name} {hours:,.1f} h")
        left += hours
    ax.set_yticks([])
    ax.set_xlabel("GPU-hours")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    s.charts.append(Chart("capacity", s.title, _png(fig)))
    shares = r.shares_pct()
    s.html = (f"<p>{r.total:,.1f} GPU-hours: {shares['productive']:.1f}% productive, {shares['faulted']:.1f}% "
              f"faulted, {shares['idle']:.1f}% idle"
              + (f"; the site averaged {r.site.avg_kw:,.0f} kW" if r.site.sites else "") + ".</p>")
    return s


def _offenders(con, p: Period) -> Section:
    week = Period(p.until - timedelta(days=REPEAT_DAYS), p.until)
    top = _q(con, f"""
        select node, count(*) as alerts, string_agg(distinct alertname, ', ' order by alertname) as names
        from alerts where status = 'firing' and node is not null and {p.where('starts_at')}
        group by node order by alerts desc, node limit 10""")
    repeat = _q(con, f"""
        select node, count(distinct cast(starts_at as date)) as days, count(*) as alerts
        from alerts where status = 'firing' and node is not null and {week.where('starts_at')}
        group by node having count(distinct cast(starts_at as date)) >= {REPEAT_MIN_DAYS}
        order by days desc, alerts desc, node""")
    return Section("offenders", "Top offenders",
                   "<h3>Most alerts in the period</h3>"
                   + _table(["node", "alerts", "names"], [[t["node"], t["alerts"], t["names"]] for t in top])
                   + f"<h3>Repeat offenders: alerting on {REPEAT_MIN_DAYS} or more of the last {REPEAT_DAYS} days</h3>"
                   + _table(["node", "days", "alerts"], [[r["node"], r["days"], r["alerts"]] for r in repeat]))


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1em}table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:.2em .6em;
text-align:left}th{background:#f4f4f4}img{max-width:100%;display:block;margin:.5em 0}.none{color:#777}
nav a{margin-right:1em}.facts{font-size:1.05em}td:first-child{white-space:nowrap}"""


def page(sections: list[Section], since: datetime, until: datetime, where: str) -> str:
    nav = "".join(f"<a href='#{s.id}'>{html.escape(s.title)}</a>" for s in sections)
    body = ""
    for s in sections:
        imgs = "".join(f"<img alt='{html.escape(c.title)}' src='data:image/png;base64,"
                       f"{base64.b64encode(c.png).decode()}'>" for c in s.charts)
        body += f"<section id='{s.id}'><h2>{html.escape(s.title)}</h2>{s.html}{imgs}</section>"
    title = f"Fleetwatch report, {iso_utc(since)} to {iso_utc(until)}"
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='none'>from {html.escape(where)}</p><nav>{nav}</nav>{body}</body></html>")


def add_parser(sub):
    """`fleetwatch report`, on the CLI's subparsers."""
    from pipeline.analytics.capacity import period_options
    rp = sub.add_parser("report", help="a self-contained HTML page of the archive over a period (or its charts as "
                                       "PNG files) for a shift lead")
    rp.add_argument("--config", metavar="FILE", help="TOML config file (see docs/configuration.md)")
    rp.add_argument("--data-dir", metavar="DIR", help="the daemon's data_dir")
    period_options(rp, "24h")
    rp.add_argument("--format", choices=("html", "png"), default="html",
                    help="html: one page (default); png: a folder of the charts")
    rp.add_argument("--out", metavar="PATH", help="the page (default report.html) or, with png, the folder "
                                                  "(default report-png/)")
    return rp


def cmd_report(args) -> int:
    from datetime import timezone

    from pipeline.analytics.capacity import newest, period
    from pipeline.config import ConfigError, load_config
    cfg = load_config(args.config, overrides={"data_dir": args.data_dir} if args.data_dir is not None else None)
    where = place(cfg)
    if not (args.since or args.start):
        args.since = "24h"
    out = Path(args.out or ("report.html" if args.format == "html" else "report-png"))
    if args.format == "html" and (out.is_dir() or not out.parent.is_dir()):
        raise ConfigError(f"--out {out}: give a file in a folder that exists")
    with reading("report", where):
        if not args.end:  # the last data's time: a live fleet's is now, a stopped one's shows its last day
            args.end = iso_utc((newest(where) or datetime.now(timezone.utc)) + timedelta(microseconds=1),
                               "microseconds")
        since, until = period(args, where)
        sections = build(where, since, until, cfg)
    if args.format == "png":
        out.mkdir(parents=True, exist_ok=True)
        charts = [c for s in sections for c in s.charts]
        for c in charts:
            (out / f"{c.name}.png").write_bytes(c.png)
        print(f"{len(charts)} charts in {out}/")
    else:
        out.write_text(page(sections, since, until, shown(where)), encoding="utf-8")
        print(f"report of {iso_utc(since)} to {iso_utc(until)}: {out} ({out.stat().st_size / 1024:,.0f} KB)")
    return 0
