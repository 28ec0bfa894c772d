"""Record types and the Arrow schemas they travel and rest in.

Every record type is one Arrow schema with a name and a version in its metadata;
`schemas/<name>.v<version>.json` is the same schema, machine-readable, and a test
keeps the two equal. Telemetry moves as Arrow record batches (one per scrape),
so consumers turn a message into numpy arrays without per-value Python work.
"""

from __future__ import annotations

import enum
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

TS = pa.timestamp("ns", tz="UTC")


def _schema(name: str, version: int, fields: list[pa.Field], doc: str) -> pa.Schema:
    return pa.schema(fields, metadata={"fleetwatch.schema": name, "fleetwatch.version": str(version),
                                       "fleetwatch.doc": doc})


def _f(name: str, typ: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, typ, nullable=nullable, metadata={"doc": doc})


# Metrics in base units. A field the GPU does not support is null, never 0.
_GPU_FIELDS = [
    _f("ts", TS, "scrape time, UTC", nullable=False),
    _f("site", pa.string(), "site label", nullable=False),
    _f("rack", pa.string(), "rack label", nullable=False),
    _f("node", pa.string(), "node (host) name", nullable=False),
    _f("gpu", pa.int16(), "GPU index on the node", nullable=False),
    _f("gpu_uuid", pa.string(), "NVML UUID", nullable=False),
    _f("power_w", pa.float64(), "power draw, W"),
    _f("energy_j", pa.float64(), "energy since driver load, J (cumulative; resets with the GPU)"),
    _f("gpu_temp_c", pa.float64(), "GPU die temperature, C"),
    _f("mem_temp_c", pa.float64(), "HBM temperature, C"),
    _f("sm_clock_mhz", pa.float64(), "SM clock, MHz"),
    _f("mem_clock_mhz", pa.float64(), "memory clock, MHz"),
    _f("util_gpu", pa.float64(), "GPU utilisation, 0-1"),
    _f("util_mem", pa.float64(), "memory controller utilisation, 0-1"),
    _f("mem_used_bytes", pa.int64(), "framebuffer memory used, bytes"),
    _f("clock_event_reasons", pa.int64(), "NVML clocks event reasons bitmask"),
    _f("pstate", pa.int16(), "performance state P0-P15"),
    _f("pcie_replay_total", pa.int64(), "PCIe replay counter (cumulative)"),
    _f("ecc_sbe_volatile_total", pa.int64(), "corrected ECC errors since reset"),
    _f("ecc_dbe_volatile_total", pa.int64(), "uncorrected ECC errors since reset"),
    _f("remapped_rows_correctable", pa.int64(), "rows remapped for correctable errors"),
    _f("remapped_rows_uncorrectable", pa.int64(), "rows remapped for uncorrectable errors"),
    _f("remapped_rows_pending", pa.bool_(), "a row remap waits for a GPU reset"),
    _f("remapped_rows_failure", pa.bool_(), "a row remap failed"),
    _f("nvlink_crc_errors_total", pa.int64(), "NVLink CRC flit errors, all links (cumulative)"),
    _f("slowdown_temp_c", pa.float64(), "the GPU's own HW slowdown temperature threshold (NVML), C"),
]
# What the GPU is, where known (v3); last, so that the metric columns keep their positions.
GPU_INFO: tuple[str, ...] = ("model", "pci_bus_id", "driver_version", "serial")
# Who uses the GPU, where the collector knows it: dcgm-exporter's Kubernetes pod mapping (v3),
# the scheduler's job from its HPC job mapping (v5).
GPU_WORKLOAD: tuple[str, ...] = ("pod", "namespace", "container", "job")
_GPU_V3_FIELDS = _GPU_FIELDS + [
    _f("model", pa.string(), "GPU model name, e.g. NVIDIA H100 80GB HBM3 (NVML device name, dcgm-exporter modelName)"),
    _f("pci_bus_id", pa.string(), "PCI bus id, e.g. 00000000:18:00.0 (NVML busId, dcgm-exporter pci_bus_id)"),
    _f("driver_version", pa.string(), "NVIDIA driver version, e.g. 580.159.04"),
    _f("serial", pa.string(), "board serial number (NVML); null where unknown"),
    _f("pod", pa.string(), "Kubernetes pod using the GPU (dcgm-exporter's pod mapping); several: comma-separated"),
    _f("namespace", pa.string(), "the pod's namespace; several: comma-separated"),
    _f("container", pa.string(), "the pod's container; several: comma-separated"),
]
# How the GPU is set (v4): what its power is held to, a cap's or its default.
GPU_SETTINGS: tuple[str, ...] = ("power_limit_w",)
_GPU_V4_FIELDS = _GPU_V3_FIELDS + [
    _f("power_limit_w", pa.float64(), "enforced power limit, W: the GPU's default or a cap (NVML enforced limit, "
       "DCGM_FI_DEV_ENFORCED_POWER_LIMIT); null where unknown"),
]
GPU_SAMPLE = _schema("gpu_sample", 5, _GPU_V4_FIELDS + [
    _f("job", pa.string(), "the scheduler's job using the GPU (dcgm-exporter's hpc_job label, or the NVML agent's "
       "agent.job_mapping_dir: the same files); several: comma-separated; null where unknown"),
], "one row per GPU per scrape (v2: slowdown_temp_c added; v3: model, pci_bus_id, driver_version, serial, pod, "
   "namespace, container; v4: power_limit_w; v5: job)")
