"""Alert routing with Alertmanager's semantics: grouping, group timers, inhibition, silences.

Alerts that share the values of `alerts.group_by` form a group, and a receiver gets one
notification per group rather than one per alert:

- a new group notifies `group_wait_s` after its first alert (alerts that arrive together,
  e.g. every thermal alert of a rack whose coolant failed, go out together);
- a group whose alert set changed (a new firing alert, or a resolution) notifies again
  at most every `group_interval_s`; an unchanged group that still fires re-notifies
  every `repeat_interval_s`;
- each notification holds all of the group's firing alerts and those resolved since the
  last one; a resolution goes out once, then the alert leaves the group.

Muted alerts are left out: those matched by an active silence, and the targets of an
inhibit rule while one of its (unsilenced) sources fires with the same `equal` labels.
A notification left with no alerts is not sent. When a mute ends, the alert goes out
with its group's next notification. A resolution is sent only for an alert whose firing
was notified: it closes what the receiver opened, and nothing else.

Time is the `now` the caller passes (time.time() scale); the router never reads a clock.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import AlertsConfig, ConfigError
from pipeline.model import fingerprint, iso_utc
from pipeline.sinks.silences import Silence, SilenceStore

log = logging.getLogger(__name__)


@dataclass
class Notification:
    group_key: str              # '{}:{alertname="GpuXid",rack="r01",site="site-a"}'
    group_labels: dict[str, str]
    alerts: list[dict[str, Any]]  # firing + newly resolved, by startsAt then fingerprint; do not mutate
    after: float = 0.0            # the group's notification before it (its creation, for the first): with
                                  # the group key, what tells it from any other of the group (its key's seed)

    @property
    def status(self) -> str:
        """Alertmanager's payload status: firing while any alert in it fires."""
        return "firing" if any(a["status"] == "firing" for a in self.alerts) else "resolved"


@dataclass
class RouterStats:
    notifications: int = 0  # notifications returned by due()
    silenced: int = 0       # times a firing alert became muted by a silence
    inhibited: int = 0      # times a firing alert became muted by inhibition


@dataclass
class _Group:
    labels: dict[str, str]
    created: float
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)  # fingerprint -> latest alert object
    notified: set[str] = field(default_factory=set)  # fingerprints whose firing the receivers were told of
    last_sent: float | None = None


@dataclass(frozen=True)
class _Rule:
    source: re.Pattern[str]
    target: re.Pattern[str]
    equal: tuple[str, ...]


def _fp(alert: dict[str, Any]) -> str:
    return alert.get("fingerprint") or fingerprint(alert["labels"])


def _name(alert: dict[str, Any]) -> str:
    return alert["labels"].get("alertname", "")


def inhibit_rules(cfg: AlertsConfig) -> list[_Rule]:
    """alerts.inhibit_rules compiled; ConfigError naming the rule whose regex does not compile."""
    rules = []
    for i, r in enumerate(cfg.inhibit_rules):
        compiled = []
        for key in ("source", "target"):
            try:
                compiled.append(re.compile(getattr(r, key)))
            except re.error as e:
                raise ConfigError(f"config error: alerts.inhibit_rules[{i}].{key} = {getattr(r, key)!r}: not a "
                                  f"valid regular expression ({e}); alertnames are matched in full, e.g. "
                                  f"\"CoolantLeak|CoolantFlowLoss\"") from None
        rules.append(_Rule(*compiled, tuple(r.equal)))
    return rules


