"""The BMS topic tree: where facility readings sit on MQTT, what their payloads
look like, and how a reading becomes a `facility_sample` row in base units.

    <root>/<site>/<class>/<equipment-id>/<point>        {"value": 21.5, "timestamp": 1767225600000, "quality": 1}
    <root>/<site>/<class>/<equipment-id>/<point>/meta   {"unit": "degF", "rack": "r01"}   (retained)

`root` is `bms/v1` by default. The equipment id is the row's `device`, the meta's
`rack` its `rack` ("" for site-level equipment). `timestamp` is epoch
milliseconds; `quality` 1 is good, anything else bad or uncertain (default 1).
Classes, their points and the metric each point becomes are in `CLASS_POINTS`
and `POINT_METRICS`; the units each metric accepts in `UNITS`.

`<root>/<site>/power/...` is not equipment: it carries power requests and their answers
(power/mqtt_intake.py), and the collector leaves it alone (`POWER_BRANCH`).

Pure functions and tables, no I/O: the collector (sources/mqtt.py) and the
simulator's publisher (sources/bms.py) share them, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_ROOT = "bms/v1"
META = "meta"
POWER_BRANCH = "power"  # <root>/<site>/power/...: demand-response requests, not readings


class Reason(StrEnum):
    """Why a message was dead-lettered."""
    BAD_TOPIC = "bad_topic"          # not <root>/<site>/<class>/<id>/<point>[/meta], or an unknown class
    UNKNOWN_POINT = "unknown_point"  # the class has no such point
    BAD_JSON = "bad_json"            # not a JSON object, or no "value"
    BAD_VALUE = "bad_value"          # value not a number (or a boolean, for state points), or not finite
    BAD_TIMESTAMP = "bad_timestamp"  # timestamp missing, not epoch milliseconds
    NO_METADATA = "no_metadata"      # a reading of a point whose metadata has not arrived
    BAD_METADATA = "bad_metadata"    # metadata not a JSON object with "unit" and "rack" strings
    UNKNOWN_UNIT = "unknown_unit"    # metadata's unit is not one the point's metric takes (also its readings)
    TOO_MANY_POINTS = "too_many_points"  # more points than the collector keeps (max_points)
    TIME_AHEAD = "time_ahead"        # stamped further ahead of the receiver's clock than intake.max_ahead_s
    TOO_OLD = "too_old"              # stamped longer before the receiver's clock than intake.max_age_s


class Rejected(Exception):
    """A message that cannot become a row: the reason (counted) and what exactly was wrong."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Conversion:
    """base = value * scale + offset."""
    scale: float
    offset: float = 0.0

    def to_base(self, value: float) -> float:
        return value * self.scale + self.offset

    def from_base(self, value: float) -> float:
        return (value - self.offset) / self.scale


_F = 5.0 / 9.0
_US_GALLON_L = 3.785411784
_PSI_KPA = 6.894757293168361

# metric -> {unit: conversion to the metric's base unit}. State points take "bool":
# JSON true/false or 0/1.
_TEMPERATURE = {"C": Conversion(1.0), "degC": Conversion(1.0), "°C": Conversion(1.0),
                "F": Conversion(_F, -32.0 * _F), "degF": Conversion(_F, -32.0 * _F), "°F": Conversion(_F, -32.0 * _F),
                "K": Conversion(1.0, -273.15)}
_FLOW = {"L/min": Conversion(1.0), "l/min": Conversion(1.0), "lpm": Conversion(1.0), "gpm": Conversion(_US_GALLON_L),
         "L/s": Conversion(60.0), "m3/h": Conversion(1000.0 / 60.0)}
_PRESSURE = {"kPa": Conversion(1.0), "Pa": Conversion(1e-3), "bar": Conversion(100.0), "psi": Conversion(_PSI_KPA)}
_POWER = {"W": Conversion(1.0), "kW": Conversion(1e3), "MW": Conversion(1e6)}
_ENERGY = {"J": Conversion(1.0), "kJ": Conversion(1e3), "MJ": Conversion(1e6), "Wh": Conversion(3600.0),
           "kWh": Conversion(3.6e6), "MWh": Conversion(3.6e9)}
