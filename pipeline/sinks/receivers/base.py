"""The receiver-kind protocol (see the package doc)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.config import AlertsConfig
    from pipeline.sinks.silences import SilenceStore
    from pipeline.sinks.webhook import Receiver


@dataclass
class Enqueued:
    """What one round of a kind goes out with."""
    payloads: dict[str, list[Any]]  # receiver name -> JSON payloads to append to its outbox, one POST each
    changed: bool                   # the kind's state changed: its snapshot() is written with the payloads
    # receiver name -> each payload's Idempotency-Key, where the kind derives it from its state (the same
    # payload made again after a crash, before its state was written, carries the same key); else random
    keys: dict[str, list[str]] = field(default_factory=dict)


class ReceiverKind:
    """One kind of receiver, for all receivers of that kind in a notify process (state such
    as routing groups is shared by them). The notifier calls, under one lock:

        add(changes, now)        alert state changes (Alertmanager alert objects) as they arrive
        enqueue(changes, now, acked)
                                 right after add() with the same changes, at next_wakeup() and
                                 about every second with none: the payloads due now; they are
                                 appended to the outboxes, then snapshot() goes to
                                 <data_dir>/notify/<state_file> when `changed`, then written()
        at_send(payload, now)    (in the receiver's thread) a payload as it goes out, at every try:
                                 what depends on the time of sending (Alertmanager's lease) is stamped
                                 here, not in the outbox record
        expired(name, payloads)  (in receiver `name`'s thread) payloads about to be dead-lettered after
                                 alerts.max_age_s of failures: what they said never arrived (the kind may
                                 say it again, to that receiver, and keeps what it needs for that on
                                 disk before it returns: the notifier then acks them)
        resend(name)             (likewise) the receiver delivers again after an outage, or its last
                                 notification was dead-lettered: the time to say it
        restore(state, latest)   at start, and after a write that failed (the state on disk);
                                 `latest` (at start): each alert's latest change in alerts.jsonl
                                 (fingerprint -> alert object), which the notifier writes first: the
                                 truth where the kind's state is behind it (a receiver added or removed
                                 since); None after a failed write, or where the log cannot be read

    A kind whose receivers POST elsewhere than their configured url says where (post_url).
    Every payload is JSON; the notifier signs, sends and retries it (pipeline/sinks/notify.py).
    """

    kind: ClassVar[str]         # the `kind` of [[alerts.receivers]] (RECEIVER_KINDS)
    state_file: ClassVar[str]   # its state under <data_dir>/notify/
    counts: ClassVar[str]       # the NotifyStats field its payloads count in

    def __init__(self, cfg: AlertsConfig, receivers: list[Receiver], silences: SilenceStore | None,
                 state_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.receivers = receivers
        self.state_dir = state_dir  # <data_dir>/notify/, for what a kind keeps beside its state_file; None: nothing

    @staticmethod
    def post_url(url: str) -> str:
        """Where a receiver configured with `url` is POSTed to."""
        return url

    def add(self, changes: list[dict[str, Any]], now: float) -> None:
        """Alert state changes, before enqueue() is called with the same ones."""

    def enqueue(self, changes: list[dict[str, Any]], now: float, acked: Callable[[str], int]) -> Enqueued:
        """The payloads due now for each receiver; `acked(name)`: the seq its outbox has delivered up to."""
        raise NotImplementedError

    def written(self, last_seq: dict[str, int]) -> None:
        """The last enqueue() is durable; the seq of each outbox's last new record."""

    def next_wakeup(self) -> float | None:
        """The earliest time enqueue() may have something without new changes (None: nothing pending)."""
        return None

    def at_send(self, payload: Any, now: float) -> Any:
        """The payload as sent at `now` (unchanged by default; never mutate it: it is the record's)."""
        return payload

    def expired(self, receiver: str, payloads: list[Any]) -> None:
        """Payloads one receiver never got (dead-lettered for age). By default nothing: a kind whose later
        payloads say everything again (Alertmanager's re-push) loses nothing by them."""

    def resend(self, receiver: str) -> None:
        """The receiver can be told again what it lost (see expired)."""

    def snapshot(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any], latest: dict[str, dict[str, Any]] | None) -> None:
        pass
