"""The wire format of a bus message: one Arrow IPC stream per record batch.

The value is an Arrow IPC stream (schema + one record batch), uncompressed, so a
consumer turns it into numpy arrays without per-value Python work. Compression is
the producer's: it compresses whole Kafka record batches (many messages) with zstd.
Arrow's own per-buffer zstd was measured at ~300 us per 8-row message against ~25 us
without, for a few percent of size. Headers say what it
is: `fw-schema` (record type) and `fw-version` (schema version). A consumer accepts
a message only when its headers name a schema it knows, at its version or the previous
one it upgrades (model.UPGRADES: the batch comes out at the current version, so every
role downstream sees one schema), and the payload decodes to exactly that schema (an open schema: its fields first,
then any others), one stream with one batch and nothing after it. Anything else is a DecodeError,
whose reason goes to the dead-letter topic with the message; for a version it does not
read, the reason says which side of a rolling upgrade is behind (docs/data.md#schema-changes).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.ipc as ipc

from pipeline.model import UPGRADES, WIRE_SCHEMAS, schema_name, schema_version

HEADER_SCHEMA = "fw-schema"
HEADER_VERSION = "fw-version"

_BY_NAME = {schema_name(s): s for s in WIRE_SCHEMAS}
_WRITE_OPTIONS = ipc.IpcWriteOptions(compression=None)


class DecodeError(ValueError):
    """A message that is not a valid Fleetwatch batch; `reason` says why, for the dead letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode(batch: pa.RecordBatch) -> tuple[bytes, list[tuple[str, bytes]]]:
    """(value, headers) of one message."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, batch.schema, options=_WRITE_OPTIONS) as writer:
        writer.write_batch(batch)
    headers = [(HEADER_SCHEMA, schema_name(batch.schema).encode()),
               (HEADER_VERSION, str(schema_version(batch.schema)).encode())]
    return sink.getvalue().to_pybytes(), headers


def _number(version: str) -> bool:
    """A version header int() reads: ASCII digits (str.isdigit() is also true of '²', which int() refuses)."""
    return version.isascii() and version.isdigit()


def _upgrade_hint(version: str, readable: list[int]) -> str:
    """What to do about a version this consumer does not read (docs/data.md#schema-changes):
    consumers are upgraded before producers, so a newer one means this consumer is behind."""
    if not _number(version):
        return ""
    if int(version) > readable[-1]:
        return ": the producer is newer than this consumer; upgrade the consumers first, then the producers"
    return ": the producer is older than any version this consumer reads; upgrade the producer"


def _first_difference(payload: pa.Schema, expected: pa.Schema) -> str:
    """What a producer's owner changes first: the first field that differs, and how."""
    for i, want in enumerate(expected):
        if i >= len(payload):
            return f"field {i} {want.name!r} ({want.type}) is missing"
        got = payload.field(i)
        if got.name != want.name:
            return f"field {i} is {got.name!r}, expected {want.name!r} ({want.type})"
        if not got.type.equals(want.type):
            return f"field {want.name!r} is {got.type}, expected {want.type}"
        if got.nullable != want.nullable:
            return f"field {want.name!r} is {'' if got.nullable else 'not '}nullable, expected " \
                   f"{'' if want.nullable else 'not '}nullable"
    return f"{len(payload) - len(expected)} fields more than expected's {len(expected)}" \
        if len(payload) > len(expected) else "field metadata differs"


class Decoder:
    """Decodes message values. The schema message of a stream is checked against the
    schema its headers name once; later messages with the same schema bytes go
    straight to their record batch (~14 us instead of ~40 us for an 8-row batch)."""

    def __init__(self, max_schemas: int = 256) -> None:
        self._checked: dict[tuple[str, bytes], pa.Schema] = {}
        self._max = max_schemas

    def decode(self, value: bytes | None, headers: list[tuple[str, bytes]] | tuple) -> pa.RecordBatch:
        """The record batch of a message, or DecodeError saying what is wrong with it."""
        h = {k: v for k, v in headers or () if v is not None}  # (Kafka allows a header without a value)
        name = h.get(HEADER_SCHEMA, b"").decode(errors="replace")
        if name not in _BY_NAME:
            raise DecodeError(f"unknown or missing {HEADER_SCHEMA} header {name!r}")
        expected, upgrade = _BY_NAME[name], None
        version = h.get(HEADER_VERSION, b"").decode(errors="replace")
        if version != str(schema_version(expected)):
            older = UPGRADES.get((name, int(version))) if _number(version) else None
            if older is None:
                readable = sorted([schema_version(expected)] + [v for n, v in UPGRADES if n == name])
                raise DecodeError(f"{name}: schema version {version!r}, this consumer reads version "
                                  f"{' or '.join(map(str, readable))}{_upgrade_hint(version, readable)}")
            expected, upgrade = older
        if not value:
            raise DecodeError(f"{name}: empty value")
        try:
            source = pa.BufferReader(pa.py_buffer(value))
            reader = ipc.MessageReader.open_stream(source)
            schema_message = reader.read_next_message()
            key = (f"{name}.v{version}", schema_message.metadata.to_pybytes())
            schema = self._checked.get(key) or self._check(key, ipc.read_schema(schema_message), expected)
            batch = ipc.read_record_batch(reader.read_next_message(), schema)
            # Fully: a string column's offsets inside its data too (checked only at its ends, offsets
            # past them had read the heap, or crashed a consumer at its first compute kernel).
            batch.validate(full=True)
            if batch.get_total_buffer_size() > 2 * len(value) + 4096:  # (uncompressed: the buffers are the body)
                raise DecodeError(f"{name}: a {len(value)}-byte message decodes to {batch.get_total_buffer_size()} "
                                  f"bytes: compressed, which Fleetwatch's producers never send")
        except StopIteration:
            raise DecodeError(f"{name}: no record batch in the Arrow IPC stream") from None
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
            raise DecodeError(f"{name}: not a readable Arrow IPC stream ({e})") from None
        try:
            reader.read_next_message()
        except StopIteration:  # the end-of-stream marker: nothing may follow it (a second stream)
            if source.tell() < len(value):
                raise DecodeError(f"{name}: {len(value) - source.tell()} bytes after the end of the Arrow IPC "
                                  "stream (a second stream?)") from None
            return batch if upgrade is None else upgrade(batch)
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
            raise DecodeError(f"{name}: trailing bytes after the record batch ({e})") from None
        raise DecodeError(f"{name}: expected one record batch, found more")

    def _check(self, key: tuple[str, bytes], payload: pa.Schema, expected: pa.Schema) -> pa.Schema:
        name = schema_name(expected)
        open_schema = expected.metadata.get(b"fleetwatch.open")
        fixed = pa.schema(list(payload)[:len(expected)]) if open_schema else payload
        if not fixed.equals(expected):
            raise DecodeError(f"{name}: payload schema differs from {name} v{schema_version(expected)}: "
                              f"{_first_difference(fixed, expected)}")
        schema = payload.with_metadata(expected.metadata) if open_schema else expected
        if len(self._checked) >= self._max:  # many distinct open schemas: start over
            self._checked.clear()
        self._checked[key] = schema
        return schema