_STATE = {"bool": Conversion(1.0)}

UNITS: dict[str, dict[str, Conversion]] = {
    "supply_temp_c": _TEMPERATURE, "return_temp_c": _TEMPERATURE, "flow_lpm": _FLOW, "dp_kpa": _PRESSURE,
    "pump_on": _STATE, "leak": _STATE, "power_w": _POWER, "energy_j": _ENERGY,
}
STATE_METRICS = frozenset({"pump_on", "leak"})

# BMS point name -> facility metric (the names detect/engine.py knows).
POINT_METRICS: dict[str, str] = {
    "supply_temp": "supply_temp_c", "return_temp": "return_temp_c", "flow": "flow_lpm",
    "diff_pressure": "dp_kpa", "pump_state": "pump_on", "leak_detect": "leak",
    "power": "power_w", "energy": "energy_j",
}
METRIC_POINTS: dict[str, str] = {m: p for p, m in POINT_METRICS.items()}

# Equipment class -> its points. A CDU has a leak sensor in its tray; a rack has its
# own liquid manifold sensors and its PDU's power and energy.
CLASS_POINTS: dict[str, frozenset[str]] = {
    "cdu": frozenset({"supply_temp", "return_temp", "flow", "diff_pressure", "pump_state", "leak_detect"}),
    "rack": frozenset({"supply_temp", "return_temp", "flow", "leak_detect", "power", "energy"}),
    "meter": frozenset({"power", "energy"}),
}

# Timestamps below this (1973-03-03 in ms) are almost surely epoch seconds.
_MIN_MS = 1e11
_MAX_MS = 1e14


@dataclass(frozen=True, slots=True)
class Address:
    """A topic of the tree, taken apart."""
    site: str
    equipment_class: str
    device: str
    point: str
    metric: str
    meta: bool


@dataclass(frozen=True, slots=True)
class PointMeta:
    """A point's metadata, checked against its metric."""
    unit: str
    rack: str
    conversion: Conversion
    state: bool


def parse_topic(topic: str, root: str, site: str) -> Address:
    """Take a topic of `site`'s tree apart; Rejected if it is outside the tree."""
    prefix = f"{root}/{site}/"
    if not topic.startswith(prefix):
        raise Rejected(Reason.BAD_TOPIC, f"topic {topic!r} is not under {prefix}")
    parts = topic[len(prefix):].split("/")
    meta = len(parts) == 4 and parts[3] == META
    if len(parts) != 3 + meta or not all(parts):
        raise Rejected(Reason.BAD_TOPIC, f"topic {topic!r} is not {prefix}<class>/<equipment-id>/<point>[/{META}]")
    cls, device, point = parts[:3]
    if cls not in CLASS_POINTS:
        raise Rejected(Reason.BAD_TOPIC, f"topic {topic!r}: unknown equipment class {cls!r}; "
                                         f"known: {', '.join(CLASS_POINTS)}")
    if point not in CLASS_POINTS[cls]:
        raise Rejected(Reason.UNKNOWN_POINT, f"topic {topic!r}: class {cls!r} has no point {point!r}; "
                                             f"known: {', '.join(sorted(CLASS_POINTS[cls]))}")
    return Address(site, cls, device, point, POINT_METRICS[point], meta)