GPU_SAMPLE_V4 = _schema("gpu_sample", 4, _GPU_V4_FIELDS,
                        "one row per GPU per scrape (v2: slowdown_temp_c added; v3: model, pci_bus_id, driver_version, "
                        "serial, pod, namespace, container; v4: power_limit_w)")
GPU_SAMPLE_V3 = _schema("gpu_sample", 3, _GPU_V3_FIELDS,
                        "one row per GPU per scrape (v2: slowdown_temp_c added; v3: model, pci_bus_id, driver_version, "
                        "serial, pod, namespace, container)")
GPU_SAMPLE_V2 = _schema("gpu_sample", 2, _GPU_FIELDS, "one row per GPU per scrape (v2: slowdown_temp_c added)")


def _gpu_to_current(batch: pa.RecordBatch) -> pa.RecordBatch:
    """What an older version did not send (what the GPU is before v3, its limit before v4, its job before v5):
    null, as for a GPU that does not say."""
    return pa.RecordBatch.from_arrays([batch.column(f.name) if f.name in batch.schema.names
                                       else pa.nulls(batch.num_rows, f.type) for f in GPU_SAMPLE], schema=GPU_SAMPLE)


class ClockEventReason(enum.IntFlag):
    """The bits of `clock_event_reasons`: NVML's nvmlClocksEventReason* (formerly
    ClocksThrottleReason*), why the GPU's clocks are below what they could be."""
    GPU_IDLE = 0x1
    APPLICATIONS_CLOCKS_SETTING = 0x2
    SW_POWER_CAP = 0x4
    HW_SLOWDOWN = 0x8
    SYNC_BOOST = 0x10
    SW_THERMAL_SLOWDOWN = 0x20
    HW_THERMAL_SLOWDOWN = 0x40
    HW_POWER_BRAKE_SLOWDOWN = 0x80
    DISPLAY_CLOCK_SETTING = 0x100


# Clocks forced down by hardware or a thermal limit (DCGM's clocks-event semantics), and
# the words for each bit in alert evidence.
FORCED_SLOWDOWN = (ClockEventReason.HW_SLOWDOWN | ClockEventReason.SW_THERMAL_SLOWDOWN
                   | ClockEventReason.HW_THERMAL_SLOWDOWN)
HW_SLOWDOWN_ANY = FORCED_SLOWDOWN | ClockEventReason.HW_POWER_BRAKE_SLOWDOWN  # any of them, or the power brake
SW_POWER_CAP = int(ClockEventReason.SW_POWER_CAP)  # a power cap holds the clock: the GPU draws its cap
CLOCK_EVENT_TEXT = {ClockEventReason.HW_SLOWDOWN: "HW slowdown",
                    ClockEventReason.SW_THERMAL_SLOWDOWN: "SW thermal slowdown",
                    ClockEventReason.HW_THERMAL_SLOWDOWN: "HW thermal slowdown"}

COOLANT_CP_J_PER_KG_K = 4186.0  # heat capacity of the (water) coolant; a litre is ~1 kg

# The metric columns (numbers) after the identity columns; GPU_INFO (strings) is not a metric.
GPU_METRICS: tuple[str, ...] = tuple(f.name for f in _GPU_FIELDS)[6:]

_FACILITY_FIELDS = [
    _f("ts", TS, "reading time, UTC", nullable=False),
    _f("site", pa.string(), "site label", nullable=False),
    _f("rack", pa.string(), "rack the device serves; empty for site-level devices", nullable=False),
    _f("device", pa.string(), "device id, e.g. cdu-r01, pdu-r01, meter-main", nullable=False),
    _f("metric", pa.string(), "supply_temp_c, return_temp_c, flow_lpm, dp_kpa, leak, pump_on, power_w, energy_j",
       nullable=False),
    _f("value", pa.float64(), "value in base units"),
    _f("quality", pa.int8(), "1 = good, 0 = bad or uncertain", nullable=False),
]
# The equipment classes of a facility device (the BMS topic tree's, sources/bms_tree.py): what the
# detectors read a reading as (a rack's power is its PDU's, a meter's is the site's).
DEVICE_CLASSES = ("cdu", "rack", "meter")
class PointKind:
    """What a facility point measures, for the detectors that read it (plain ints, as
    numpy compares them per batch)."""
    OTHER, LEAK, FLOW, PDU_POWER, SITE_POWER, SUPPLY, RETURN, PDU_ENERGY = range(8)


