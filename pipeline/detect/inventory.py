"""Who is who: the GPUs, nodes, racks and facility points the engine has seen, each
with a dense slot (the index of its state in every family's arrays), its labels, and
the bus key its data arrives under. Identities are not detector state: a checkpoint
carries them as its rows' labels and `slots_for` registers them again."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.bus.keys import partition_for
from pipeline.detect.health import NodeIdentity
from pipeline.detect.state import KeyIndex, SlotArrays
from pipeline.model import PointKind, point_kind

log = logging.getLogger("pipeline.detect.engine")


class Inventory:
    def __init__(self, partitions: int = 1) -> None:
        self.partitions = partitions  # of the bus's rack-keyed topics (repartition): event time is per partition
        self.current: pa.RecordBatch | None = None  # the batch whose new keys are being registered
        # Keys -> slots: GPU UUID, node name, "site/rack", "device/metric".
        self.gpu_ids = KeyIndex(self._new_gpus)
        self.node_ids = KeyIndex(self._new_nodes)
        self.rack_ids = KeyIndex(self._new_racks)
        self.point_ids = KeyIndex(self._new_points)
        self.model_ids = KeyIndex()  # GPU model names (a null: not sent)
        # retired: replaced by another UUID in its (node, index), or let go (`let_go`); unplaced: let go, and
        # not placed again since (by a checkpoint, or by reporting: `seat`)
        self.gpu = SlotArrays({"node": (np.int64, -1), "index": (np.int64, 0),
                               "retired": (np.bool_, False), "unplaced": (np.bool_, False)})
        self.node = SlotArrays({"rack": (np.int64, -1), "model": (np.int64, -1)})  # model: of its GPUs, as sent
        self.point = SlotArrays({"rack": (np.int64, -1), "kind": (np.int8, PointKind.OTHER)})
        self.gpu_count = 0
        self.node_names: list[str] = []
        self.rack_names: list[tuple[str, str]] = []   # (site, rack)
        self.rack_site: list[int] = []  # site index of each rack slot (racks of one site are peers)
        self.rack_partition = np.zeros(0, np.int64)  # the partition each rack's data travel in (bus/keys.py)
        self.site_index: dict[str, int] = {}
        self.point_devices: list[str] = []
        self.point_classes: list[str] = []  # each point's device_class (what its kind was read from)
        self.gpu_at: dict[tuple[int, int], int] = {}  # (node, GPU index) -> the slot of the GPU there now
        self.replaced: list[tuple[int, int]] = []     # (old slot, new slot) seen, not yet handled
        self._labels: tuple[np.ndarray, np.ndarray] | None = None  # (site, rack) name per rack slot (reracked)

    @property
    def node_count(self) -> int:
        return len(self.node_names)

    @property
    def rack_count(self) -> int:
        return len(self.rack_ids)

    # ---- new keys ----------------------------------------------------------------

    def _new_nodes(self, keys: pa.Array, rows: np.ndarray) -> None:
        b = self.current
        rack_keys = pc.binary_join_element_wise(b.column("site").take(rows), b.column("rack").take(rows), "/")
        racks = self.rack_ids.slots(rack_keys)
        start = len(self.node_names)
        self.node_names.extend(keys.to_pylist())
        self.node.ensure(len(self.node_names))
        self.node.rack[start:start + len(rows)] = racks

    def _new_racks(self, keys: pa.Array, rows: np.ndarray) -> None:
        parts = []
        for key in keys.to_pylist():
            site, rack = key.split("/", 1)
            self.rack_names.append((site, rack))
            self.rack_site.append(self.site_index.setdefault(site, len(self.site_index)))
            parts.append(partition_for(rack or site, self.partitions))
        self.rack_partition = np.concatenate([self.rack_partition, np.asarray(parts, np.int64)])

    def repartition(self, partitions: int) -> None:
        """The bus's rack-keyed topics have `partitions` (the cluster's count, which may differ
        from kafka.partitions): each rack's data travel in the partition that count gives."""
        self.partitions = partitions
        self.rack_partition = np.asarray([partition_for(rack or site, partitions) for site, rack in self.rack_names],
                                         np.int64)

    def _new_gpus(self, keys: pa.Array, rows: np.ndarray) -> None:
        b = self.current
        # Look up the whole column so that new nodes' row positions refer to this batch.
        nodes = self.node_ids.slots(b.column("node"))[rows]
        start = self.gpu_count
        self.gpu_count = start + len(rows)
        gpu = self.gpu
        gpu.ensure(self.gpu_count)
        self._seat(np.arange(start, self.gpu_count), nodes, b.column("gpu").take(rows).to_numpy(zero_copy_only=False))

    def _seat(self, slots: np.ndarray, nodes: np.ndarray, index: np.ndarray) -> None:
        """GPUs seen for the first time (or as if: `let_go`) where they report: one in a (node,
        index) that has another is taken as its replacement (`replacements`)."""
        gpu = self.gpu
        gpu.node[slots], gpu.index[slots] = nodes, index
        gpu.retired[slots] = gpu.unplaced[slots] = False
        for s in slots.tolist():
            key = (int(gpu.node[s]), int(gpu.index[s]))
            old = self.gpu_at.get(key)
            if old is not None and old != s and not gpu.retired[old]:
                self.replaced.append((old, s))
            self.gpu_at[key] = s

    def seat(self, slots: np.ndarray, batch: pa.RecordBatch) -> None:
        """The let-go GPUs among this batch's (`slots`, its rows') report: placed where they do, as new."""
        rows = np.flatnonzero(self.gpu.unplaced[slots])
        if rows.size == 0:
            return
        seated, first = np.unique(slots[rows], return_index=True)
        take = pa.array(rows[first])
        self._seat(seated, self.node_ids.slots(batch.column("node").take(take)),
                   batch.column("gpu").take(take).to_numpy(zero_copy_only=False))

    def _new_points(self, keys: pa.Array, rows: np.ndarray) -> None:
        b = self.current
        start = len(self.point_devices)
        self.point.ensure(start + len(rows))
        devices = b.column("device").take(rows).to_pylist()
        metrics = b.column("metric").take(rows).to_pylist()
        racks = b.column("rack").take(rows).to_pylist()
        sites = b.column("site").take(rows).to_pylist()
        classes = b.column("device_class").take(rows).to_pylist()
        for i, (cls, metric, rack, site) in enumerate(zip(classes, metrics, racks, sites)):
            self.point.kind[start + i] = point_kind(cls, metric)
            # Site-level devices (the main meter) belong to the site's entry, rack "".
            self.point.rack[start + i] = self.rack_ids.slots(pa.array([f"{site}/{rack}"]))[0]
        self.point_devices.extend(devices)
        self.point_classes.extend(classes)

    # ---- moved GPUs -------------------------------------------------------------

    def moves(self, slots: np.ndarray, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(slots, their new node slots, their new indices) of the known GPUs this batch names under another
        node or index than before: a GPU moved to another node (the swap test of a fault), a node renamed.
        `batch` is the inventory's current one (a node never seen is registered)."""
        nodes = self.node_ids.slots(batch.column("node"))
        index = batch.column("gpu").to_numpy(zero_copy_only=False)
        rows = np.flatnonzero((self.gpu.node[slots] != nodes) | (self.gpu.index[slots] != index))
        if rows.size == 0:
            return rows, rows, rows
        moved, last = np.unique(slots[rows][::-1], return_index=True)  # (a slot's last row says where it is)
        at = rows[::-1][last]
        return moved, nodes[at], index[at]

    def reracked(self, node: np.ndarray, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        """(nodes, their new rack slots) of the known nodes this batch places in another rack than before
        (moved in the hall, or the rack label corrected); `node`: each row's node slot. A node's first row
        says where it is."""
        nodes, first = np.unique(node, return_index=True)
        if self._labels is None or len(self._labels[0]) != self.rack_count:
            self._labels = (np.asarray([s for s, _ in self.rack_names], object),
                            np.asarray([r for _, r in self.rack_names], object))
        was = self.node.rack[nodes]
        if batch.num_rows <= 4 * first.size:  # (a node's scrape: the whole column is as cheap as its first rows)
            site = batch.column("site").to_numpy(zero_copy_only=False)[first]
            rack = batch.column("rack").to_numpy(zero_copy_only=False)[first]
        else:
            take = pa.array(first)
            site = batch.column("site").take(take).to_numpy(zero_copy_only=False)
            rack = batch.column("rack").take(take).to_numpy(zero_copy_only=False)
        other = np.flatnonzero((rack != self._labels[1][was]) | (site != self._labels[0][was]))
        if other.size == 0:
            return other, other
        racks = self.rack_ids.slots(pa.array([f"{s}/{r}" for s, r in zip(site[other], rack[other])], pa.string()))
        return nodes[other], racks

    def move(self, slots: np.ndarray, nodes: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Put GPUs where they report now; a GPU that reported where a moved one is now, and was not moved
        itself, is taken as replaced by it (as a new UUID would be: `replacements`). Returns the nodes they
        left."""
        gpu = self.gpu
        left = np.unique(gpu.node[slots])
        for s in slots.tolist():
            key = (int(gpu.node[s]), int(gpu.index[s]))
            if self.gpu_at.get(key) == s:
                del self.gpu_at[key]
        gpu.node[slots], gpu.index[slots] = nodes, index
        for s in slots.tolist():
            key = (int(gpu.node[s]), int(gpu.index[s]))
            there = self.gpu_at.get(key)
            if there is not None and there != s and not gpu.retired[there] and \
                    (int(gpu.node[there]), int(gpu.index[there])) == key:
                self.replaced.append((there, s))
            self.gpu_at[key] = s
        return left

    # ---- partitions that move ------------------------------------------------------

    def gpus_of(self, partitions: set[int]) -> np.ndarray:
        """Every GPU slot (retired ones too) on a node of a rack whose data travel in `partitions`."""
        n = self.gpu_count
        if n == 0 or not partitions:
            return np.zeros(0, np.int64)
        return np.flatnonzero(np.isin(self.rack_partition[self.node.rack[self.gpu.node[:n]]], list(partitions)))

    def let_go(self, gpus: np.ndarray) -> None:
        """GPUs of partitions this process no longer owns, as if never seen: expected nowhere, and
        placed again by a checkpoint (`place`) or where they next report (`seat`)."""
        self.gpu.retired[gpus] = self.gpu.unplaced[gpus] = True

    def place(self, scope: str, slots: np.ndarray, ids: pa.RecordBatch) -> None:
        """Entities restored from a checkpoint are where it says they were: a process given back a
        partition it was fenced from may have seen them moved, replaced or re-racked since, and the rows
        it reads again say so once more (the same move or replacement, said again, not undone)."""
        if scope == "gpu":
            self.current = ids
            nodes = self.node_ids.slots(ids.column("node"))
            index = ids.column("gpu").to_numpy(zero_copy_only=False).astype(np.int64)
            gpu = self.gpu
            for s in slots.tolist():  # (where they were seen last is nobody's now)
                key = (int(gpu.node[s]), int(gpu.index[s]))
                if self.gpu_at.get(key) == s:
                    del self.gpu_at[key]
            gpu.node[slots], gpu.index[slots] = nodes, index
            gpu.retired[slots] = gpu.unplaced[slots] = False
            self.gpu_at.update(zip(zip(nodes.tolist(), index.tolist()), slots.tolist()))
        elif scope == "node":
            self.node.rack[slots] = self.rack_ids.slots(
                pc.binary_join_element_wise(ids.column("site"), ids.column("rack"), "/"))

    # ---- replaced GPUs -----------------------------------------------------------

    def replacements(self, present: np.ndarray) -> list[tuple[int, int]]:
        """(old slot, new slot) of each GPU replaced, given the GPU slots reporting now: a
        (node, GPU index) reporting under another UUID (or a retired one put back).
        Rare: plain Python. The caller retires the old series (`retire`)."""
        gpu = self.gpu
        pairs, self.replaced = self.replaced, []
        for s in np.unique(present[gpu.retired[present]]).tolist():  # a retired GPU reports again
            cur = self.gpu_at.get((int(gpu.node[s]), int(gpu.index[s])))
            if cur is not None and cur != s and not gpu.retired[cur]:
                pairs.append((cur, s))
            else:
                gpu.retired[s] = False
        here = set(present.tolist())
        out = []
        for old, new in pairs:
            key = (int(gpu.node[new]), int(gpu.index[new]))
            if old in here:  # both report: two GPUs claim one index, which is no replacement
                gpu.retired[new] = False
                self.gpu_at[key] = old
                log.warning("detect: %s and %s both report as GPU %d of %s; kept apart as two series",
                            self.gpu_ids.keys[old].as_py(), self.gpu_ids.keys[new].as_py(), key[1],
                            self.node_names[key[0]])
                continue
            self.gpu_at[key] = new
            out.append((old, new))
        return out

    # ---- labels and identities ---------------------------------------------------

    def labels_getter(self, scope: str):
        def gpu(slot: int) -> dict[str, str]:  # UUID: dcgm-exporter's label name (catalog.SCOPE_LABELS)
            return {**node(int(self.gpu.node[slot])), "gpu": str(int(self.gpu.index[slot])),
                    "UUID": self.gpu_ids.keys[slot].as_py()}

        def node(n: int) -> dict[str, str]:
            return {**rack(int(self.node.rack[n])), "node": self.node_names[n]}

        def rack(r: int) -> dict[str, str]:
            site, name = self.rack_names[r]
            return {"site": site, "rack": name}
        return {"gpu": gpu, "node": node, "rack": rack}[scope]

    def node_identity(self, n: int) -> NodeIdentity:
        site, rack = self.rack_names[int(self.node.rack[n])]
        return NodeIdentity(site, rack, self.node_names[n])

    def identities(self, scope: str) -> pa.RecordBatch:
        """Every known entity of a scope, in slot order, with the labels that identify it
        and `owner`: the bus key its data arrives under (bus/keys.py: its rack, or its site
        where it has no rack)."""
        nodes = np.asarray(self.node_names, dtype=object)
        sites = np.asarray([s for s, _ in self.rack_names], dtype=object)
        racks = np.asarray([r for _, r in self.rack_names], dtype=object)
        owners = np.where(racks == "", sites, racks)
        if scope == "gpu":
            node = self.gpu.node[:self.gpu_count]
            rack = self.node.rack[node]
            cols = {"gpu_uuid": self.gpu_ids.keys, "node": nodes[node], "site": sites[rack], "rack": racks[rack],
                    "gpu": self.gpu.index[:self.gpu_count],
                    "owner": np.where(self.gpu.retired[:self.gpu_count], None, owners[rack])}  # retired: no partition
        elif scope == "node":
            rack = self.node.rack[:len(nodes)]
            cols = {"node": nodes, "site": sites[rack], "rack": racks[rack], "owner": owners[rack]}
        elif scope == "rack":  # a site's own entry (rack "") arrives keyed by the site
            cols = {"site": sites, "rack": racks, "owner": owners}
        else:
            rack = self.point.rack[:len(self.point_devices)]
            devices = self.point_devices  # (a key is device/metric, and a device's name may hold a "/")
            metrics = [key[len(device) + 1:] for key, device in zip(self.point_ids.keys.to_pylist(), devices)]
            cols = {"device": np.asarray(devices, object), "metric": np.asarray(metrics, object),
                    "site": sites[rack], "rack": racks[rack], "device_class": np.asarray(self.point_classes, object),
                    "owner": owners[rack]}
        return pa.RecordBatch.from_pydict({k: pa.array(v, pa.int16() if k == "gpu" else pa.string())
                                           if not isinstance(v, pa.Array) else v for k, v in cols.items()})

    def slots_for(self, scope: str, ids: pa.RecordBatch) -> np.ndarray:
        """Slots of the entities in `ids` (columns as `identities` gives them), registering
        the ones never seen."""
        self.current = ids
        if scope == "gpu":
            return self.gpu_ids.slots(ids.column("gpu_uuid"))
        if scope == "node":
            return self.node_ids.slots(ids.column("node"))
        if scope == "rack":
            return self.rack_ids.slots(pc.binary_join_element_wise(ids.column("site"), ids.column("rack"), "/"))
        return self.point_ids.slots(pc.binary_join_element_wise(ids.column("device"), ids.column("metric"), "/"))
