"""Node labels that set flexibility classes (power/classes.py: a `[[power.classes]]` rule's
`feature`), read from where a fleet already says which nodes may be capped.

A source is one `fetch()` that returns every node's labels. Slurm's are the node features
an administrator gives in slurm.conf or with `scontrol update NodeName=... Features=...`
(`sinfo -N -h -o "%N|%f"`; the cluster is the one `SLURM_CONF` names, as for any Slurm
client). `LabelPoller` runs a fetch in the background every `power.node_labels_interval_s`
from the power role's loop, so a slow scheduler never holds the control loop: a failure
keeps the labels last read (logged once until it changes), and until the first read every
GPU is class 0, so that a node its scheduler protects is never capped on a guess.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Protocol

from pipeline.power.classes import FlexClasses

log = logging.getLogger("pipeline.power")

Labels = dict[str, frozenset[str]]
FETCH_TIMEOUT_S = 10.0


class LabelsUnavailable(Exception):
    """The source could not say (what was wrong, and what to do)."""


class NodeLabelSource(Protocol):
    name: str

    async def fetch(self) -> Labels: ...


def parse_sinfo(text: str) -> Labels:
    """`sinfo -N -h -o "%N|%f"` lines: a node and its features, comma-separated, "(null)" for
    none; a node in several partitions is listed once per partition."""
    labels: dict[str, frozenset[str]] = {}
    for line in text.splitlines():
        node, sep, features = line.partition("|")
        node = node.strip()
        if not node or not sep:
            continue
        found = frozenset(f.strip() for f in features.split(",") if f.strip() and f.strip() != "(null)")
        labels[node] = labels.get(node, frozenset()) | found
    return labels


class SlurmFeatures:
    name = "slurm"

    def __init__(self, sinfo: str = "sinfo", env: dict[str, str] | None = None,
                 timeout_s: float = FETCH_TIMEOUT_S) -> None:
        self.sinfo, self.env, self.timeout_s = sinfo, env, timeout_s

    async def fetch(self) -> Labels:
        try:
            proc = await asyncio.create_subprocess_exec(self.sinfo, "-N", "-h", "-o", "%N|%f", env=self.env,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
        except OSError as e:  # not installed, not executable
            raise LabelsUnavailable(f"cannot run {self.sinfo!r} ({e.strerror or e}): install Slurm's client "
                                    f"(Debian: slurm-client) or set power.sinfo to its path") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout_s)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise LabelsUnavailable(f"{self.sinfo} did not answer within {self.timeout_s:g} s: is slurmctld up "
                                    f"and reachable from here?") from None
        if proc.returncode != 0:
            first = (err.decode(errors="replace").strip().splitlines() or ["no message"])[0]
            raise LabelsUnavailable(f"{self.sinfo} exited with {proc.returncode}: {first} (is slurmctld up, and "
                                    f"does SLURM_CONF name the cluster?)")
        return parse_sinfo(out.decode(errors="replace"))


class LabelPoller:
    """`poll()` from the role's loop: starts a fetch when one is due, hands a finished one's
    labels to the classes. Never waits on the source."""

    def __init__(self, source: NodeLabelSource, classes: FlexClasses, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source, self.classes, self.interval_s, self.clock = source, classes, interval_s, clock
        self._task: asyncio.Task | None = None
        self._next = -float("inf")
        self.failure = ""      # the last failure's message, "" after a read
        self.reads = 0
        self.failures = 0

    def poll(self) -> None:
        if self._task is not None and self._task.done():
            self._take(self._task)
            self._task = None
        if self._task is None and self.clock() >= self._next:
            self._next = self.clock() + self.interval_s
            self._task = asyncio.create_task(self.source.fetch())

    def _take(self, task: asyncio.Task) -> None:
        error = task.exception()
        if error is None:
            labels = task.result()
            changed = self.classes.set_node_labels(labels)
            self.reads += 1
            if self.failure or self.reads == 1:
                log.info("power: node labels from %s: %d nodes, %d with labels%s", self.source.name, len(labels),
                         sum(1 for v in labels.values() if v), " (read again after a failure)" if self.failure else "")
            elif changed:
                log.info("power: node labels from %s changed: flexibility classes taken again", self.source.name)
            self.failure = ""
            return
        self.failures += 1
        message = str(error) if isinstance(error, LabelsUnavailable) else f"{type(error).__name__}: {error}"
        if message != self.failure:  # once until it changes: a scheduler down for an hour is one line
            log.warning("power: node labels from %s: %s; %s", self.source.name, message,
                        "the labels last read stand" if self.classes.labels_known
                        else "until they are read every GPU is class 0 (never capped)")
        self.failure = message

    def status(self) -> dict:
        """For `fleetwatch power status --json`: whether the classes have the labels, and why not."""
        return {"source": self.source.name, "read": self.classes.labels_known, "nodes": len(self.classes.node_labels),
                "reads": self.reads, "failures": self.failures, "failing": self.failure or None}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


def poller_for(settings, classes: FlexClasses) -> LabelPoller | None:
    """The poller `power.node_labels` asks for; None for "none"."""
    if settings.node_labels == "slurm":
        return LabelPoller(SlurmFeatures(settings.sinfo), classes, settings.node_labels_interval_s)
    return None