def point_kind(device_class: str, metric: str) -> int:
    """From what the collector knows (the row's device_class), never from device names."""
    if metric == "leak":
        return PointKind.LEAK
    if metric == "flow_lpm":
        return PointKind.FLOW
    if metric == "supply_temp_c":
        return PointKind.SUPPLY
    if metric == "return_temp_c":
        return PointKind.RETURN
    if metric == "power_w" and device_class == "rack":
        return PointKind.PDU_POWER
    if metric == "power_w" and device_class == "meter":
        return PointKind.SITE_POWER
    if metric == "energy_j" and device_class == "rack":
        return PointKind.PDU_ENERGY
    return PointKind.OTHER


FACILITY_SAMPLE = _schema("facility_sample", 2, _FACILITY_FIELDS + [
    _f("device_class", pa.string(), "equipment class the collector knows: cdu (coolant distribution unit), rack "
       "(the rack's PDU and manifold sensors), meter (the site's main meter); empty if unknown", nullable=False),
], "one row per facility point reading (long format)")
FACILITY_SAMPLE_V1 = _schema("facility_sample", 1, _FACILITY_FIELDS,
                             "one row per facility point reading (long format); read, and upgraded to v2")


def bad_quality(batch: pa.RecordBatch) -> pa.BooleanArray:
    """The facility readings their BMS marks bad or uncertain (`quality` not 1; null, as a reading without a
    quality, is good): archived, neither detected on nor measured by the power loop."""
    import pyarrow.compute as pc
    return pc.fill_null(pc.not_equal(batch.column("quality"), 1), False)


def legacy_device_class(device: pa.Array, rack: pa.Array) -> pa.Array:
    """The class of a device that came without one (data of version 1), read off its id as
    those versions' readers did: pdu-* a rack's PDU, cdu-* a CDU, meter-* or any site-level
    device a meter."""
    import pyarrow.compute as pc
    return pc.if_else(pc.starts_with(device, "pdu"), "rack",
                      pc.if_else(pc.starts_with(device, "cdu"), "cdu",
                                 pc.if_else(pc.or_(pc.starts_with(device, "meter"), pc.equal(rack, "")),
                                            "meter", ""))).cast(pa.string())


def _facility_v1_to_v2(batch: pa.RecordBatch) -> pa.RecordBatch:
    cls = legacy_device_class(batch.column("device"), batch.column("rack"))
    return pa.RecordBatch.from_arrays([*batch.columns, cls], schema=FACILITY_SAMPLE)

# Node events a collector sends of itself: when it starts (with the interval it reads at: an interval raised
# tenfold had been a false NodeNotReporting per node) and when it stops on request (a restart is no outage).
COLLECTOR_STARTED, COLLECTOR_STOPPING = "collector_started", "collector_stopping"
EVENT = _schema("event", 1, [
    _f("ts", TS, "event time, UTC", nullable=False),
    _f("site", pa.string(), "site label", nullable=False),
    _f("rack", pa.string(), "rack label", nullable=False),
    _f("node", pa.string(), "node name", nullable=False),
    _f("gpu", pa.int16(), "GPU index; null for node events"),
    _f("gpu_uuid", pa.string(), "NVML UUID"),
    _f("kind", pa.string(), "xid, gpu_lost, gpu_reset, gpu_replaced (detect: a new UUID in a GPU slot), gpu_moved "
       "(detect: a known UUID on another node or index); node "
       "events (gpu null): node_reboot, driver_upgrade (a node drained for maintenance, about to go down), "
       "node_forgotten (detect: silent for detect.forget_after_s), node_moved (detect: in another rack), "
       "collector_started (its collector started, reading every `code` ms), collector_stopping (its collector "
       "stops on request: a restart may follow)",
       nullable=False),
    _f("code", pa.int32(), "XID number for kind=xid; the read interval in ms for kind=collector_started"),
    _f("text", pa.string(), "human-readable detail"),
], "discrete events: XIDs and GPU lifecycle")

_ALERT_FIELDS = [
    _f("ts", TS, "when this state change was emitted", nullable=False),
    _f("fingerprint", pa.string(), "Alertmanager fingerprint of the labels (FNV-1a 64, hex)", nullable=False),
    _f("status", pa.string(), "firing or resolved", nullable=False),
    _f("alertname", pa.string(), "alert name (runbooks/<alertname>.md)", nullable=False),
    _f("severity", pa.string(), "critical, warning or none (FleetwatchWatchdog)", nullable=False),
    _f("site", pa.string(), "site label"),
    _f("rack", pa.string(), "rack label"),
    _f("node", pa.string(), "node name"),
    _f("gpu", pa.string(), "GPU index as a label"),
    _f("starts_at", TS, "when the problem started", nullable=False),
    _f("ends_at", TS, "when it resolved; null while firing"),
    _f("summary", pa.string(), "one line: what is wrong and where"),
    _f("description", pa.string(), "evidence and what to do"),
    _f("runbook_url", pa.string(), "the runbook page"),
    _f("detector", pa.string(), "the detector that raised it"),
    _f("score", pa.float64(), "detector score (z, rate, ratio... see evidence)"),
    _f("labels_json", pa.string(), "all labels as JSON"),
    _f("evidence_json", pa.string(), "metric values, baselines, thresholds as JSON"),
]
_REMEDIATION_DOC = "none, reset_gpu, reboot_node, drain_inspect or replace (detect/catalog.REMEDIATIONS)"
ALERT = _schema("alert", 2, _ALERT_FIELDS + [
    _f("remediation", pa.string(), "what a remediation does to the node about it: " + _REMEDIATION_DOC),
], "alert state changes: firing, then resolved")
ALERT_V1 = _schema("alert", 1, _ALERT_FIELDS, "alert state changes without their remediation: read, and upgraded "
                                              "(the catalog's, as v2's detector gives it)")

