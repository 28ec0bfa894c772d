"""The wire codec (pipeline/bus/codec.py) without a broker: what `encode` puts on a message
and what `Decoder` accepts back, or refuses with the reason a dead letter carries."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.bus.codec import HEADER_SCHEMA, HEADER_VERSION, DecodeError, Decoder, encode
from pipeline.model import CHECKPOINT, GPU_SAMPLE, WIRE_SCHEMAS, schema_name, schema_version

NAMES = [schema_name(s) for s in WIRE_SCHEMAS]
INT_RANGE = {pa.int8(): 2**7, pa.int16(): 2**15, pa.int32(): 2**31, pa.int64(): 2**63}


def values_of(field: pa.Field) -> st.SearchStrategy:
    t = field.type
    if pa.types.is_boolean(t):
        v = st.booleans()
    elif pa.types.is_floating(t):
        v = st.floats(allow_nan=False, width=64)
    elif pa.types.is_integer(t):
        v = st.integers(-INT_RANGE[t], INT_RANGE[t] - 1)
    elif pa.types.is_timestamp(t):
        v = st.integers(0, 2**62)  # nanoseconds since the epoch
    elif pa.types.is_string(t):
        v = st.text(max_size=12)
    else:
        raise AssertionError(f"no strategy for {field}")
    return st.one_of(st.none(), v) if field.nullable else v


@st.composite
def batches(draw, schema: pa.Schema | None = None, max_rows: int = 6) -> pa.RecordBatch:
    schema = schema if schema is not None else draw(st.sampled_from(WIRE_SCHEMAS))
    n = draw(st.integers(0, max_rows))
    columns = [pa.array(draw(st.lists(values_of(f), min_size=n, max_size=n)), type=f.type) for f in schema]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def one_row(schema: pa.Schema) -> pa.RecordBatch:
    """A row of a schema: zero, False or "x" in every field."""
    def value(t: pa.DataType):
        if pa.types.is_boolean(t):
            return False
        if pa.types.is_string(t):
            return "x"
        return 0
    return pa.RecordBatch.from_arrays([pa.array([value(f.type)], type=f.type) for f in schema], schema=schema)


def headers_of(name: str, version: int | str) -> list[tuple[str, bytes]]:
    return [(HEADER_SCHEMA, name.encode()), (HEADER_VERSION, str(version).encode())]


@pytest.mark.parametrize("schema", WIRE_SCHEMAS, ids=NAMES)
def test_every_wire_schema_round_trips_with_its_name_and_version_in_the_headers(schema):
    batch = one_row(schema)
    value, headers = encode(batch)
    assert isinstance(value, bytes)
    assert headers == headers_of(schema_name(schema), schema_version(schema))
    back = Decoder().decode(value, headers)
    assert back.equals(batch)
    assert back.schema.equals(schema, check_metadata=True)


def test_a_decoder_reads_many_messages_of_one_schema_and_of_several():
    decoder = Decoder()
    for _ in range(3):  # the second time from the checked-schema cache
        for schema in WIRE_SCHEMAS:
            assert decoder.decode(*encode(one_row(schema))).equals(one_row(schema))


@pytest.mark.parametrize("headers, says", [
    ([], "unknown or missing fw-schema header ''"),
    ([(HEADER_VERSION, b"1")], "unknown or missing fw-schema header ''"),
    (headers_of("gpu_samples", 1), "unknown or missing fw-schema header 'gpu_samples'"),
    (headers_of("no_such_schema", 1), "unknown or missing fw-schema header 'no_such_schema'"),
])
def test_an_unknown_or_missing_schema_header_is_refused(headers, says):
    value, _ = encode(one_row(GPU_SAMPLE))
    with pytest.raises(DecodeError) as e:
        Decoder().decode(value, headers)
    assert e.value.reason == says


@pytest.mark.parametrize("version", ["", "0", str(schema_version(GPU_SAMPLE) + 1), "one"])
def test_a_version_this_consumer_does_not_read_is_refused(version):
    value, _ = encode(one_row(GPU_SAMPLE))
    headers = [(HEADER_SCHEMA, b"gpu_sample")] + ([(HEADER_VERSION, version.encode())] if version else [])
    with pytest.raises(DecodeError, match=f"gpu_sample: schema version '{version}', this consumer reads version "
                                          f"(\\d+ or )*{schema_version(GPU_SAMPLE)}(: .*)?$") as e:
        Decoder().decode(value, headers)
    if version.isdigit():  # which side of a rolling upgrade is behind (docs/data.md#schema-changes)
        newer = int(version) > schema_version(GPU_SAMPLE)
        assert e.value.reason.endswith("upgrade the consumers first, then the producers" if newer
                                       else "upgrade the producer")


@pytest.mark.parametrize("value", [b"", None])
def test_an_empty_value_is_refused(value):
    with pytest.raises(DecodeError, match="^gpu_sample: empty value$"):
        Decoder().decode(value, headers_of("gpu_sample", schema_version(GPU_SAMPLE)))


def test_headers_of_another_schema_than_the_payload_are_refused():
    value, _ = encode(one_row(GPU_SAMPLE))
    with pytest.raises(DecodeError, match="^event: payload schema differs from event v"):
        Decoder().decode(value, headers_of("event", 1))


@pytest.mark.parametrize("keep", [1, 8, 100, -200, -9, -1])
def test_a_truncated_stream_is_refused_never_half_read(keep):
    value, headers = encode(one_row(GPU_SAMPLE))
    with pytest.raises(DecodeError, match="^gpu_sample: "):
        Decoder().decode(value[:keep], headers)


def test_a_value_that_is_not_arrow_is_refused():
    with pytest.raises(DecodeError, match="^gpu_sample: not a readable Arrow IPC stream"):
        Decoder().decode(b"{\"node\": \"r01-n01\"}" * 4, headers_of("gpu_sample", schema_version(GPU_SAMPLE)))


def test_a_stream_with_no_record_batch_is_refused():
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, GPU_SAMPLE):
        pass
    with pytest.raises(DecodeError, match="^gpu_sample: no record batch in the Arrow IPC stream$"):
        Decoder().decode(sink.getvalue().to_pybytes(), headers_of("gpu_sample", schema_version(GPU_SAMPLE)))


def test_two_batches_in_one_stream_are_refused():
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, GPU_SAMPLE) as writer:
        writer.write_batch(one_row(GPU_SAMPLE))
        writer.write_batch(one_row(GPU_SAMPLE))
    with pytest.raises(DecodeError, match="^gpu_sample: expected one record batch, found more$"):
        Decoder().decode(sink.getvalue().to_pybytes(), headers_of("gpu_sample", schema_version(GPU_SAMPLE)))


def test_two_streams_or_trailing_bytes_after_the_stream_are_refused():
    value, headers = encode(one_row(GPU_SAMPLE))
    with pytest.raises(DecodeError, match="^gpu_sample: .*(second stream|trailing bytes)"):
        Decoder().decode(value + value, headers)
    with pytest.raises(DecodeError, match="^gpu_sample: .*(second stream|trailing bytes)"):
        Decoder().decode(value + b"\x00" * 16, headers)


def test_an_open_schema_takes_extra_columns_after_its_own_and_keeps_its_metadata():
    extra = pa.schema([*CHECKPOINT, pa.field("thermal.mean", pa.float64())], metadata=CHECKPOINT.metadata)
    row = one_row(CHECKPOINT)
    batch = pa.RecordBatch.from_arrays([*row.columns, pa.array([1.5])], schema=extra)
    value, headers = encode(batch)
    assert headers == headers_of("detector_checkpoint", schema_version(CHECKPOINT))
    back = Decoder().decode(value, headers)
    assert back.schema.names == [*CHECKPOINT.names, "thermal.mean"]
    assert back.schema.metadata == CHECKPOINT.metadata
    assert back.column("thermal.mean").to_pylist() == [1.5]
    assert back.select(CHECKPOINT.names).equals(row.select(CHECKPOINT.names))


def test_an_open_schema_still_needs_its_own_columns_first():
    reordered = pa.schema([pa.field("thermal.mean", pa.float64()), *CHECKPOINT], metadata=CHECKPOINT.metadata)
    row = one_row(CHECKPOINT)
    batch = pa.RecordBatch.from_arrays([pa.array([1.5]), *row.columns], schema=reordered)
    with pytest.raises(DecodeError, match="^detector_checkpoint: payload schema differs from detector_checkpoint v"
                                          r"\d+: field 0 is 'thermal.mean', expected 'scope'"):
        Decoder().decode(*encode(batch))


def test_a_closed_schema_takes_no_extra_column():
    extra = pa.schema([*GPU_SAMPLE, pa.field("extra", pa.float64())], metadata=GPU_SAMPLE.metadata)
    row = one_row(GPU_SAMPLE)
    batch = pa.RecordBatch.from_arrays([*row.columns, pa.array([1.0])], schema=extra)
    with pytest.raises(DecodeError, match=r"^gpu_sample: payload schema differs from gpu_sample v\d+: 1 fields more "):
        Decoder().decode(*encode(batch))


@pytest.mark.parametrize("change, said", [
    (lambda f: f.with_nullable(True) if f.name == "ts" else f, "field 'ts' is nullable, expected not nullable"),
    (lambda f: f.with_type(pa.timestamp("us", tz="UTC")) if f.name == "ts" else f,
     "field 'ts' is timestamp[us, tz=UTC], expected timestamp[ns, tz=UTC]"),
    (lambda f: f.with_type(pa.large_string()) if f.name == "node" else f,
     "field 'node' is large_string, expected string"),
])
def test_a_payload_schema_that_differs_says_how_to_the_producer_s_owner(change, said):
    """Every difference had read the same ("payload schema differs"): its producer could not tell what to fix."""
    schema = pa.schema([change(f) for f in GPU_SAMPLE], metadata=GPU_SAMPLE.metadata)
    batch = pa.RecordBatch.from_arrays(one_row(GPU_SAMPLE).columns, schema=schema)
    with pytest.raises(DecodeError) as e:
        Decoder().decode(encode(batch)[0], headers_of("gpu_sample", schema_version(GPU_SAMPLE)))
    assert e.value.reason.endswith(said)


def test_a_decoder_with_room_for_few_open_schemas_starts_over_and_still_decodes():
    decoder = Decoder(max_schemas=2)
    for i in range(5):
        extra = pa.schema([*CHECKPOINT, pa.field(f"state.{i}", pa.float64())], metadata=CHECKPOINT.metadata)
        batch = pa.RecordBatch.from_arrays([*one_row(CHECKPOINT).columns, pa.array([float(i)])], schema=extra)
        assert decoder.decode(*encode(batch)).column(f"state.{i}").to_pylist() == [float(i)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_decode_of_encode_is_the_batch(batch):
    value, headers = encode(batch)
    back = Decoder().decode(value, headers)
    assert back.schema.equals(batch.schema, check_metadata=True)
    assert back.equals(batch)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(batches(), min_size=1, max_size=8))
def test_one_decoder_decodes_a_sequence_of_messages_of_mixed_schemas(sequence):
    decoder = Decoder()
    for batch in sequence:
        assert decoder.decode(*encode(batch)).equals(batch)


def test_a_facility_sample_of_version_1_is_upgraded_with_the_class_its_readers_read_off_the_id():
    """A rolling upgrade: collectors still on version 1 send no device_class; consumers
    already on version 2 read them (a rack's pdu-*, a cdu-*, the site's meter), and refuse
    versions they do not know saying which they read."""
    from pipeline.model import FACILITY_SAMPLE, FACILITY_SAMPLE_V1
    rows = {"ts": [1_767_225_600 * 10**9] * 4, "site": ["s"] * 4, "rack": ["r01", "r01", "", "r02"],
            "device": ["pdu-r01", "cdu-r01", "meter-main", "bms-17"], "metric": ["power_w", "flow_lpm", "power_w", "x"],
            "value": [1.0, 2.0, 3.0, 4.0], "quality": [1] * 4}
    v1 = pa.RecordBatch.from_pydict(rows, schema=FACILITY_SAMPLE_V1)
    value, headers = encode(v1)
    assert headers == headers_of("facility_sample", 1)
    back = Decoder().decode(value, headers)
    assert back.schema.equals(FACILITY_SAMPLE) and schema_version(back.schema) == 2
    assert back.column("device_class").to_pylist() == ["rack", "cdu", "meter", ""]
    assert back.select(FACILITY_SAMPLE_V1.names).to_pydict() == v1.to_pydict()
    with pytest.raises(DecodeError, match="schema version '3', this consumer reads version 1 or 2"):
        Decoder().decode(value, headers_of("facility_sample", 3))


def test_a_gpu_sample_of_version_2_is_upgraded_with_what_the_gpu_is_unknown():
    """A rolling upgrade: agents still on version 2 send no model, bus id, driver or serial;
    consumers on a later version read their samples with those null (and the power limit,
    v4, and the job, v5), the metrics as sent."""
    from pipeline.model import GPU_INFO, GPU_SAMPLE_V2, GPU_WORKLOAD
    v2 = one_row(GPU_SAMPLE_V2)
    value, headers = encode(v2)
    assert headers == headers_of("gpu_sample", 2)
    back = Decoder().decode(value, headers)
    assert back.schema.equals(GPU_SAMPLE) and schema_version(back.schema) == 5
    assert all(back.column(name).to_pylist() == [None] for name in (*GPU_INFO, *GPU_WORKLOAD, "power_limit_w"))
    assert back.select(GPU_SAMPLE_V2.names).to_pydict() == v2.to_pydict()


def _stream(batch: pa.RecordBatch, **options) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=pa.ipc.IpcWriteOptions(**options)) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def test_string_offsets_that_point_outside_their_data_are_refused():
    """Checked at their ends only, offsets inside a string column that point past its data had read
    the heap into a node's name, or crashed a consumer (a segfault) at its first compute kernel:
    every consumer of the topic, at every restart."""
    row = one_row(GPU_SAMPLE).take(pa.array([0, 0]))
    i = GPU_SAMPLE.get_field_index("node")
    bad = pa.Array.from_buffers(pa.string(), 2, [None, pa.array([0, 2_000_000_000, 7], pa.int32()).buffers()[1],
                                                 pa.py_buffer(b"r01-n01")])  # (its ends are fine)
    columns = list(row.columns)
    columns[i] = bad
    value = _stream(pa.RecordBatch.from_arrays(columns, schema=GPU_SAMPLE))
    with pytest.raises(DecodeError, match="^gpu_sample: not a readable Arrow IPC stream"):
        Decoder().decode(value, headers_of("gpu_sample", schema_version(GPU_SAMPLE)))


def test_a_compressed_body_is_refused():
    """A 39 KB zstd message had decoded to a 953 MiB column: Fleetwatch's producers never compress."""
    import numpy as np
    many = one_row(GPU_SAMPLE).take(pa.array(np.zeros(200_000, np.int64)))
    value = _stream(many, compression="zstd")
    assert len(value) < many.get_total_buffer_size() / 4
    with pytest.raises(DecodeError, match="^gpu_sample: a .*-byte message decodes to .* bytes: compressed"):
        Decoder().decode(value, headers_of("gpu_sample", schema_version(GPU_SAMPLE)))
    assert Decoder().decode(_stream(many), headers_of("gpu_sample", schema_version(GPU_SAMPLE))).num_rows == 200_000
