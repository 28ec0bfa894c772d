"""The bus interface every role talks to. Kafka implements the same three verbs."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import pyarrow as pa


class Topic(StrEnum):
    GPU = "fleetwatch.gpu"
    FACILITY = "fleetwatch.facility"
    EVENTS = "fleetwatch.events"
    ALERTS = "fleetwatch.alerts"
    HEALTH = "fleetwatch.health"
    LABELS = "fleetwatch.labels"
    RACKS = "fleetwatch.racks"  # rack summaries, the rack tier of detection to the site tier (Kafka only)
    STATE = "fleetwatch.state"  # detector checkpoints, one per partition and tier (Kafka only)
    POWER_REQUESTS = "fleetwatch.power.requests"  # power requests in: the grid signal (a utility's or BMS gateway's)
    POWER_CAPS = "fleetwatch.power.caps"        # power caps to the agents: commands, by rack
    POWER_ACTIONS = "fleetwatch.power.actions"  # what the agents did with them, by rack
    POWER_REPORTS = "fleetwatch.power.reports"  # one row per power request when it is over, by site
    REMEDIATION = "fleetwatch.remediation"      # the remediation role's transitions, by node


# How long the alerts topic keeps its records at least (`fleetwatch topics create`), so a role that
# starts reads back every alert still firing that fired within it (the power role).
ALERTS_KEPT_H = 24 * 30

# Header of a message that repeats a state to show its sender is alive (FleetwatchWatchdog's
# heartbeat): it changes nothing, so the archive does not keep it (notify reads it: sinks/heartbeats.py).
HEARTBEAT = "fw-heartbeat"


@dataclass(frozen=True)
class Message:
    """One batch: the columnar payload of one scrape (or one detector tick)."""
    topic: Topic
    value: pa.RecordBatch
    key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    partition: int = -1  # where it came from on a partitioned bus (Kafka); -1 in-process
    offset: int = -1


class EndOfStream(Exception):
    """Raised by a subscription once every topic it reads has ended and it is drained."""


class Subscription(Protocol):
    # Async callables taking the set of partition numbers concerned.
    on_assigned: list    # run when partitions are assigned, before their messages are read
    before_revoke: list  # run before partitions move to another consumer (then it commits)
    assignments: int     # bumped each time partitions are (re)assigned to this consumer
    holds_input: bool    # True where input not yet committed waits on the bus (Kafka): reading can pause
    ready: set[int]      # partitions assigned and set up (on_assigned run): this consumer's now; empty in-process

    async def get_batch(self, max_messages: int = 256, timeout_s: float | None = None) -> list[Message]:
        """Up to `max_messages` in order; [] on timeout; EndOfStream when drained after end()."""

    async def publish(self, message: Message, partition: int | None = None, origin: int | None = None) -> None:
        """Output of processing this subscription's input: on a transactional
        subscription, with `origin` the input partition it came of, it becomes visible
        together with that partition's next commit."""

    async def commit(self) -> None:
        """Everything returned so far is processed and its output durable: the input
        offsets are committed (with the output, atomically, where transactional)."""

    def pause(self) -> None:
        """Stop reading the partitions assigned now, until resume() (where holds_input)."""

    def resume(self) -> None: ...

    def expect(self, partition: int, origins: set[int], maybe: bool = False) -> None:
        """Messages of this partition also come from these origins (rack-tier partitions),
        which may not have sent yet: an aligned reader waits for them (bus/align.py);
        `maybe`: they may send nothing here at all."""

    def forget(self, partitions: set[int]) -> None:
        """Commit nothing more of these partitions: they go to their next owner uncommitted."""

    async def held_still(self, partitions: set[int]) -> set[int]:
        """Those of `partitions` still this consumer's by the group's word, asked before output is
        written (a member frozen past its session may have lost some); the rest are forgotten."""


class Bus(Protocol):
    keyed: bool  # True where order holds only per key: producers then send one message per key
    dead_letters: int  # messages that did not decode, sent to the dead-letter topic

    async def start(self) -> None: ...

    async def publish(self, message: Message) -> None: ...

    async def flush(self) -> None:
        """Everything published so far is durable on the bus."""

    async def close(self) -> None: ...

    def subscribe(self, topics: list[Topic], group: str) -> Subscription: ...

    def listen(self, topic: Topic, keys: list[str], since_s: float = 0.0):
        """What is published on `topic` from now on in the partitions of `keys` (none: all),
        outside any group (commands to one node: its rack's power caps), and with `since_s`
        what was published that long before too (Kafka: by the records' times; in-process
        nothing was): `get_batch` as a Subscription's, `close()` when done."""

    async def end(self, topics: list[Topic]) -> None:
        """No more messages on these topics: subscribers drain, then see EndOfStream."""
