"""Receiver kinds: what the receivers of one `kind` (`[[alerts.receivers]] kind = ...`)
get, and when. Delivery is common to every kind (pipeline/sinks/notify.py: one outbox,
retries with backoff, dead letters, HMAC signing, per receiver; pipeline/sinks/webhook.py:
the validated receiver and the HTTP client); a kind decides only the payloads that go
into its receivers' outboxes and the state that says what went (ReceiverKind, base.py).

The registry below is the one list of kinds: config.ReceiverConfig.kind takes its
choices (and its doc) from it, and the notifier builds one instance of every kind. A
new kind (Slack, PagerDuty, ...) is one module here with a ReceiverKind subclass named
KIND, plus one line in RECEIVER_KINDS. This package imports nothing at import time, so
that config.py can read the registry.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.sinks.receivers.base import ReceiverKind

# kind -> (module defining KIND, what its receivers get: the doc of ReceiverConfig.kind)
RECEIVER_KINDS: dict[str, tuple[str, str]] = {
    "webhook": ("pipeline.sinks.receivers.webhook", "grouped Alertmanager v4 webhook payloads"),
    "alertmanager": ("pipeline.sinks.receivers.alertmanager", "POST /api/v2/alerts"),
}


def receiver_kind(kind: str) -> type[ReceiverKind]:
    """The ReceiverKind class of a registered kind (its module is imported on first use)."""
    cls = importlib.import_module(RECEIVER_KINDS[kind][0]).KIND
    assert cls.kind == kind, f"{RECEIVER_KINDS[kind][0]}.KIND is kind {cls.kind!r}, registered as {kind!r}"
    return cls
