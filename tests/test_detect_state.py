"""KeyIndex (detect/state.py): keys to dense slots, in first-seen order, whatever the batch's size."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.detect.state import KeyIndex


class Reference:
    """The slots as KeyIndex gave them before it kept a dict: one hash probe of the batch
    against every known key, on each call."""

    def __init__(self, on_new) -> None:
        self.keys = pa.array([], pa.string())
        self.on_new = on_new

    def slots(self, keys) -> np.ndarray:
        idx = pc.index_in(keys, value_set=self.keys)
        if idx.null_count:
            new = pc.unique(pc.filter(keys, pc.is_null(idx)))
            first_rows = pc.index_in(new, value_set=keys).to_numpy().astype(np.int64)
            self.keys = pa.concat_arrays([self.keys, new.cast(pa.string())])
            self.on_new(new, first_rows)
            idx = pc.index_in(keys, value_set=self.keys)
        return idx.to_numpy().astype(np.int64)


def test_slots_are_the_same_for_small_and_large_batches_of_new_known_repeated_and_null_keys():
    rng = np.random.default_rng(7)
    told: dict[str, list] = {"ref": [], "new": []}
    ref = Reference(lambda k, r: told["ref"].append((k.to_pylist(), r.tolist())))
    ki = KeyIndex(lambda k, r: told["new"].append((k.to_pylist(), r.tolist())))
    universe = [f"GPU-{i:05d}" for i in range(3000)] + [None]
    known = 0
    for step in range(120):
        # Whole-fleet batches at first and now and then (one probe), a node's few rows otherwise
        # (the dict), each mixing keys seen with keys never seen, repeats and the null key.
        size = 2000 if step in (0, 1, 40, 90) else int(rng.choice([1, 3, 8, 8, 16, 64]))
        pick = rng.integers(0, min(len(universe), known + 40), size)
        vals = [universe[i] for i in pick]
        if step % 5 == 0:
            vals += vals[: size // 2 + 1]  # repeated keys within the batch
        if step % 7 == 3:
            vals.append(None)
        known = max(known, int(pick.max()) + 1)
        arr = pa.array(vals, pa.large_string() if step % 11 == 0 else pa.string())
        if step % 13 == 0:
            arr = pa.chunked_array([arr.slice(0, len(arr) // 2), arr.slice(len(arr) // 2)])
        expected, got = ref.slots(arr), ki.slots(arr)
        assert got.dtype == np.int64 and got.tolist() == expected.tolist(), step
        assert ki.keys.to_pylist() == ref.keys.to_pylist() and len(ki) == len(ref.keys)
    assert told["new"] == told["ref"]  # on_new: each key once, in first-seen order, with its first row
    assert sum(len(k) for k, _ in told["new"]) == len(ki) > 1000
    assert None in ki.keys.to_pylist()  # a null is a key of its own


def test_a_node_s_batch_against_a_large_fleet_registers_its_new_gpus_in_order():
    told = []
    ki = KeyIndex(lambda keys, rows: told.append((keys.to_pylist(), rows.tolist())))
    fleet = pa.array([f"GPU-{i:06d}" for i in range(10_000)])
    assert ki.slots(fleet).tolist() == list(range(10_000))
    node = pa.array(["GPU-000042", "new-b", "GPU-000007", "new-a", "new-b", "GPU-000042"])
    assert ki.slots(node).tolist() == [42, 10_000, 7, 10_001, 10_000, 42]
    assert told[-1] == (["new-b", "new-a"], [1, 3])
    assert ki.slots(pa.array(["new-a", "GPU-009999"])).tolist() == [10_001, 9_999]
    assert ki.keys[10_001].as_py() == "new-a" and len(ki) == 10_002
    again = pa.array(["new-c"] * 3)
    assert ki.slots(again).tolist() == [10_002] * 3 and ki.slots(again) is ki.slots(again)  # the same column: cached
    assert ki.slots(pa.array([], pa.string())).tolist() == []
