"""Each GPU's flexibility class: how much of its work a cap may cost (planner.CLASS_MAX_LOSS).

The first `[[power.classes]]` rule whose globs all match wins, else `power.default_class`.
A rule names nodes (`nodes`, default every node) and, optionally, the Kubernetes workload
on the GPU as the samples carry it (`namespace`, `pod`: dcgm-exporter's pod mapping,
gpu_sample's workload columns), so a class can follow a job rather than a machine: an
inference namespace never capped on any node, a batch namespace capped deeply. A GPU's
class is taken again from each of its samples where a rule names a workload (jobs come and
go), once per GPU otherwise. A rule may also name a label of the node (`feature`: a Slurm
feature, power/node_labels.py); where labels are configured and not read yet, every GPU is
class 0, and a node a read does not list takes the most protective class its labels could
give it (said once per node: its scheduler names it otherwise than its samples do).
"""

from __future__ import annotations

import fnmatch
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import PowerConfig

log = logging.getLogger("pipeline.power")

CACHE_MAX = 65536  # distinct node, namespace and pod keys remembered
_SEP = "\x1f"  # between a row's node, namespace and pod in its key (not in any name)


def scheduler_entry(by_node: dict, node: str):
    """A node's entry in what the scheduler says (its labels, its job), or None. Slurm names
    nodes by their short host name; samples may carry the full one."""
    if node in by_node:  # (by membership: a node listed with no labels is listed)
        return by_node[node]
    return by_node.get(node.split(".", 1)[0])


class FlexClasses:
    def __init__(self, settings: PowerConfig) -> None:
        self.rules, self.default = settings.classes, settings.default_class
        self.by_workload = any(r.namespace or r.pod for r in self.rules)  # classes change with the jobs
        self._known: dict[str, int] = {}  # key -> class: a fleet has few distinct ones
        self.node_labels: dict[str, frozenset[str]] = {}
        self.labels_known = settings.node_labels == "none"  # a source configured and not read yet: class 0
        self.version = 0  # bumped when the labels change: every GPU's class is taken again
        self.source = settings.node_labels
        self.by_feature = any(r.feature for r in self.rules)
        self.seen: set[str] = set()      # nodes the samples named (for what a read does not list)
        self.unlisted: set[str] = set()  # of those, the ones a read did not list, once said
        self._pending: set[str] = set()  # found unlisted, not said yet
        self._said = False               # said once since the last read: one line a read at most

    def set_node_labels(self, labels: dict[str, frozenset[str]]) -> bool:
        """Every node's labels, as the source read them; whether any class may have changed."""
        self._said = False
        if self.by_feature:  # the nodes named before this read (at a start, before the first)
            self._pending |= {n for n in self.seen - self.unlisted if scheduler_entry(labels, n) is None}
            self._say_unlisted()
        if self.labels_known and labels == self.node_labels:
            return False
        self.node_labels, self.labels_known = labels, True
        self._known.clear()
        self.version += 1
        return True

    def _say_unlisted(self) -> None:
        """A warning naming a few of the nodes found unlisted, at most once a read."""
        if not self._pending or self._said:
            return
        names, more = sorted(self._pending), len(self._pending) - 5
        cause = ("is Slurm's NodeName for them other than the host name the samples carry (NodeHostname), "
                 "or a short name where they carry a full one?" if self.source == "slurm" else
                 "is their Kubernetes node name other than the host name the samples carry (dcgm-exporter's "
                 "Hostname: its NODE_NAME from spec.nodeName)?")
        log.warning("power: node labels from %s do not list %d node(s) the samples name (%s%s): %s Until a read "
                    "lists them, their GPUs take the most protective class a `feature` rule could give them",
                    self.source, len(names), ", ".join(names[:5]), f" and {more} more" if more > 0 else "", cause)
        self.unlisted |= self._pending
        self._pending.clear()
        self._said = True

    def of(self, node: str, namespace: str | None = None, pod: str | None = None) -> int:
        """A GPU several pods share (dcgm-exporter lists them comma-separated, in the same order
        as their namespaces) takes the most protective class of theirs."""
        spaces, pods = (namespace or "").split(","), (pod or "").split(",")
        pairs = zip(spaces, pods) if len(spaces) == len(pods) else ((n, q) for n in spaces for q in pods)
        return min(self._of_one(node, n.strip(), q.strip()) for n, q in pairs)

    def _of_one(self, node: str, namespace: str, pod: str) -> int:
        if self.by_feature and len(self.seen) < CACHE_MAX:
            self.seen.add(node)
        if not self.labels_known:
            return 0
        labels = scheduler_entry(self.node_labels, node)
        if labels is None and self.by_feature and node not in self.unlisted:
            self._pending.add(node)
        # A node a read does not list has labels no one knows: rather than cap it on a guess (the
        # default), it takes the most protective class a `feature` rule could give it, so that a
        # node its scheduler protects (noflex: 0) is never capped because it is named otherwise.
        could: list[int] = []
        for rule in self.rules:
            if not (fnmatch.fnmatchcase(node, rule.nodes or "*")
                    and (not rule.namespace or fnmatch.fnmatchcase(namespace, rule.namespace))
                    and (not rule.pod or fnmatch.fnmatchcase(pod, rule.pod))):
                continue
            if not rule.feature:
                return min([*could, rule.flex_class])
            if labels is None:
                could.append(rule.flex_class)
            elif any(fnmatch.fnmatchcase(f, rule.feature) for f in labels):
                return rule.flex_class
        return min([*could, self.default])

    def of_rows(self, batch: pa.RecordBatch) -> np.ndarray:
        """The class of each row's GPU (int64), one rule lookup per distinct node and workload."""
        keys = (pc.binary_join_element_wise(*(pc.fill_null(batch.column(c), "") for c in ("node", "namespace", "pod")),
                                            _SEP) if self.by_workload else batch.column("node"))
        encoded = pc.dictionary_encode(keys)
        classes = np.array([self._class_of_key(k) for k in encoded.dictionary.to_pylist()], np.int64)
        self._say_unlisted()  # after the batch: a few of its nodes in one line
        return classes[encoded.indices.to_numpy(zero_copy_only=False)]

    def _class_of_key(self, key: str) -> int:
        if key not in self._known:
            if len(self._known) >= CACHE_MAX:  # pods come and go: a fresh start now and then
                self._known.clear()
            self._known[key] = self.of(*key.split(_SEP))
        return self._known[key]
