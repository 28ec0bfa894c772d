"""`fleetwatch alerts`: the alerts now firing and those resolved lately, as a table or JSON.

The source is `<data_dir>/alerts.jsonl` (a running daemon appends to it, so a partial
last line is expected and skipped), or, when that file does not exist, the Parquet
archive's alerts dataset. Each alert is shown once, in its latest state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.humanize import age
from pipeline.model import ALERT, NO_END, alert_rows, parse_iso_utc
from pipeline.sinks.alerts import changed_at, read_jsonl

SEVERITIES = ("critical", "warning", "info")


@dataclass(frozen=True)
class AlertQuery:
    status: str = "all"  # active (firing), resolved or all
    site: str | None = None
    rack: str | None = None
    node: str | None = None
    severity: str | None = None
    since_s: float | None = 24 * 3600.0  # resolved alerts that ended longer ago are left out; None = no limit
    limit: int = 50


@dataclass
class AlertListing:
    alerts: list[dict[str, Any]]  # shown: latest state per fingerprint, filtered, firing first, then
                                  # critical first, then newest
    matched: int                  # before the limit
    recorded: int                 # alerts in the source, before the filters
    source: Path | None           # where they came from; None: nothing recorded
    looked: list[Path]            # where it looked
    now: float                    # ages are relative to this
    skipped_lines: list[int] = field(default_factory=list)  # unreadable lines of alerts.jsonl


def read_archive(dataset: Path) -> dict[str, dict[str, Any]]:
    """Latest alert per fingerprint from the archive's alerts dataset."""
    from pipeline.analytics.archive import scan  # polars: only this path needs it; keeps the common path light

    from pipeline.sinks.parquet import DATA_FILES
    if not any(dataset.glob(DATA_FILES)):
        return {}
    df = scan(dataset, "alerts").collect()
    df = df.sort("ts", maintain_order=True).unique("fingerprint", keep="last")
    table = df.select(ALERT.names).to_arrow().cast(ALERT)
    return {a["fingerprint"]: a for batch in table.to_batches() for a in alert_rows(batch)}


def query(data_dir: Path, q: AlertQuery, now: float | None = None) -> AlertListing:
    data_dir = Path(data_dir)
    jsonl, dataset = data_dir / "alerts.jsonl", data_dir / "archive" / "alerts"
    looked = [jsonl, dataset]
    bad: list[int] = []
    if jsonl.exists():
        # Rotated at midnight (sinks/files.Rotation): the alerts resolved the day before are in the
        # newest of the rotated files; the firing ones were carried into the new file.
        rotated = sorted(data_dir.glob("alerts.*.jsonl"), key=lambda f: f.stat().st_mtime)
        latest = read_jsonl(rotated[-1])[0] if rotated else {}
        now_latest, bad = read_jsonl(jsonl)
        latest.update(now_latest)
        source: Path | None = jsonl
    elif dataset.is_dir():
        latest, source = read_archive(dataset), dataset
    else:
        latest, source = {}, None
    # A simulation run faster than real time writes alerts "in the future": age them from the newest.
    ref = max([time.time() if now is None else now, *map(changed_at, latest.values())])
    want_status = {"active": ("firing",), "resolved": ("resolved",), "all": ("firing", "resolved")}[q.status]
    label_filters = {k: v for k, v in (("site", q.site), ("rack", q.rack), ("node", q.node),
                                       ("severity", q.severity)) if v is not None}
    shown = [a for a in latest.values()
             if a["status"] in want_status
             and all(a["labels"].get(k) == v for k, v in label_filters.items())
             and (q.since_s is None or a["status"] == "firing" or changed_at(a) >= ref - q.since_s)]
    # firing first (what needs doing now), then critical first, then newest first
    shown.sort(key=lambda a: (a["status"] != "firing", _severity_rank(a), -parse_iso_utc(a["startsAt"]), a["fingerprint"]))
    return AlertListing(shown[:q.limit], len(shown), len(latest), source, looked, ref, bad)


def _severity_rank(a: dict[str, Any]) -> int:
    sev = a["labels"].get("severity", "")
    return SEVERITIES.index(sev) if sev in SEVERITIES else len(SEVERITIES)


def where(labels: dict[str, str]) -> str:
    parts = [labels[k] for k in ("site", "rack", "node") if labels.get(k)]
    if labels.get("gpu"):
        parts.append(f"gpu{labels['gpu']}")
    return "/".join(parts) or "-"


def table(listing: AlertListing, width: int | None = None) -> str:
    """The listing as an aligned text table (lines cut at `width`), then a line saying what was
    shown and from where."""
    if listing.source is None:
        return (f"no alerts recorded yet: neither {listing.looked[0]} nor {listing.looked[1]} exists.\n"
                f"A running daemon (fleetwatch run) writes them; if it runs elsewhere, pass its --data-dir.")
    rows = []
    for a in listing.alerts:
        start = parse_iso_utc(a["startsAt"])
        since = f"{datetime.fromtimestamp(start, timezone.utc):%Y-%m-%d %H:%M:%S} ({age(listing.now - start)} ago"
        if a["status"] == "resolved" and a.get("endsAt", NO_END) != NO_END:
            since += f", lasted {age(parse_iso_utc(a['endsAt']) - start)}"
        rows.append([a["status"], a["labels"].get("severity", "-"), a["labels"].get("alertname", "-"),
                     where(a["labels"]), since + ")", a.get("annotations", {}).get("summary", "")])
    lines = []
    if rows:
        head = ["STATUS", "SEVERITY", "ALERT", "WHERE", "SINCE (UTC)", "SUMMARY"]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
        for r in [head, *rows]:
            line = "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]
            lines.append(line if width is None or len(line) <= width else line[:width - 3] + "...")
    firing = sum(a["status"] == "firing" for a in listing.alerts)
    summary = (f"{_n(len(listing.alerts), 'alert')} ({firing} firing, {len(listing.alerts) - firing} resolved)"
               if rows else f"no alerts match the filters ({listing.recorded} recorded)")
    if listing.matched > len(listing.alerts):
        summary += f"; {listing.matched - len(listing.alerts)} more not shown (raise --limit)"
    lines.append(f"{summary}; from {listing.source}")
    if listing.skipped_lines:
        bad = listing.skipped_lines
        lines.append(f"warning: skipped {_n(len(bad), 'unreadable line')} of {listing.source} "
                     f"(line {', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''})")
    return "\n".join(lines)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