def _json_object(payload: bytes, what: str, reason: Reason) -> dict:
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise Rejected(reason, f"{what} is not JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise Rejected(reason, f"{what} is {type(obj).__name__}, not a JSON object")
    return obj


def decode_meta(payload: bytes, metric: str) -> PointMeta:
    """A point's metadata message; Rejected if it is malformed or its unit does not fit `metric`."""
    obj = _json_object(payload, "metadata", Reason.BAD_METADATA)
    unit, rack = obj.get("unit"), obj.get("rack")
    if not isinstance(unit, str) or not isinstance(rack, str):
        raise Rejected(Reason.BAD_METADATA, 'metadata needs "unit" and "rack" strings (rack "" for site-level '
                                            f"equipment), got unit={unit!r}, rack={rack!r}")
    conversion = UNITS[metric].get(unit)
    if conversion is None:
        raise Rejected(Reason.UNKNOWN_UNIT, f"unit {unit!r} is not one {metric} takes; "
                                            f"known: {', '.join(UNITS[metric])}")
    return PointMeta(unit, rack, conversion, metric in STATE_METRICS)


def decode_reading(payload: bytes, meta: PointMeta) -> tuple[int, float, int, str]:
    """(ts in ns, value in base units, quality 1/0, and the quality sent where it is neither 1 nor 0, else "")
    of a reading; Rejected if unusable. Any quality but 1 is bad: an OPC gateway's good (192, or 0 in OPC UA's
    status codes) must be sent as 1."""
    obj = _json_object(payload, "payload", Reason.BAD_JSON)
    if "value" not in obj:
        raise Rejected(Reason.BAD_JSON, 'payload has no "value"')
    raw = obj["value"]
    if isinstance(raw, bool) and not meta.state or not isinstance(raw, (int, float)):
        raise Rejected(Reason.BAD_VALUE, f"value {str(raw)[:100]} is not a number"
                                         + (" or a boolean" if meta.state else ""))
    try:
        value = float(raw)
    except OverflowError:  # a JSON integer beyond float
        raise Rejected(Reason.BAD_VALUE, f"value {str(raw)[:100]}... is out of range") from None
    if meta.state and value not in (0.0, 1.0):
        raise Rejected(Reason.BAD_VALUE, f"state value {raw!r} is not 0/1 or true/false")
    base = value * meta.conversion.scale + meta.conversion.offset
    if not math.isfinite(base):
        raise Rejected(Reason.BAD_VALUE, f"value {raw!r} is not finite (in {meta.unit}, or once converted)")
    ms = obj.get("timestamp")
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not _MIN_MS <= ms < _MAX_MS:
        number = not isinstance(ms, bool) and isinstance(ms, (int, float))
        looks = next((f" (it looks like epoch {unit})" for unit, low, high in (
            ("seconds", 1e8, _MIN_MS), ("microseconds", _MAX_MS * 10, _MAX_MS * 1e4),
            ("nanoseconds", _MAX_MS * 1e4, _MAX_MS * 1e7)) if number and low <= ms < high), "")
        raise Rejected(Reason.BAD_TIMESTAMP, f"timestamp {ms!r} is not epoch milliseconds{looks}")
    ts_ns = ms * 1_000_000 if isinstance(ms, int) else round(ms * 1e6)
    sent = obj.get("quality", 1)
    good = sent is True or sent == 1 and not isinstance(sent, bool)  # (JSON true: good, as 1 is)
    odd = "" if good or sent is False or sent == 0 else json.dumps(sent)[:40]
    return ts_ns, base, int(good), odd


# ---- the publishing side --------------------------------------------------------

def reading_topic(root: str, site: str, cls: str, device: str, metric: str) -> str:
    """Where a reading of `device` (of equipment class `cls`, the facility row's device_class) goes."""
    point = METRIC_POINTS.get(metric)
    if cls not in CLASS_POINTS:
        raise ValueError(f"device {device!r}: device_class {cls!r} is not a BMS equipment class "
                         f"({', '.join(CLASS_POINTS)})")
    if point is None or point not in CLASS_POINTS[cls]:
        raise ValueError(f"device {device!r} (class {cls}) has no BMS point for metric {metric!r}")
    return f"{root}/{site}/{cls}/{device}/{point}"


def encode_meta(unit: str, rack: str) -> bytes:
    return json.dumps({"unit": unit, "rack": rack}).encode()


def encode_reading(value: float, ts_ns: int, quality: int, state: bool) -> bytes:
    """A reading in the tree's payload format (timestamp rounded to the millisecond)."""
    v: float | bool = (value != 0.0) if state and math.isfinite(value) else value
    return json.dumps({"value": v, "timestamp": (ts_ns + 500_000) // 1_000_000, "quality": quality}).encode()
