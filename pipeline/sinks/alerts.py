"""Alert delivery: the local alert log (alerts.jsonl) and webhook receivers.

Receivers get Alertmanager's webhook payload (version 4), one payload per
alertname per delivery, so any tool that accepts Alertmanager webhooks accepts
Fleetwatch's. Requests run in a worker thread (never on the event loop), with a
timeout and retries with exponential backoff and jitter.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

RECEIVER = "fleetwatch"


class AlertLog:
    """Append-only JSON lines, one per alert state change, fsynced per delivery."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, alerts: list[dict[str, Any]]) -> None:
        if not alerts:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(a, sort_keys=True) + "\n" for a in alerts))
            f.flush()
            os.fsync(f.fileno())


def webhook_payloads(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Alertmanager v4 webhook payloads, grouped by alertname."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for a in alerts:
        groups[a["labels"]["alertname"]].append(a)
    payloads = []
    for name, members in groups.items():
        common_labels = _common([m["labels"] for m in members])
        payloads.append({
            "version": "4",
            "groupKey": f'{{}}:{{alertname="{name}"}}',
            "truncatedAlerts": 0,
            "status": "firing" if any(m["status"] == "firing" for m in members) else "resolved",
            "receiver": RECEIVER,
            "groupLabels": {"alertname": name},
            "commonLabels": common_labels,
            "commonAnnotations": _common([m["annotations"] for m in members]),
            "externalURL": "",
            "alerts": members,
        })
    return payloads


def _common(dicts: list[dict[str, str]]) -> dict[str, str]:
    first = dicts[0]
    return {k: v for k, v in first.items() if all(d.get(k) == v for d in dicts[1:])}


def validate_webhook_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"config error: alerts.webhooks entry {url!r}: must be an http:// or https:// URL")
    return url


class WebhookSender:
    def __init__(self, urls: list[str], timeout_s: float, retries: int) -> None:
        self.urls = [validate_webhook_url(u) for u in urls]
        self.timeout_s = timeout_s
        self.retries = retries
        self.delivered = 0
        self.failed = 0

    def send(self, alerts: list[dict[str, Any]]) -> None:
        """Deliver to every receiver (blocking: call from a worker thread)."""
        for payload in webhook_payloads(alerts):
            body = json.dumps(payload).encode()
            for url in self.urls:
                if self._post(url, body):
                    self.delivered += 1
                else:
                    self.failed += 1

    def _post(self, url: str, body: bytes) -> bool:
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "fleetwatch"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    if 200 <= resp.status < 300:
                        return True
                    reason = f"HTTP {resp.status}"
            except urllib.error.HTTPError as e:
                reason = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError) as e:
                reason = str(getattr(e, "reason", e))
            if attempt < self.retries:
                time.sleep(min(10.0, 0.2 * 2 ** attempt) * random.uniform(0.5, 1.5))
        log.warning("webhook %s: delivery failed after %d attempts (%s)", url, self.retries + 1, reason)
        return False