_NODE_HEALTH_FIELDS = [
    _f("ts", TS, "when the state changed", nullable=False),
    _f("site", pa.string(), "site label", nullable=False),
    _f("rack", pa.string(), "rack label", nullable=False),
    _f("node", pa.string(), "node name", nullable=False),
    _f("state", pa.string(), "healthy, suspect or failing", nullable=False),
    _f("previous", pa.string(), "state before this change", nullable=False),
    _f("reasons", pa.string(), "alertnames behind the state, comma-separated"),
]
NODE_HEALTH = _schema("node_health", 2, _NODE_HEALTH_FIELDS + [
    _f("remediation", pa.string(), "the costliest of its reasons' remediations: " + _REMEDIATION_DOC),
], "node health transitions (the latest row per node is its state)")
NODE_HEALTH_V1 = _schema("node_health", 1, _NODE_HEALTH_FIELDS, "node health transitions without their "
                                                                "remediation: read, and upgraded (from the reasons)")


def cast_by_name(schema: pa.Schema, batch: pa.RecordBatch) -> pa.RecordBatch:
    """`batch`'s columns of `schema`, by name and cast (an archived file's times are microseconds)."""
    return pa.RecordBatch.from_arrays([batch.column(f.name).cast(f.type) for f in schema], schema=schema)


