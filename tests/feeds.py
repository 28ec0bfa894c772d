"""Facility readings as real sites lay them out, for the detectors' and the power loop's tests."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc


def a_and_b_feeds(batch: pa.RecordBatch, share_a: float = 0.45) -> pa.RecordBatch:
    """Each rack fed by two PDUs (A and B, the usual redundant design), `<pdu>-a` and `<pdu>-b` sharing its
    power and energy `share_a` to the rest: the simulator's one PDU per rack, split."""
    pdu = pc.equal(batch.column("device_class"), "rack")
    rest, pdus = batch.filter(pc.invert(pdu)), batch.filter(pdu)
    device, value = batch.schema.get_field_index("device"), batch.schema.get_field_index("value")

    def feed(suffix: str, share: float) -> pa.RecordBatch:
        named = pdus.set_column(device, pdus.schema.field(device),
                                pc.binary_join_element_wise(pdus.column(device), pa.scalar(suffix), ""))
        return named.set_column(value, named.schema.field(value), pc.multiply(named.column(value), share))
    return pa.concat_batches([rest, feed("-a", share_a), feed("-b", 1.0 - share_a)])


def marked_bad(batch: pa.RecordBatch, rows: pa.BooleanArray) -> pa.RecordBatch:
    """The batch with `rows` marked bad by their BMS (`quality` 0: a lost link, a faulted sensor)."""
    q = batch.schema.get_field_index("quality")
    return batch.set_column(q, batch.schema.field(q), pc.if_else(rows, pa.scalar(0, pa.int8()), batch.column(q)))