class Router:
    def __init__(self, cfg: AlertsConfig, silences: SilenceStore | None = None) -> None:
        self.cfg = cfg
        self.silences = silences
        self.stats = RouterStats()
        self._rules = inhibit_rules(cfg)
        self._groups: dict[str, _Group] = {}
        self._muted: dict[str, str] = {}  # fingerprint -> why, for firing alerts muted at the last add()/due()
        self._silence_ends: list[float] = []  # when a silence ends: a muted alert may go out then

    # ---- input -------------------------------------------------------------------

    def add(self, alerts: list[dict[str, Any]], now: float) -> None:
        """Alert state changes (firing or resolved), in order; the latest per fingerprint wins."""
        for a in alerts:
            fp = _fp(a)
            key, labels = self._group_of(a["labels"])
            group = self._groups.get(key)
            if a["status"] == "resolved":
                if group is None or fp not in group.alerts:
                    continue  # never seen firing (or already gone): nothing to close
                if fp in group.notified:
                    group.alerts[fp] = a  # the resolution goes out with the next notification
                else:
                    del group.alerts[fp]  # its firing never went out: neither does the resolution
                    self._drop_if_empty(key)
                continue
            if group is None:
                group = self._groups[key] = _Group(labels, created=now)
            group.alerts[fp] = a
        self._update_mutes(now)

    def standing(self, key: str, lost: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """What a receiver that lost some of group `key`'s notifications (`lost`: their alerts by fingerprint,
        the latest of each) is to hear: the group's firing alerts now (those not muted), and each lost
        resolution of an alert not firing again. An alert lost as firing that resolved since is left out: its
        firing never reached the receiver, nor does its resolution."""
        group = self._groups.get(key)
        firing = self._visible(group)[0] if group is not None else {}
        resolved = {fp: a for fp, a in lost.items() if a.get("status") == "resolved" and fp not in firing}
        return sorted([*firing.values(), *resolved.values()], key=lambda a: (a.get("startsAt", ""), _fp(a)))

    # ---- output ------------------------------------------------------------------

    def due(self, now: float) -> list[Notification]:
        """The notifications to send now; marks them sent (the caller owns delivery and retries).
        Call it every few seconds even when next_wakeup() is later, with the silences re-read
        before (off the event loop: a hung disk must not stop it): a silence expired by the CLI
        should take effect soon."""
        self._update_mutes(now)
        out = []
        for key in list(self._groups):
            group = self._groups[key]
            if now < self._due_at(group):
                continue
            firing, resolved = self._visible(group)
            for fp in resolved:
                del group.alerts[fp]
            group.notified = (group.notified | set(firing)) - set(resolved)
            after = group.last_sent if group.last_sent is not None else group.created
            group.last_sent = now
            out.append(Notification(key, dict(group.labels),
                                    sorted([*firing.values(), *resolved.values()],
                                           key=lambda a: (a.get("startsAt", ""), _fp(a))), after))
            self._drop_if_empty(key)
        self.stats.notifications += len(out)
        return out

    def next_wakeup(self) -> float | None:
        """The earliest `now` at which due() may return something (None: nothing pending).
        Silences changed in the file after the last add()/due() are not known here."""
        times = [t for t in map(self._due_at, self._groups.values()) if t != float("inf")]
        if self._muted:
            times += self._silence_ends
        return min(times, default=None)

    def muted(self, alert: dict[str, Any], now: float) -> str | None:
        """Why a firing alert is muted: 'silenced by <id>' or 'inhibited by <alertname> <fingerprint>';
        None when it is not (and for a resolution, which is never muted: see the module doc)."""
        if alert["status"] != "firing":
            return None
        active = self.silences.active(now) if self.silences is not None else []
        return self._why(alert, active, self._inhibitors(active))

    # ---- persistence (Alertmanager's notification log) -----------------------------

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state: per group its alerts, timers and what its receivers were told."""
        return {"version": 1, "groups": [
            {"key": key, "labels": g.labels, "created": g.created, "last_sent": g.last_sent,
             "notified": sorted(g.notified), "alerts": list(g.alerts.values())}
            for key, g in self._groups.items()]}

    def restore(self, state: dict[str, Any]) -> None:
        """Take over a snapshot, so a restarted daemon does not notify again what went out.
        A group whose key changed (alerts.group_by was edited) starts afresh, like Alertmanager's.
        A malformed state is logged and dropped: groups may then notify again, nothing is lost."""
        try:
            self._restore(state)
        except (KeyError, TypeError, AttributeError) as e:
            log.error("routing state is malformed (%s: %s); starting without it: groups may notify again",
                      type(e).__name__, e)
            self._groups = {}

    def _restore(self, state: dict[str, Any]) -> None:
        self._groups = {}
        for saved in state.get("groups", []):
            for a in saved["alerts"]:
                fp, (key, labels) = _fp(a), self._group_of(a["labels"])
                same = key == saved["key"]
                if not same and a["status"] != "firing":
                    continue
                g = self._groups.setdefault(key, _Group(labels, saved["created"],
                                                        last_sent=saved["last_sent"] if same else None))
                g.alerts[fp] = a
                if same and fp in saved["notified"]:
                    g.notified.add(fp)
        for key in list(self._groups):  # resolutions of alerts never notified are not sent
            g = self._groups[key]
            g.alerts = {fp: a for fp, a in g.alerts.items() if a["status"] == "firing" or fp in g.notified}
            self._drop_if_empty(key)

    def reconcile(self, latest: dict[str, dict[str, Any]], now: float) -> None:
        """Take what alerts.jsonl says changed while these groups did not hear it: an alert that
        fired while no webhook receiver was configured (notified after group_wait), one that
        resolved then (its resolution goes out where its firing did; it had been re-sent as
        firing at every repeat_interval, for ever). A log that rotated since starts with every
        alert still firing, so one it does not name at all resolved too (unless it is empty)."""
        held = {fp: a for g in self._groups.values() for fp, a in g.alerts.items() if a["status"] == "firing"}
        self.add([a for fp, a in latest.items() if a["status"] == "firing" and fp not in held]
                 + [latest[fp] for fp in held if fp in latest and latest[fp]["status"] == "resolved"]
                 + [{**a, "status": "resolved", "endsAt": iso_utc(now)} for fp, a in held.items()
                    if latest and fp not in latest], now)

    # ---- internals -------------------------------------------------------------------

    def _group_of(self, labels: dict[str, str]) -> tuple[str, dict[str, str]]:
        """Alertmanager's group key and labels: only the group_by labels the alert has."""
        gl = {n: labels[n] for n in sorted(self.cfg.group_by) if n in labels}
        return "{}:{" + ",".join(f"{n}={json.dumps(v)}" for n, v in gl.items()) + "}", gl

    def _drop_if_empty(self, key: str) -> None:
        if not self._groups[key].alerts:
            del self._groups[key]

    def _visible(self, group: _Group) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """(firing and not muted, resolved and due to go out) alerts of a group, by fingerprint."""
        firing = {fp: a for fp, a in group.alerts.items() if a["status"] == "firing" and fp not in self._muted}
        resolved = {fp: a for fp, a in group.alerts.items() if a["status"] == "resolved"}
        return firing, resolved

    def _due_at(self, group: _Group) -> float:
        """When the group notifies next with the mutes as they are now (inf: not before something changes)."""
        firing, resolved = self._visible(group)
        if group.last_sent is None:
            return group.created + self.cfg.group_wait_s if firing else float("inf")
        if resolved or set(firing) - group.notified:
            return group.last_sent + self.cfg.group_interval_s
        return group.last_sent + self.cfg.repeat_interval_s if firing else float("inf")

    def _update_mutes(self, now: float) -> None:
        """Evaluate silences and inhibition for every firing alert; count alerts that became muted."""
        active = self.silences.active(now) if self.silences is not None else []
        inhibitors = self._inhibitors(active)
        muted = {}
        for g in self._groups.values():
            for fp, a in g.alerts.items():
                why = self._why(a, active, inhibitors) if a["status"] == "firing" else None
                if why is None:
                    continue
                muted[fp] = why
                kind = why.split(" ")[0]  # a change of reason (silenced -> inhibited) counts again
                if self._muted.get(fp, "").split(" ")[0] != kind:
                    log.info("alert %s %s muted: %s", _name(a), fp, why)
                    if kind == "silenced":
                        self.stats.silenced += 1
                    else:
                        self.stats.inhibited += 1
        self._muted = muted
        every = self.silences.all() if self.silences is not None else []
        self._silence_ends = [s.ends_at for s in every if s.ends_at > now]

    def _inhibitors(self, active: list[Silence]) -> list[dict[tuple[str, ...], list[tuple[str, str]]]]:
        """Per rule: equal-label values -> (alertname, fingerprint) of its firing, unsilenced sources."""
        index: list[dict[tuple[str, ...], list[tuple[str, str]]]] = [{} for _ in self._rules]
        for g in self._groups.values():
            for fp, a in g.alerts.items():
                if a["status"] != "firing" or any(s.matches(a["labels"]) for s in active):
                    continue
                for rule, by_equal in zip(self._rules, index):
                    if rule.source.fullmatch(_name(a)):
                        values = tuple(a["labels"].get(n, "") for n in rule.equal)
                        by_equal.setdefault(values, []).append((_name(a), fp))
        return index

    def _why(self, alert: dict[str, Any], active: list[Silence],
             inhibitors: list[dict[tuple[str, ...], list[tuple[str, str]]]]) -> str | None:
        labels = alert["labels"]
        for s in active:
            if s.matches(labels):
                return f"silenced by {s.id}"
        fp = _fp(alert)
        for rule, by_equal in zip(self._rules, inhibitors):
            if rule.target.fullmatch(_name(alert)):
                for name, source_fp in by_equal.get(tuple(labels.get(n, "") for n in rule.equal), []):
                    if source_fp != fp:  # an alert never inhibits itself
                        return f"inhibited by {name} {source_fp}"
        return None
