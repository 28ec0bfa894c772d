"""The schema-change policy (docs/data.md#schema-changes) without a broker: every record
schema on the bus reads its previous version and upgrades it (model.UPGRADES), through
the wire codec and into the archive, and an archive that holds files of both versions
reads back whole by column name. tests/e2e/test_rolling_upgrade.py runs the same over
Kafka with every consumer role."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.analytics.archive import scan
from pipeline.bus.codec import Decoder, encode
from pipeline.model import ARCHIVE_SCHEMAS, SCHEMAS, UPGRADES, WIRE_SCHEMAS, legacy_device_class, schema_name, schema_version
from pipeline.sinks.parquet import ArchiveWriter
from tests.conftest import make_config
from tests.test_codec import batches

CURRENT = {schema_name(s): s for s in WIRE_SCHEMAS}
DATASET = {schema_name(s): d for d, s in SCHEMAS.items()}
# Columns an upgrade derives from the old ones (as the old readers did) rather than leaving null.
DERIVED = {("facility_sample", "device_class"), ("detector_checkpoint", "device_class"), ("alert", "remediation"),
           ("node_health", "remediation")}
PREVIOUS = sorted(UPGRADES)
IDS = [f"{n}.v{v}" for n, v in PREVIOUS]


def downgraded(batch: pa.RecordBatch, old: pa.Schema) -> pa.RecordBatch:
    """`batch` as a producer of the older schema sends it: the old columns only."""
    return pa.RecordBatch.from_arrays([batch.column(f.name) for f in old], schema=old)


@pytest.mark.parametrize("schema", WIRE_SCHEMAS, ids=[schema_name(s) for s in WIRE_SCHEMAS])
def test_every_wire_schema_reads_its_previous_version(schema):
    """A consumer at version N reads N-1 of every record type there is one of."""
    name, version = schema_name(schema), schema_version(schema)
    if version > 1:
        assert (name, version - 1) in UPGRADES, f"{name} v{version}: no upgrade of v{version - 1} (model.UPGRADES)"
    for n, v in UPGRADES:
        assert n in CURRENT and v < schema_version(CURRENT[n]), f"UPGRADES names {n} v{v}, not an older version"


@pytest.mark.parametrize("key", PREVIOUS, ids=IDS)
def test_a_version_changes_columns_only_as_the_policy_allows(key):
    """From one version to the next, a column kept keeps its type and nullability (a new
    type is a new column: two releases), and a column added is nullable, or derived by
    the upgrade from the old columns. (A column dropped is the second release of a removal.)"""
    old, _ = UPGRADES[key]
    new = CURRENT[key[0]]
    assert schema_name(old) == key[0] and schema_version(old) == key[1]
    for f in old:
        if f.name in new.names:
            g = new.field(f.name)
            assert (g.type, g.nullable) == (f.type, f.nullable), f"{key}: {f.name} changed from {f} to {g}"
    added = [f for f in new if f.name not in old.names]
    assert all(f.nullable or (key[0], f.name) in DERIVED for f in added), \
        f"{key}: a column added must be nullable, or derived by the upgrade"


@pytest.mark.parametrize("key", PREVIOUS, ids=IDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_an_old_producer_s_message_decodes_at_the_current_version(key, data):
    """Through the codec: the old columns as sent, the new ones null (or derived)."""
    old, _ = UPGRADES[key]
    new = CURRENT[key[0]]
    sent = data.draw(batches(old))
    value, headers = encode(sent)
    assert dict(headers) == {"fw-schema": key[0].encode(), "fw-version": str(key[1]).encode()}
    back = Decoder().decode(value, headers)
    assert schema_version(back.schema) == schema_version(new)
    assert list(back.schema)[:len(new)] == list(new)
    kept = [n for n in old.names if n in new.names]
    assert back.select(kept).equals(sent.select(kept))  # as sent
    for f in (f for f in new if f.name not in old.names):
        column = back.column(f.name)
        if (key[0], f.name) in DERIVED:
            assert f.nullable or column.null_count == 0
        else:
            assert column.null_count == back.num_rows, f"{f.name}: not null after the upgrade"


def sim_tick(racks: int = 1):
    from pipeline.sources.simulate import FleetSimulator
    sim = FleetSimulator(make_config(fleet={"racks": racks, "nodes_per_rack": 2, "gpus_per_node": 2}).fleet,
                         start=datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=10))
    return sim.step()


# The telemetry's (alerts' and node health's: tests/test_remediation_catalog.py).
ARCHIVED = [k for k in PREVIOUS if k[0] in ("gpu_sample", "facility_sample")]


@pytest.mark.parametrize("key", ARCHIVED, ids=[f"{n}.v{v}" for n, v in ARCHIVED])
def test_an_archive_hour_with_files_of_both_versions_reads_back_whole(key, tmp_path):
    """Before the upgrade the archive wrote version N-1 files; after it, version N, into the
    same hour. The writer upgrades an old batch as it buffers it (one buffer, one version
    per file), and the dataset reads back by column name: polars through
    pipeline.analytics.archive.scan, DuckDB with union_by_name."""
    old, _ = UPGRADES[key]
    dataset = DATASET[key[0]]
    tick = sim_tick()
    current = tick.gpu if dataset == "gpu_samples" else tick.facility
    before = downgraded(current, old)
    # An archive of the previous release: its files have the old schema.
    hour = tmp_path / "archive" / dataset / "date=2026-01-01" / "hour=00"
    hour.mkdir(parents=True)
    pq.write_table(pa.Table.from_batches([before]), hour / "part-0000000000000000000-old-000001.parquet")
    writer = ArchiveWriter(tmp_path / "archive", writer_id="new")
    writer.add(dataset, before)   # an old producer's batch that reached this archive as it was
    writer.add(dataset, current)  # and a new one, in the same buffer
    (path,) = writer.flush()
    assert path.parent == hour
    assert pq.read_schema(path).equals(ARCHIVE_SCHEMAS[dataset], check_metadata=True)  # the current version

    rows = scan(tmp_path / "archive" / dataset).collect()
    assert rows.height == 3 * current.num_rows
    assert set(SCHEMAS[dataset].names) <= set(rows.columns)
    added = [f.name for f in SCHEMAS[dataset] if f.name not in old.names]
    if dataset == "facility_samples":  # derived as the upgrade derives it, file or message alike
        expected = legacy_device_class(current.column("device"), current.column("rack")).to_pylist()
        assert expected == current.column("device_class").to_pylist()  # the simulator's ids follow the rule
        assert rows["device_class"].to_list() == expected * 3
    else:
        assert all(rows[c].null_count() == 2 * current.num_rows + current.column(c).null_count for c in added)

    glob = f"{tmp_path}/archive/{dataset}/**/*.parquet"
    [(n, present)] = duckdb.sql(f"select count(*), count({added[0]}) from read_parquet('{glob}', "
                                "hive_partitioning=true, union_by_name=true)").fetchall()
    assert n == 3 * current.num_rows
    # DuckDB leaves the old file's rows null; the writer's file has them upgraded.
    new_rows = current.num_rows - current.column(added[0]).null_count
    assert present == (2 * current.num_rows if dataset == "facility_samples" else new_rows)


def test_an_old_alert_whose_evidence_is_not_a_json_object_still_decodes():
    """Found by the property test above: an alert v1 row naming a catalog alert with evidence
    that is not JSON, or JSON but no object, stopped the decoder (and so the consumer) in the
    upgrade; it gets the alert's catalog remediation, and intake judges the row itself."""
    from pipeline.model import ALERT_V1
    rows = [{"ts": datetime(2026, 1, 1, tzinfo=timezone.utc), "fingerprint": f"f{i}", "status": "firing",
             "alertname": "GpuXid", "severity": "critical", "starts_at": datetime(2026, 1, 1, tzinfo=timezone.utc),
             "labels_json": '{"alertname": "GpuXid"}', "evidence_json": e}
            for i, e in enumerate(["x", "7", "[1]", None])]
    v1 = pa.RecordBatch.from_pylist(rows, schema=ALERT_V1)
    back = Decoder().decode(*encode(v1))
    assert back.num_rows == 4 and len(set(back.column("remediation").to_pylist())) == 1
