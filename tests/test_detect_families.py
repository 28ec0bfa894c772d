"""Detector families (detect/family.py): the engine finds every family's state by walking
the families, so a new family's state is checkpointed and restored with no registration,
and state held outside a declaration is refused."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.bus import Message, Topic
from pipeline.detect.catalog import ALERTS_BY_NAME, DETECTOR_ALERTS
from pipeline.detect.checkpoint import SCOPES, Checkpointer
from pipeline.detect.engine import FAMILIES, RACK_TIER, SITE_TIER, Engine
from pipeline.detect.family import Family, State
from pipeline.detect.state import SlotArrays
from pipeline.sources.simulate import FleetSimulator
from tests.conftest import make_config

START = datetime(2026, 1, 1, tzinfo=timezone.utc)


class SamplesSeen(Family):
    """A family the engine and the checkpoint were never told about."""
    topic = Topic.GPU
    seen = State("gpu", fields={"count": (np.int64, 0)}, checkpoint="samples_seen")

    def evaluate(self, b, out) -> None:
        self.seen.ensure(self.inventory.gpu_count)
        self.seen.count[b.slots] += 1


class Undeclared(Family):
    topic = Topic.GPU

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.hidden = SlotArrays({"x": (np.float64, 0.0)})

    def evaluate(self, b, out) -> None:
        pass


@pytest.fixture(scope="module")
def ticks():
    cfg = make_config(fleet={"racks": 2, "nodes_per_rack": 4, "fault_interval_s": 20, "seed": 5})
    sim = FleetSimulator(cfg.fleet, start=START)
    out = []
    for _ in range(300):
        tick = sim.step()
        out.append([Message(Topic.GPU, tick.gpu), Message(Topic.FACILITY, tick.facility)]
                   + ([Message(Topic.EVENTS, tick.events)] if tick.events is not None else []))
    return cfg, out


def run(engine: Engine, ticks) -> Engine:
    for msgs in ticks:
        for m in msgs:
            engine.process(m)
    return engine


def by_entity(batch: pa.RecordBatch) -> dict[tuple, str]:
    """Checkpoint rows keyed by their identity, values compared as text (NaN equals NaN)."""
    rows = batch.to_pylist()
    ident = ("scope", "gpu_uuid", "node", "site", "rack", "device", "metric")
    return {tuple(r[k] for k in ident): repr(sorted(r.items())) for r in rows}


def test_every_detector_alert_is_raised_by_exactly_one_family(ticks):
    cfg, _ = ticks
    engine = Engine(cfg)
    raised = [name for f in engine.families for name in f.raises]
    assert sorted(raised) == sorted(spec.name for spec in DETECTOR_ALERTS)
    for f in engine.families:  # the catalog's `family` of each alert is the family that raises it
        assert all(ALERTS_BY_NAME[name].family == f.name for name in f.raises), type(f).__name__
    assert len(FAMILIES) == len(engine.families) and all(f.topic in (Topic.GPU, Topic.FACILITY, Topic.EVENTS,
                                                                     Topic.RACKS) for f in engine.families)


def test_an_alert_suppresses_only_what_its_own_tier_or_a_later_one_judges():
    """Over Kafka the site tier runs apart, after the rack tier: a site alert cannot keep a
    rack-tier alert from firing (that is inhibition, at notify), a rack alert reaches the
    site tier in the rack summaries (`explained`)."""
    tier = {name: i for i, families in enumerate((RACK_TIER, SITE_TIER)) for f in families for name in f.raises}
    assert set(tier) == {spec.name for spec in DETECTOR_ALERTS}
    for spec in DETECTOR_ALERTS:
        assert all(tier[spec.name] <= tier[target] for target in spec.suppresses), spec.name


def test_a_new_familys_state_is_checkpointed_without_registering_it(ticks):
    cfg, msgs = ticks
    families = (*FAMILIES, SamplesSeen)
    first = run(Engine(cfg, families=families), msgs)
    assert "samples_seen" in first.state()["gpu"]
    snap = Checkpointer(first, 1).snapshot({0})[0]
    counts = snap.filter(pc.equal(snap.column("scope"), "gpu")).column("samples_seen.count").to_pylist()
    assert counts and set(counts) == {300.0}
    second = Engine(cfg, families=families)
    Checkpointer(second, 1).restore(snap)
    assert (second.family(SamplesSeen).seen.count[:second.inventory.gpu_count] == 300).all()


def test_restore_round_trips_every_familys_state(ticks):
    cfg, msgs = ticks
    first = run(Engine(cfg), msgs)
    snap = Checkpointer(first, 1).snapshot({0})[0]
    for f in first.families:  # every declared state array is in the checkpoint
        for scope, name, arrays in f.state():
            assert all(f"{name}.{field}" in snap.schema.names for field in arrays.fields), (type(f).__name__, name)
    state_columns = [c for c in snap.schema.names if "." in c and not c.startswith(("tracker.", "health."))]
    assert len(state_columns) >= 30
    second = Engine(cfg)
    Checkpointer(second, 1).restore(snap)
    again = Checkpointer(second, 1).snapshot({0})[0]
    assert sorted(again.schema.names) == sorted(snap.schema.names)
    assert by_entity(again) == by_entity(snap)
    for scope in SCOPES:  # every scope had entities with state to carry
        assert snap.filter(pc.equal(snap.column("scope"), scope)).num_rows, scope


def test_state_held_outside_a_declaration_is_refused(ticks):
    cfg, _ = ticks
    with pytest.raises(TypeError, match="Undeclared.hidden"):
        Engine(cfg, families=(*FAMILIES, Undeclared))
