"""Physics of each rack's coolant loop: the heat it carries away (flow x heat capacity x
delta-T) against the PDU's power (RackHeatImbalance). It keeps the rack's latest coolant
readings, which the rack-against-site peers read too."""

from __future__ import annotations

import numpy as np

from pipeline.bus.base import Topic
from pipeline.counters import counter_step_j, step_mean
from pipeline.detect.batch import FacilityBatch, Output
from pipeline.detect.family import Family, State, evidence, lag
from pipeline.feeds import next_interval, silence_allowed_s
from pipeline.model import PointKind
from pipeline.model import COOLANT_CP_J_PER_KG_K

SETTLE_LAGS = 3.0  # after what explained a rack ends, its loop still carries that heat for this many lags
OFFSET_TAU_S = 1800.0  # the rack's two temperature sensors' offset is learned over this long (a BMS
                       # recalibrates each in steps of tenths of a degree, about once a day) ...
OFFSET_MAX_SENSORS = 2.0  # ... and explains at most this many heat_balance_sensor_c: a larger gap is the loop's


class HeatBalance(Family):
    topic = Topic.FACILITY
    name = "heat_balance"
    raises = ("RackHeatImbalance",)
    # Per rack: the latest coolant readings, and the delta-T its PDU's power predicts,
    # through the coolant's lag; the PDU's latest energy reading, and the one the last
    # prediction stepped from.
    loop = State("rack", fields={"supply_c": (np.float64, np.nan), "return_c": (np.float64, np.nan),
                                 "flow_lpm": (np.float64, np.nan), "expected_dt": (np.float64, np.nan),
                                 "power_t": (np.float64, np.nan), "explained_t": (np.float64, np.nan),
                                 "offset_c": (np.float64, 0.0),
                                 "energy_j": (np.float64, np.nan), "energy_t": (np.float64, np.nan),
                                 "stepped_j": (np.float64, np.nan), "stepped_t": (np.float64, np.nan),
                                 "energy_step_j": (np.float64, np.nan), "power_w": (np.float64, np.nan),
                                 "energy_pdus": (np.float64, 0.0)},
                 checkpoint="rack")
    # Per PDU (a facility point): its latest reading, its time and its interval (EW mean of its gaps). A rack
    # fed by A and B feeds has two PDUs, each reading its share: the rack's power and energy are the sums
    # of those that still report.
    pdu = State("point", fields={"power_w": (np.float64, np.nan), "energy_j": (np.float64, np.nan),
                                 "power_w_t": (np.float64, np.nan), "energy_j_t": (np.float64, np.nan),
                                 "power_w_dt": (np.float64, np.nan), "energy_j_dt": (np.float64, np.nan)},
                checkpoint="pdu")

    def evaluate(self, b: FacilityBatch, out: Output) -> None:
        """Liquid cooling takes a known share of IT power, so the PDU's power and the flow
        predict the delta-T; the return temperature follows a change with the coolant's
        lag, and so does the prediction. A loop that carries much less (air in it, cold
        plates losing contact, heat going to the room) or more (a drifting flow or
        temperature sensor) is wrong. Judged when the PDU reports, with the prediction
        settled, and only where the expected delta-T is well above sensor resolution."""
        d, loop, kind, rack, value = self.config, self.loop, b.kind, b.rack, b.value
        loop.ensure(self.inventory.rack_count)
        for k, name in ((PointKind.SUPPLY, "supply_c"), (PointKind.RETURN, "return_c"), (PointKind.FLOW, "flow_lpm")):
            rows = np.flatnonzero((kind == k) & np.isfinite(value))
            getattr(loop, name)[rack[rows]] = value[rows]
        racks, t_row, energy_j, pdus = self._rack_sums(b, PointKind.PDU_ENERGY, "energy_j")
        if racks.size:
            # A PDU the sum did not hold before (B's first reading) is a step no power made: start again.
            again = pdus != np.rint(loop.energy_pdus[racks])
            loop.stepped_j[racks[again]] = np.nan
            loop.energy_step_j[racks[again]] = np.nan
            loop.energy_pdus[racks] = pdus
            loop.energy_j[racks], loop.energy_t[racks] = energy_j, t_row
            loop.energy_step_j[racks] = np.fmin(loop.energy_step_j[racks], counter_step_j(energy_j))
        racks, t_row, instant_w, _ = self._rack_sums(b, PointKind.PDU_POWER, "power_w")
        if racks.size == 0:
            return
        power = self._stepping_power(racks, instant_w, t_row)
        heat_capacity_w_per_c = loop.flow_lpm[racks] / 60.0 * COOLANT_CP_J_PER_KG_K  # kg/s x J/(kg K)
        predicted = d.liquid_fraction * power / heat_capacity_w_per_c
        dt = t_row - loop.power_t[racks]
        a = np.where(np.isfinite(dt), 1.0 - np.exp(-np.maximum(dt, 0.0) / max(d.coolant_lag_s, 1e-9)), 0.0)
        measured = loop.return_c[racks] - loop.supply_c[racks]
        # A rack seen for the first time starts from what it measures (its history is
        # unknown) and is judged once the prediction has caught up with its power.
        prev = np.where(np.isnan(loop.expected_dt[racks]), measured, loop.expected_dt[racks])
        expected = lag(prev, predicted, a)
        loop.expected_dt[racks], loop.power_t[racks] = expected, t_row
        # The delta-T as its two sensors would read it without their calibration offset.
        measured = measured - loop.offset_c[racks]
        ratio = measured / expected
        settled = np.abs(predicted - expected) < 0.1 * expected
        # Quiet while something explains it (a coolant fault, a PDU overload), and for a few of
        # the coolant's lags after: the prediction comes back through the same lag as the loop,
        # and a rack whose load swings (training jobs in lockstep) can look settled at a peak
        # long before it is.
        explained = self.engine.racks_explaining("RackHeatImbalance")[racks]
        loop.explained_t[racks[explained]] = t_row[explained]
        recent = (t_row - loop.explained_t[racks]) < SETTLE_LAGS * d.coolant_lag_s  # (NaN: never)
        judged = np.flatnonzero(settled & np.isfinite(ratio) & (expected >= d.heat_balance_min_delta_c)
                                & ~explained & ~recent)
        coolant_w = heat_capacity_w_per_c * measured
        # Off by more than the tolerance, and by more than two sensors' calibration can be (a
        # BMS's temperatures drift by tenths of a degree and are recalibrated in steps).
        off = ((np.abs(ratio[judged] - 1.0) > d.heat_balance_tolerance)
               & (np.abs(measured - expected)[judged] > d.heat_balance_sensor_c))
        # A healthy rack teaches the offset: settled, nothing explaining it, not off, not alerting.
        quiet = np.zeros(racks.size, bool)
        quiet[judged[~off]] = True
        quiet &= ~self.alerted("RackHeatImbalance", self.inventory.rack_count)[racks]
        learn = np.flatnonzero(quiet & np.isfinite(dt))
        if learn.size:
            r = racks[learn]
            w = 1.0 - np.exp(-np.maximum(dt[learn], 0.0) / OFFSET_TAU_S)
            bound = OFFSET_MAX_SENSORS * d.heat_balance_sensor_c
            loop.offset_c[r] = np.clip(loop.offset_c[r] + w * (measured - expected)[learn], -bound, bound)
        self.judge(out, "RackHeatImbalance", racks[judged], off,
                   b.now, ratio[judged],
                   evidence(coolant_w=coolant_w[judged], power_w=power[judged],
                            ratio=(coolant_w / power)[judged], expected=d.liquid_fraction,
                            delta_t_c=measured[judged], expected_delta_t_c=expected[judged],
                            sensor_offset_c=loop.offset_c[racks[judged]],
                            tolerance=d.heat_balance_tolerance, flow_lpm=loop.flow_lpm[racks[judged]],
                            supply_c=loop.supply_c[racks[judged]], return_c=loop.return_c[racks[judged]]))

    def _rack_sums(self, b: FacilityBatch, kind: int, field: str) -> tuple[np.ndarray, ...]:
        """The racks whose PDUs read `kind` in this batch, once each: (racks, the newest of their readings'
        times, the sum of the latest reading of every PDU of the rack that still reports, how many PDUs that
        sum holds). Each PDU's latest reading (`self.pdu.<field>`) takes this batch's first. A PDU silent
        while another of its rack reads (its feed failed over: pipeline/feeds.py) is left out."""
        # A reading without a value (NaN: none, or one its BMS marked bad: b.heard_slots) is heard: its feed
        # reports, its last value stays in the sum (silent, it would have left it as a failed-over feed).
        inv = self.inventory
        of_kind = np.flatnonzero((b.kind == kind) & (b.rack >= 0))
        marked = np.flatnonzero(inv.point.kind[b.heard_slots] == kind) if b.heard_slots.size else of_kind[:0]
        if of_kind.size == 0 and marked.size == 0:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0)
        self.pdu.ensure(len(inv.point_devices))
        latest, at, every = (getattr(self.pdu, f"{field}{x}") for x in ("", "_t", "_dt"))
        heard_slots = np.concatenate([b.slots[of_kind], b.heard_slots[marked]])
        heard_ts = np.concatenate([b.ts[of_kind], b.heard_ts[marked]])
        order = np.argsort(heard_ts, kind="stable")  # (a backlog: each PDU's newest reading last)
        read, last = np.unique(heard_slots[order][::-1], return_index=True)
        t_new = heard_ts[order][::-1][last]
        every[read] = next_interval(every[read], t_new - at[read])
        at[read] = np.fmax(at[read], t_new)
        rows = of_kind[np.isfinite(b.value[of_kind])]
        if rows.size == 0:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0)
        rows = rows[np.argsort(b.ts[rows], kind="stable")]
        latest[b.slots[rows]] = b.value[rows]
        racks, of_row = np.unique(b.rack[rows], return_inverse=True)
        t_row = np.full(racks.size, -np.inf)
        np.maximum.at(t_row, of_row, b.ts[rows])
        n = len(inv.point_devices)
        held = np.flatnonzero((inv.point.kind[:n] == kind) & np.isfinite(latest[:n]))
        of_rack = inv.point.rack[held]
        newest = np.full(inv.rack_count, -np.inf)
        np.maximum.at(newest, of_rack, np.nan_to_num(at[held], nan=-np.inf))
        held = held[~(newest[of_rack] - at[held] > silence_allowed_s(every[held]))]  # (a time not known yet: held)
        of_rack = inv.point.rack[held]
        sums = np.bincount(of_rack, weights=latest[held], minlength=inv.rack_count)
        counts = np.bincount(of_rack, minlength=inv.rack_count)
        return racks, t_row, sums[racks], counts[racks].astype(np.float64)

    def _stepping_power(self, racks: np.ndarray, instant_w: np.ndarray, t_row: np.ndarray) -> np.ndarray:
        """The power the prediction steps with from the rack's last PDU reading to this one.
        PDUs read seconds apart: the instant, as good as the mean. Read 30 s apart, a training
        job's swing makes the instant a poor stand-in for the heat that went into the coolant
        meanwhile (false RackHeatImbalance at 30-s scrapes): the energy counter's mean since
        the reading the last step took, where the PDU sent its counter with this power reading (in
        the same batch or before it, within a quarter of the interval) and the counter can be
        trusted (pipeline/counters.py): else the instant, as without a counter."""
        loop = self.loop
        power_w, (loop.stepped_j[racks], loop.stepped_t[racks]) = step_mean(
            loop.energy_j[racks], loop.energy_t[racks], loop.stepped_j[racks], loop.stepped_t[racks],
            loop.energy_step_j[racks], loop.power_w[racks], loop.power_t[racks], instant_w, t_row)
        loop.power_w[racks] = instant_w
        return power_w

