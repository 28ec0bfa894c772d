"""Each GPU's flexibility class: how much of its work a cap may cost (planner.CLASS_MAX_LOSS).

The first `[[power.classes]]` rule whose globs all match wins, else `power.default_class`.
A rule names nodes (`nodes`, default every node) and, optionally, the Kubernetes workload
on the GPU as the samples carry it (`namespace`, `pod`: dcgm-exporter's pod mapping,
gpu_sample's workload columns), so a class can follow a job rather than a machine: an
inference namespace never capped on any node, a batch namespace capped deeply. A GPU's
class is taken again from each of its samples where a rule names a workload (jobs come and
go), once per GPU otherwise. A rule may also name a label of the node (`feature`: a Slurm
feature, power/node_labels.py); where labels are configured and not read yet, every GPU is
class 0.
"""

from __future__ import annotations

import fnmatch

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import PowerConfig

CACHE_MAX = 65536  # distinct node, namespace and pod keys remembered
_SEP = "\x1f"  # between a row's node, namespace and pod in its key (not in any name)


def scheduler_entry(by_node: dict, node: str):
    """A node's entry in what the scheduler says (its labels, its job), or None. Slurm names
    nodes by their short host name; samples may carry the full one."""
    return by_node.get(node) or by_node.get(node.split(".", 1)[0])


class FlexClasses:
    def __init__(self, settings: PowerConfig) -> None:
        self.rules, self.default = settings.classes, settings.default_class
        self.by_workload = any(r.namespace or r.pod for r in self.rules)  # classes change with the jobs
        self._known: dict[str, int] = {}  # key -> class: a fleet has few distinct ones
        self.node_labels: dict[str, frozenset[str]] = {}
        self.labels_known = settings.node_labels == "none"  # a source configured and not read yet: class 0
        self.version = 0  # bumped when the labels change: every GPU's class is taken again

    def set_node_labels(self, labels: dict[str, frozenset[str]]) -> bool:
        """Every node's labels, as the source read them; whether any class may have changed."""
        if self.labels_known and labels == self.node_labels:
            return False
        self.node_labels, self.labels_known = labels, True
        self._known.clear()
        self.version += 1
        return True

    def of(self, node: str, namespace: str | None = None, pod: str | None = None) -> int:
        """A GPU several pods share (dcgm-exporter lists them comma-separated, in the same order
        as their namespaces) takes the most protective class of theirs."""
        spaces, pods = (namespace or "").split(","), (pod or "").split(",")
        pairs = zip(spaces, pods) if len(spaces) == len(pods) else ((n, q) for n in spaces for q in pods)
        return min(self._of_one(node, n.strip(), q.strip()) for n, q in pairs)

    def _of_one(self, node: str, namespace: str, pod: str) -> int:
        if not self.labels_known:
            return 0
        labels = scheduler_entry(self.node_labels, node) or frozenset()
        for rule in self.rules:
            if (fnmatch.fnmatchcase(node, rule.nodes or "*")
                    and (not rule.namespace or fnmatch.fnmatchcase(namespace, rule.namespace))
                    and (not rule.pod or fnmatch.fnmatchcase(pod, rule.pod))
                    and (not rule.feature or any(fnmatch.fnmatchcase(f, rule.feature) for f in labels))):
                return rule.flex_class
        return self.default

    def of_rows(self, batch: pa.RecordBatch) -> np.ndarray:
        """The class of each row's GPU (int64), one rule lookup per distinct node and workload."""
        keys = (pc.binary_join_element_wise(*(pc.fill_null(batch.column(c), "") for c in ("node", "namespace", "pod")),
                                            _SEP) if self.by_workload else batch.column("node"))
        encoded = pc.dictionary_encode(keys)
        classes = np.array([self._class_of_key(k) for k in encoded.dictionary.to_pylist()], np.int64)
        return classes[encoded.indices.to_numpy(zero_copy_only=False)]

    def _class_of_key(self, key: str) -> int:
        if key not in self._known:
            if len(self._known) >= CACHE_MAX:  # pods come and go: a fresh start now and then
                self._known.clear()
            self._known[key] = self.of(*key.split(_SEP))
        return self._known[key]