def _alert_v1_to_v2(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The remediation the catalog gives the alert (its XID's, from the evidence)."""
    from pipeline.detect.catalog import ALERTS_BY_NAME, remediation
    batch = cast_by_name(ALERT_V1, batch)
    names, evidence = batch.column("alertname").to_pylist(), batch.column("evidence_json").to_pylist()
    known = [remediation(n, _json_object(e)) if n in ALERTS_BY_NAME else None for n, e in zip(names, evidence)]
    return pa.RecordBatch.from_arrays([*batch.columns, pa.array(known, pa.string())], schema=ALERT)


def _json_object(text: str | None) -> dict | None:
    """An evidence's JSON object; None for none, or for what is not one (intake dead-letters
    such an alert, bad_alert: the upgrade only must not fail on it first)."""
    try:
        obj = json.loads(text) if text else None
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _node_health_v1_to_v2(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The costliest remediation of the alerts named in `reasons` (those the catalog knows)."""
    from pipeline.detect.catalog import ALERTS_BY_NAME, costliest
    batch = cast_by_name(NODE_HEALTH_V1, batch)
    known = [costliest(ALERTS_BY_NAME[r].remediation for r in (reasons or "").split(",") if r in ALERTS_BY_NAME)
             for reasons in batch.column("reasons").to_pylist()]
    return pa.RecordBatch.from_arrays([*batch.columns, pa.array(known, pa.string())], schema=NODE_HEALTH)

FAULT_LABEL = _schema("fault_label", 1, [
    _f("fault_id", pa.int64(), "id unique within a simulator run", nullable=False),
    _f("fault_type", pa.string(), "entry of the fault catalog, or a normal event (gpu_reset, node_reboot, driver_upgrade)", nullable=False),
    _f("normal", pa.bool_(), "true for normal events that must not alert", nullable=False),
    _f("site", pa.string(), "target site", nullable=False),
    _f("rack", pa.string(), "target rack", nullable=False),
    _f("node", pa.string(), "target node; null for rack faults"),
    _f("gpu", pa.int16(), "target GPU; null for node and rack faults"),
    _f("start", TS, "injection start", nullable=False),
    _f("end", TS, "injection end", nullable=False),
    _f("params_json", pa.string(), "fault parameters as JSON"),
], "ground truth of injected faults and labelled normal events")

RACK_SUMMARY = _schema("rack_summary", 1, [
    _f("ts", TS, "time of the rack's GPU samples it summarises", nullable=False),
    _f("site", pa.string(), "site label", nullable=False),
    _f("rack", pa.string(), "rack label", nullable=False),
    _f("gpu_at_zero_power_c", pa.float64(), "median over the rack's nodes of their GPU temperature taken to zero "
       "power; null under 3 nodes at steady power"),
    _f("coolant_mean_c", pa.float64(), "mean of the rack's CDU supply and return temperatures; null before both"),
    _f("explained", pa.bool_(), "a rack alert (its coolant) explains a thermal anomaly of the rack", nullable=False),
], "what the rack tier of detection tells the site tier about a rack (fleetwatch.racks, key: site)")

POWER_REQUEST = _schema("power_request", 1, [
    _f("id", pa.string(), "request id, unique per site (the sender's, or made up on arrival)", nullable=False),
    _f("ts", TS, "when the request was issued", nullable=False),
    _f("site", pa.string(), "site whose load is to be reduced", nullable=False),
    _f("racks", pa.string(), "racks the request covers, comma-separated; null or empty: the whole site"),
    _f("target_kw", pa.float64(), "hold the covered power at or under this, kW (one of target_kw, reduction_kw, "
       "reduction_pct)"),
    _f("reduction_kw", pa.float64(), "shed this much from the baseline, kW"),
    _f("reduction_pct", pa.float64(), "shed this share of the baseline, percent (1 to under 100)"),
    _f("start", TS, "when the reduction is to start", nullable=False),
    _f("duration_s", pa.float64(), "how long it is held, from start, s", nullable=False),
    _f("ramp_s", pa.float64(), "deadline to reach the target after start, s (e.g. 30)", nullable=False),
    _f("source", pa.string(), "how it arrived: cli, http, kafka, mqtt or eval", nullable=False),
], "a power reduction asked of a site or some of its racks: demand response, interruptible load "
   "(fleetwatch.power.requests, key: site: the grid signal)")

POWER_CAP = _schema("power_cap", 1, [
    _f("ts", TS, "when the controller sent it", nullable=False),
    _f("site", pa.string(), "site label", nullable=False),
    _f("rack", pa.string(), "rack label", nullable=False),
    _f("node", pa.string(), "the node whose agent applies it", nullable=False),
    _f("gpu_uuid", pa.string(), "NVML UUID of the GPU", nullable=False),
    _f("cap_w", pa.float64(), "the power limit to hold, W; null: back to the GPU's default limit"),
    _f("request_id", pa.string(), "the power request it serves", nullable=False),
    _f("lease_s", pa.float64(), "the agent restores the default limit when no cap for the GPU arrives within "
       "this, s (a cap never outlives its controller)", nullable=False),
], "a power cap for one GPU, from the power role to the node's agent (fleetwatch.power.caps, key: rack)")

POWER_ACTION = _schema("power_action", 1, [
    _f("ts", TS, "when the agent acted", nullable=False),
    _f("site", pa.string(), "site label", nullable=False),
    _f("rack", pa.string(), "rack label", nullable=False),
    _f("node", pa.string(), "node name", nullable=False),
    _f("gpu_uuid", pa.string(), "NVML UUID of the GPU"),
    _f("gpu", pa.int16(), "GPU index on the node; null where the UUID is not the agent's"),
    _f("request_id", pa.string(), "the power request the cap served"),
    _f("requested_w", pa.float64(), "the limit asked for, W; null: the default limit"),
    _f("enforced_w", pa.float64(), "the enforced limit read back after the set, W; null where unread"),
    _f("status", pa.string(), "ok, restored, not_permitted, out_of_range, gpu_lost, not_supported, error",
       nullable=False),
    _f("cause", pa.string(), "why: cap (a command), lease (no renewal within its lease), stop (the agent "
       "stopped), start (a cap an agent that was killed left, restored by the next one), reset (a cap set again "
       "after a GPU reset or loss put the default limit back)", nullable=False),
    _f("detail", pa.string(), "what happened; when it failed, what to do", nullable=False),
], "what an agent did with a power cap (fleetwatch.power.actions, key: rack; archived as power_actions)")

POWER_REQUEST_REPORT = _schema("power_request_report", 1, [
    _f("ts", TS, "when the request was over: its caps all restored", nullable=False),
    _f("id", pa.string(), "request id", nullable=False),
    _f("site", pa.string(), "site label", nullable=False),
    _f("racks", pa.string(), "racks it covered, comma-separated; null: the whole site"),
    _f("source", pa.string(), "how it arrived: cli, http, kafka, mqtt or eval", nullable=False),
    _f("start", TS, "when the reduction was to start", nullable=False),
    _f("end", TS, "when the hold was to end (start + duration_s)", nullable=False),
    _f("ramp_s", pa.float64(), "deadline to reach the target after start, s", nullable=False),
    _f("target_kw", pa.float64(), "the covered power asked for, kW, where the request gave one"),
    _f("requested_kw", pa.float64(), "the reduction asked, kW, from the baseline; null: never started"),
    _f("baseline_kw", pa.float64(), "the covered load's baseline, kW (power.baseline_s of the meter before start)"),
    _f("reached_s", pa.float64(), "from start to the first reading at the target, s; null: never reached"),
    _f("reduction_p50_kw", pa.float64(), "the reduction held, median of the hold's readings, kW"),
    _f("reduction_min_kw", pa.float64(), "the reduction held, the lowest minute mean of the hold, kW"),
    _f("energy_curtailed_kwh", pa.float64(), "the reduction integrated over the hold, kWh"),
    _f("gpus_capped", pa.int64(), "GPUs under a cap at the end of the hold"),
    _f("throughput_lost_gpu_h", pa.float64(), "work the caps cost, in full-load GPU-hours (the planner's model: "
       "each GPU's curve and learned sensitivity)"),
    _f("throughput_lost_tflop", pa.float64(), "the same in TFLOP, at 989 TFLOP/s per full-load GPU (H100 SXM, "
       "dense BF16)"),
    _f("uniform_lost_gpu_h", pa.float64(), "what one cap on every covered GPU would have cost for the same "
       "watts, full-load GPU-hours"),
    _f("restore_peak_kw", pa.float64(), "the highest covered power while the caps rose, kW"),
    _f("met", pa.bool_(), "reached by the ramp deadline and held (every minute within 2% of the target)",
       nullable=False),
    _f("state", pa.string(), "done, or cancelled (ended early by `fleetwatch power cancel`)", nullable=False),
    _f("missed_reason", pa.string(), "why it was not met; null when met"),
    _f("dry_run", pa.bool_(), "planned and reported, no cap applied (power.dry_run)", nullable=False),
], "one power request, reported when it is over (fleetwatch.power.reports, key: site; archived as power_requests)")

REMEDIATION_EVENT = _schema("remediation_event", 1, [
    _f("ts", TS, "when it happened (the remediation role's clock)", nullable=False),
    _f("site", pa.string(), "site label", nullable=False),
    _f("rack", pa.string(), "rack label"),
    _f("node", pa.string(), "node name", nullable=False),
    _f("case_id", pa.string(), "one remediation of the node, from its quarantine to its return (node@start); null "
       "for a quarantine refused"),
    _f("from_state", pa.string(), "healthy, quarantined, drained, action, validating or needs_repair", nullable=False),
    _f("to_state", pa.string(), "the state after it; the same as from_state when a step was refused or failed",
       nullable=False),
    _f("alertname", pa.string(), "the alert that started the case (or was refused)"),
    _f("fingerprint", pa.string(), "that alert's fingerprint"),
    _f("remediation", pa.string(), "what the case does to the node: " + _REMEDIATION_DOC),
    _f("guardrail", pa.string(), "what refused or redirected it: breaker, rate_limit, cooldown, rack_alert, "
       "operator_resumed, repeat_offender; null when none did"),
    _f("dry_run", pa.bool_(), "planned only: nothing was applied (remediate.dry_run)", nullable=False),
    _f("applied", pa.bool_(), "the backend did it (false: dry-run, refused, failed, or nothing to apply)",
       nullable=False),
    _f("detail", pa.string(), "what happened and why; when it failed, what to do", nullable=False),
], "one transition of a node's remediation, or a step refused or failed (fleetwatch.remediation, key: node; "
   "archived as remediation_events)")

SCHEMAS: dict[str, pa.Schema] = {
    "gpu_samples": GPU_SAMPLE,
    "facility_samples": FACILITY_SAMPLE,
    "events": EVENT,
    "alerts": ALERT,
    "node_health": NODE_HEALTH,
    "fault_labels": FAULT_LABEL,
    "power_actions": POWER_ACTION,
    "power_requests": POWER_REQUEST_REPORT,
    "remediation_events": REMEDIATION_EVENT,
}

# How the archive stores each dataset: its record's schema with every time in microseconds
# (Spark and Trino refuse Parquet's nanosecond timestamps; the bus keeps nanoseconds), marked
# with the archive's format: 1 (unmarked, before 2026-12) held nanoseconds, and is still read.
ARCHIVE_FORMAT = 2
ARCHIVE_TS = pa.timestamp("us", tz="UTC")


def _on_disk(schema: pa.Schema) -> pa.Schema:
    fields = [f.with_type(ARCHIVE_TS) if pa.types.is_timestamp(f.type) else f for f in schema]
    return pa.schema(fields, metadata={**schema.metadata, b"fleetwatch.archive_format": str(ARCHIVE_FORMAT).encode()})


ARCHIVE_SCHEMAS: dict[str, pa.Schema] = {name: _on_disk(schema) for name, schema in SCHEMAS.items()}


def archive_format(schema: pa.Schema) -> int:
    """The archive format a file was written in (its schema's metadata; 1 where unmarked)."""
    return int((schema.metadata or {}).get(b"fleetwatch.archive_format", b"1"))


# Detector checkpoints on the state topic (detect/checkpoint.py). Open: after these
# identity columns come one float64 column per state array (`<container>.<field>`) of
# the engine that wrote it; a reader restores the columns it knows and ignores the rest.
_CHECKPOINT_FIELDS = [
    _f("scope", pa.string(), "gpu, node, rack or point", nullable=False),
    _f("gpu_uuid", pa.string(), "scope gpu: NVML UUID"),
    _f("node", pa.string(), "scope gpu, node: node name"),
    _f("site", pa.string(), "site label"),
    _f("rack", pa.string(), "rack label"),
    _f("gpu", pa.int16(), "scope gpu: GPU index"),
    _f("device", pa.string(), "scope point: facility device"),
    _f("metric", pa.string(), "scope point: facility metric"),
    _f("alerts", pa.string(), "alerts firing on the entity: JSON {alertname: alert}"),
]


def _open(schema: pa.Schema) -> pa.Schema:
    return schema.with_metadata({**schema.metadata, b"fleetwatch.open": b"true"})


CHECKPOINT = _open(_schema("detector_checkpoint", 2, _CHECKPOINT_FIELDS + [
    _f("device_class", pa.string(), "scope point: facility device class (facility_sample.device_class)"),
], "detector state of one Kafka partition's entities (compacted state topic)"))
CHECKPOINT_V1 = _open(_schema("detector_checkpoint", 1, _CHECKPOINT_FIELDS,
                              "detector state without point device classes; read, and upgraded to v2"))


def _checkpoint_v1_to_v2(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Points get the class v1's engine read off their device ids; the state columns follow."""
    import pyarrow.compute as pc
    n = len(CHECKPOINT_V1)
    cls = pc.if_else(pc.equal(batch.column("scope"), "point"),
                     legacy_device_class(batch.column("device"), batch.column("rack")), pa.scalar(None, pa.string()))
    schema = pa.schema([*CHECKPOINT, *list(batch.schema)[n:]], metadata=CHECKPOINT.metadata)
    return pa.RecordBatch.from_arrays([*batch.columns[:n], cls, *batch.columns[n:]], schema=schema)


def upgraded(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch of an older version UPGRADES knows, at the current version (as it is if current)."""
    key = (schema_name(batch.schema), schema_version(batch.schema))
    return UPGRADES[key][1](batch) if key in UPGRADES else batch
WIRE_SCHEMAS: tuple[pa.Schema, ...] = (*SCHEMAS.values(), RACK_SUMMARY, CHECKPOINT, POWER_REQUEST, POWER_CAP)
# Older versions a reader still takes, each with what upgrades a batch of it to the current one:
# a rolling upgrade updates the readers first, and what the old writers send goes on.
UPGRADES: dict[tuple[str, int], tuple[pa.Schema, Any]] = {
    ("gpu_sample", 2): (GPU_SAMPLE_V2, _gpu_to_current),
    ("gpu_sample", 3): (GPU_SAMPLE_V3, _gpu_to_current),
    ("gpu_sample", 4): (GPU_SAMPLE_V4, _gpu_to_current),
    ("facility_sample", 1): (FACILITY_SAMPLE_V1, _facility_v1_to_v2),
    ("detector_checkpoint", 1): (CHECKPOINT_V1, _checkpoint_v1_to_v2),
    ("alert", 1): (ALERT_V1, _alert_v1_to_v2),
    ("node_health", 1): (NODE_HEALTH_V1, _node_health_v1_to_v2),
}


def schema_name(schema: pa.Schema) -> str:
    return schema.metadata[b"fleetwatch.schema"].decode()


def schema_version(schema: pa.Schema) -> int:
    return int(schema.metadata[b"fleetwatch.version"])


def schema_to_json(schema: pa.Schema) -> dict[str, Any]:
    """The machine-readable form kept in schemas/."""
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    return {
        "name": meta["fleetwatch.schema"],
        "version": int(meta["fleetwatch.version"]),
        "doc": meta["fleetwatch.doc"],
        **({"open": True} if meta.get("fleetwatch.open") == "true" else {}),
        "fields": [{"name": f.name, "type": str(f.type), "nullable": f.nullable,
                    "doc": f.metadata[b"doc"].decode()} for f in schema],
    }


# ---- alerts -------------------------------------------------------------------

_FNV_OFFSET = 14695981039346656037
_FNV_PRIME = 1099511628211
_SEP = 255


def fingerprint(labels: dict[str, str]) -> str:
    """Alertmanager's label-set fingerprint: FNV-1a 64 over sorted name/value pairs,
    each followed by the separator byte 0xff (prometheus/common model.LabelSet)."""
    h = _FNV_OFFSET
    for name in sorted(labels):
        for part in (name, labels[name]):
            for b in part.encode():
                h = ((h ^ b) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
            h = ((h ^ _SEP) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


@dataclass
class Alert:
    """One problem, in Alertmanager's model plus the detector's explanation."""
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: datetime
    detector: str
    score: float
    evidence: dict[str, Any] = field(default_factory=dict)
    ends_at: datetime | None = None

    @property
    def status(self) -> str:
        return "resolved" if self.ends_at is not None else "firing"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.labels)

    @property
    def alertname(self) -> str:
        return self.labels["alertname"]

    def to_json(self) -> dict[str, Any]:
        """Alertmanager's webhook alert object, plus score and evidence (alert_json)."""
        return alert_json(self.status, self.labels, self.annotations, self.starts_at, self.ends_at,
                          self.fingerprint, self.detector, self.score, self.evidence)


NO_END = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of an alert that has not ended


def alert_json(status: str, labels: dict[str, str], annotations: dict[str, str], starts_at: datetime,
               ends_at: datetime | None, fingerprint: str, detector: str, score: float,
               evidence: dict[str, Any]) -> dict[str, Any]:
    """The one Alert-to-JSON form: Alertmanager's webhook alert object plus Fleetwatch's
    detector, score and evidence. What alerts.jsonl, the console and every receiver get
    (webhook payloads add generatorURL; Alertmanager pushes take their postableAlert
    from it), from an Alert (Alert.to_json) or a row of the `alert` schema (alert_rows)."""
    return {
        "status": status,
        "labels": labels,
        "annotations": annotations,
        "startsAt": iso_utc(starts_at),
        "endsAt": iso_utc(ends_at) if ends_at else NO_END,
        "generatorURL": "",
        "fingerprint": fingerprint,
        "detector": detector,
        "score": score,
        "evidence": evidence,
    }


def parse_iso_utc(text: str) -> float:
    """Unix seconds of an RFC 3339 time as iso_utc writes it."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


def is_host_name(node: str) -> bool:
    """One host name: a letter or digit, then letters, digits, '.', '_' or '-' (never an option's
    '-' first, a list, a range or a space), and not scontrol's ALL. What a node's name from the
    samples must be before a command or a scheduler is given it."""
    return bool(HOST_NAME.fullmatch(node)) and node.upper() != "ALL"


def iso_utc(t: datetime | float, timespec: str = "milliseconds") -> str:
    """RFC 3339 in UTC with a Z, as Alertmanager writes it; `t` a datetime or unix seconds."""
    if not isinstance(t, datetime):
        t = datetime.fromtimestamp(t, timezone.utc)
    return t.astimezone(timezone.utc).isoformat(timespec=timespec).replace("+00:00", "Z")


def alerts_to_batch(changes: list[tuple[datetime, Alert]]) -> pa.RecordBatch:
    """Alert state changes as rows of the `alert` schema (a handful per tick, so plain Python)."""
    cols: dict[str, list[Any]] = {f.name: [] for f in ALERT}
    for ts, a in changes:
        row = {
            "ts": ts, "fingerprint": a.fingerprint, "status": a.status, "alertname": a.alertname,
            "severity": a.labels.get("severity", ""), "site": a.labels.get("site"),
            "rack": a.labels.get("rack"), "node": a.labels.get("node"), "gpu": a.labels.get("gpu"),
            "starts_at": a.starts_at, "ends_at": a.ends_at, "summary": a.annotations.get("summary"),
            "description": a.annotations.get("description"), "runbook_url": a.annotations.get("runbook_url"),
            "detector": a.detector, "score": float(a.score),
            "labels_json": json.dumps(a.labels, sort_keys=True),
            "evidence_json": json.dumps(a.evidence, sort_keys=True, default=float),
            "remediation": a.annotations.get("remediation"),
        }
        for k, v in row.items():
            cols[k].append(v)
    return pa.RecordBatch.from_pydict(cols, schema=ALERT)


def python_rows(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    """A batch's rows as Python values, for the readers of a few rows a message (alerts, requests): times
    truncated to microseconds, which Python's datetime holds. A time with nanoseconds (TS is ns: another
    producer's, a Go or Java clock's) had failed the whole batch, and the consumer with it."""
    return pa.RecordBatch.from_arrays([c.cast(pa.timestamp("us", tz=c.type.tz), safe=False)
                                       if pa.types.is_timestamp(c.type) else c for c in batch.columns],
                                      names=batch.schema.names).to_pylist()


def alert_rows(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    """Rows of the `alert` schema as Alertmanager alert objects (plus detector, score
    and evidence): what receivers and alerts.jsonl get."""
    out = []
    for r in python_rows(batch):
        out.append(alert_json(
            r["status"], json.loads(r["labels_json"]),
            {k: r[k] for k in ("summary", "description", "runbook_url", "remediation") if r.get(k) is not None},
            r["starts_at"], r["ends_at"], r["fingerprint"], r["detector"], r["score"],
            json.loads(r["evidence_json"]) if r["evidence_json"] is not None else {}))
    return out


def schema_files(directory: os.PathLike[str] | str) -> dict[str, dict[str, Any]]:
    """{file path: content} of the schemas/ folder, as the code defines it."""
    out = {}
    for schema in (*WIRE_SCHEMAS, *(old for old, _ in UPGRADES.values())):
        doc = schema_to_json(schema)
        out[str(Path(directory) / f"{doc['name']}.v{doc['version']}.json")] = doc
    return out
