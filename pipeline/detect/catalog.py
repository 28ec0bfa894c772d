"""Every alert Fleetwatch can raise, the single source of truth about it: severity,
scope, the detector that raises it, how many evaluations it takes to fire, what it
explains (suppresses in the detector, inhibits in routing), the evidence its summary
reads, and what it means.

Derived from it: the default `alerts.inhibit_rules` (config.DEFAULT_INHIBIT_RULES,
via inhibit_rules() here), the runbook index table (runbooks/README.md) and the alert
table of docs/detection.md (scripts/update-docs writes both; a test keeps them
current). Each alertname has a runbook at runbooks/<alertname>.md (a test enforces it).
Summaries are format strings over the alert's labels and evidence.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from pipeline.resources import runbooks_dir

SCOPES = ("gpu", "node", "rack", "site", "fleetwatch")
# What a remediation does to a node about an alert, cheapest first (DCGM's XID actions): the
# alert carries its own (annotation `remediation`), node health the costliest of its alerts'.
# Only GPU and node alerts name one: a rack's or the site's problem is not a node's to fix.
REMEDIATIONS = ("none", "reset_gpu", "reboot_node", "drain_inspect", "replace")
SEVERITIES = ("critical", "warning", "none")
# The labels that identify an alert's target, by scope (every alert also has alertname and severity).
# A GPU alert also carries the GPU's UUID under dcgm-exporter's label name, `UUID`, so that it
# matches DCGM's own series and alert rules (and follows a GPU moved to another slot).
SCOPE_LABELS: dict[str, tuple[str, ...]] = {
    "gpu": ("site", "rack", "node", "gpu", "UUID"), "node": ("site", "rack", "node"), "rack": ("site", "rack"),
    "site": ("site", "rack"),  # rack is empty: a site is its rack "" entry
    "fleetwatch": ("site", "instance"),
}
# The labels an inhibiting alert and its targets must share: its scope's identity (a site
# alert's empty rack is no identity). A GPU's is its slot, without `UUID`: alerts restored from a
# checkpoint written before GPU alerts carried it, or from another Fleetwatch, still match.
INHIBIT_EQUAL: dict[str, tuple[str, ...]] = {**SCOPE_LABELS, "site": ("site",), "gpu": ("site", "rack", "node", "gpu")}
# Breadth of a scope (inhibit rules of broader sources come first).
_BREADTH = {"fleetwatch": 0, "site": 1, "rack": 2, "node": 3, "gpu": 4}


@dataclass(frozen=True)
class AlertSpec:
    name: str
    severity: str   # critical: act now; warning: act today; none: never acted on (the Watchdog)
    scope: str      # gpu, node, rack or site: which labels identify it (SCOPE_LABELS); fleetwatch: raised by
                    # Fleetwatch about itself
    summary: str    # format string over labels and evidence
    action: str     # the first thing to do, repeated in the description
    remediation: str = "none"  # REMEDIATIONS: what a remediation does to the node (an XID's own: XID_REMEDIATIONS)
    detector: str = ""   # the alert's `detector` field (Alert.detector)
    family: str = ""     # the detector family that raises it (pipeline/detect/<family>; archive: sinks/archive_outage;
                         # ops: pipeline/ops, the process's own health; control: the power role, roles/power.py;
                         # remediate: the remediation role, pipeline/remediate)
    fire_after: int | str | None = "fire_after"  # evaluations in a row before it fires: a number, or the
                                                 # detect.* key that sets it; None: not a tracked condition
    evidence: tuple[str, ...] = ()    # evidence keys its summary uses (the detector emits them)
    inhibits: tuple[str, ...] = ()    # alerts it mutes in routing while it fires, with the same INHIBIT_EQUAL
                                      # labels (the default alerts.inhibit_rules)
    suppresses: tuple[str, ...] = ()  # alerts its detector keeps from firing while it is pending or firing
                                      # (of its own detection tier: engine.RACK_TIER or SITE_TIER, or from the
                                      # rack tier to the site tier, which the rack summaries carry)
    meaning: str = ""     # one line for the runbook index
    method: str = ""      # how it is detected, in a few words
    detection: str = ""   # how it is detected, for docs/detection.md
    promql: str = ""      # family "prometheus": the rule's expression, which Prometheus evaluates on Fleetwatch's
                          # /metrics (deploy/prometheus/rules.yml is generated from it); its summary reads the
                          # result's labels and `value`, its evidence
    pending_for: str = "0s"  # family "prometheus": the rule's `for`

    @property
    def entity(self) -> str:
        """What the detector tracks the alert on: gpu, node or rack slots (a site is its
        rack "" entry); the engine's `scope`."""
        return "rack" if self.scope == "site" else self.scope

    @property
    def explains(self) -> tuple[str, ...]:
        """Every alert this one explains: what it suppresses or inhibits."""
        return tuple(dict.fromkeys(self.suppresses + self.inhibits))

    @property
    def placeholders(self) -> tuple[str, ...]:
        """The names its summary reads (labels or evidence keys)."""
        return tuple(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(self.summary) if f))


_XID = ("Alerts on the XID event itself, without waiting for a scrape (DCGM's critical XIDs 48, 63, 64, 74, 79, "
        "92, 94, 95, 119, 120, 140 have their own alerts; any other is `GpuXid`). The alert stays firing for "
        "`detect.xid_hold_s` after the last XID.")
_COOLING_TARGETS = ("GpuOverTemperature", "GpuThermalRunaway", "GpuThermalDrift", "GpuHwSlowdown",
                    "NodeThermalAnomaly")
_COOLING_SUPPRESSES = ("GpuOverTemperature", "GpuThermalDrift", "GpuHwSlowdown", "RackHeatImbalance")

ALERTS: tuple[AlertSpec, ...] = (
    AlertSpec("GpuFellOffBus", "critical", "gpu",
              "{node} GPU {gpu} fell off the bus (XID 79)",
              "Drain the node and reboot it; if XID 79 recurs, reseat or RMA the GPU.",
              remediation="reboot_node", detector="xid", family="xid", fire_after=1, suppresses=("GpuNotReporting",),
              meaning="XID 79: the GPU stopped answering on PCIe", method="XID events",
              detection=_XID + " A GPU that fell off the bus (XID 79, or the agent's `gpu_lost`) stays alerted "
                               "until it reports again, and is not also reported as `GpuNotReporting`."),
    AlertSpec("GpuNotReporting", "critical", "gpu",
              "{node} GPU {gpu} stopped reporting ({silent_s:.0f} s) while its node still reports",
              "Check `nvidia-smi` on the node and the kernel log for XIDs; drain if the GPU is gone.",
              remediation="drain_inspect", detector="staleness", family="staleness", evidence=("silent_s",),
              meaning="one GPU silent while its node still reports", method="staleness",
              detection="A GPU silent for `detect.missing_after_intervals` of its own reporting interval, plus "
                        "`detect.lateness_s` (5 s), while its node still reports (judged by event time, against the "
                        "node's latest sample: an XID 79 up to the bound late still explains the silence)."),
    AlertSpec("NodeNotReporting", "critical", "node",
              "{node} sent no GPU telemetry for {silent_s:.0f} s",
              "Check that the node is up and its agent runs; then check its network path.",
              remediation="drain_inspect", detector="staleness", family="staleness", evidence=("silent_s",), inhibits=("GpuNotReporting",),
              meaning="no GPU telemetry from the node", method="staleness",
              detection="A node silent for twice `detect.missing_after_intervals` of its reporting interval, plus "
                        "`detect.lateness_s`: how far the clock of its partition (the latest sample there, event "
                        "time per Kafka partition, the same in one process: [Kafka](kafka.md#scale-out-the-same-"
                        "answers-as-one-process)) moved since its own latest sample came in, late ones included, so "
                        "that a node whose clock runs ahead or behind makes no node silent. Its GPUs' `GpuNotReporting` are inhibited. A node announced as going down for "
                        "maintenance (an event `node_reboot` or `driver_upgrade`) is not reported for "
                        "`detect.maintenance_s` after the announcement, one whose collector said it stops on request "
                        "(`collector_stopping`: an upgrade, a config change) for `detect.restart_grace_s`, and a "
                        "collector that starts says its interval (`collector_started`), which its bound starts "
                        "from (learned from the gaps alone, an interval raised tenfold had been a false alert). "
                        "A node silent for `detect.forget_after_s` "
                        "(7 days) is forgotten (decommissioned, scaled away): the alert resolves with the annotation "
                        "`resolution`, a `node_forgotten` event, and the node starts afresh if it reports again."),
    AlertSpec("GpuUncorrectableEcc", "critical", "gpu",
              "{node} GPU {gpu}: uncorrectable memory error ({what})",
              "Drain the node; reset the GPU to apply a pending row remap; a remap failure means RMA.",
              remediation="reset_gpu", detector="ecc", family="counters", fire_after=1, evidence=("what",),
              meaning="uncorrectable memory error (XID 48/63/64/94/95), remap pending or failed",
              method="counter + flags, XID events",
              detection="The uncorrectable ECC counter or the rows remapped for uncorrectable errors went up (the "
                        "latter is the one such counter in dcgm-exporter's default counters), or a row remap is "
                        "pending or failed, or an ECC XID (48, 63, 64, 94, 95, 140) arrived (held for "
                        "`detect.xid_hold_s`). A counter that goes down was reset (GPU reset) and does not alert; "
                        "one back where it was within 3 samples was one bad reading (1 -> 0 -> 1 is no error)."),
    AlertSpec("GpuNvlinkError", "warning", "gpu",
              "{node} GPU {gpu}: NVLink error (XID 74)",
              "Run `nvidia-smi nvlink -e` and `dcgmi diag -r 3`; reset the GPU if links are down.",
              remediation="drain_inspect", detector="xid", family="xid", fire_after=1,
              meaning="XID 74: NVLink error on one of the GPU's links", method="XID events", detection=_XID),
    AlertSpec("GpuHighSbeRate", "warning", "gpu",
              "{node} GPU {gpu}: high single-bit ECC error rate (XID 92)",
              "Watch row remapping; schedule a GPU reset at the next drain.",
              detector="xid", family="xid", fire_after=1,
              meaning="XID 92: high rate of corrected single-bit ECC errors", method="XID events", detection=_XID),
    AlertSpec("GpuGspError", "critical", "gpu",
              "{node} GPU {gpu}: GSP firmware error (XID {xid})",
              "Drain the node and reset the GPU; if it recurs, reboot and update the driver.",
              remediation="reset_gpu", detector="xid", family="xid", fire_after=1, evidence=("xid",),
              meaning="XID 119/120: GSP firmware RPC timeout or error", method="XID events", detection=_XID),
    AlertSpec("GpuXid", "warning", "gpu",
              "{node} GPU {gpu}: XID {xid}",
              "Look the XID up in the runbook's table; most application XIDs need no hardware action.",
              detector="xid", family="xid", fire_after=1, evidence=("xid",),
              meaning="any other XID; look it up in the table below", method="XID events", detection=_XID),
    AlertSpec("GpuOverTemperature", "critical", "gpu",
              "{node} GPU {gpu} at {temp_c:.0f} C, over its {limit_c:.0f} C limit ({limit_why})",
              "Check the coolant loop of the rack, then the GPU's cold plate; drain if it keeps rising.",
              remediation="drain_inspect", detector="threshold", family="thermal", evidence=("temp_c", "limit_c", "limit_why"),
              suppresses=("GpuThermalDrift", "GpuHwSlowdown"),
              meaning="GPU die within `detect.thermal_margin_c` (4 C) of its own HW slowdown threshold (H100: "
                      "89 - 4 = 85 C); `detect.gpu_temp_limit_c` (85 C) where the threshold is unknown",
              method="thermal margin",
              detection="GPU within `detect.thermal_margin_c` (4 C) of its own HW slowdown threshold, which the "
                        "agent reads from NVML at start (`nvmlDeviceGetTemperatureThreshold`, SLOWDOWN; 89 C on "
                        "the recorded H100, so 85 C). Where the threshold is unknown, `detect.gpu_temp_limit_c` "
                        "(85 C)."),
    AlertSpec("GpuThermalRunaway", "critical", "gpu",
              "{node} GPU {gpu} at {temp_c:.0f} C, {excess_c:.1f} C hotter than its siblings and rising "
              "({rise_c:+.1f} C against its last ~20 s)",
              "Drain the node; the GPU's cold plate or thermal interface is failing.",
              remediation="drain_inspect", detector="peer_temperature", family="thermal", evidence=("temp_c", "excess_c", "rise_c"),
              suppresses=("GpuOverTemperature", "GpuThermalDrift", "GpuHwSlowdown"),
              meaning="GPU far hotter than its node siblings", method="peers + physics",
              detection="GPU hotter than the median of its node's GPUs by `peer_temp_excess_c`, after taking out "
                        "what its own power explains. Each GPU's temperature is moved to its peers' power at "
                        "`thermal_c_per_w`, with the power lagged as the H100 trace shows: 0.6 P + 0.4 P lagged at "
                        "tau 6.5 s. Siblings share the coolant, so job starts and stops cancel out, and so do jobs "
                        "that load only some of a node's GPUs. A smaller excess (`runaway_early_c`, 6 C) alerts as "
                        "well when it is still rising: `runaway_rise_c` (2 C) above its own average of the last "
                        "~20 s (rate of change). This applies only while the GPU's and its node's power are steady "
                        "(within `runaway_steady_w` of their lagged power), because temperatures lag a load that "
                        "starts or stops: eight replayed H100s at different points of their load swing by 8 C. That "
                        "catches a runaway at 0.15 C/s about 30 s sooner, while a GPU that is steadily hot stays "
                        "quiet."),
    AlertSpec("NodeThermalAnomaly", "critical", "node",
              "{node}: its GPUs run {excess_c:.1f} C hotter than the rack's other nodes at the same power",
              "Check the node's coolant branch (valve, quick disconnects, manifold) and drain it if it keeps rising.",
              remediation="drain_inspect", detector="peer_node_temperature", family="peers", evidence=("excess_c",),
              suppresses=("GpuOverTemperature", "GpuHwSlowdown"),
              meaning="all the node's GPUs hotter than the rack's other nodes at the same power",
              method="peers: node against rack",
              detection="Each node's median GPU temperature, taken to zero power with `thermal_c_per_w` so that "
                        "busy and idle nodes compare, against the median of the rack's other nodes of its GPU model (the "
                        "samples' `model`; an air-cooled L4 beside liquid-cooled H100s is no peer of theirs, and "
                        "three nodes of a model are needed). It alerts above "
                        "`node_temp_excess_c` (6 C), for example on a restricted coolant branch, where the GPUs "
                        "agree with their siblings and the rack's coolant is fine. It is judged only while the "
                        "node's power is steady, or in step with its rack's (the nodes of one training job swing "
                        "together and lag alike), and it explains (suppresses) the GPUs' over-temperature alerts."),
    AlertSpec("GpuThermalDrift", "warning", "gpu",
              "{node} GPU {gpu} runs {excess_c:.1f} C hotter than its siblings than it used to",
              "Schedule an inspection of the GPU's cold plate and coolant connections.",
              detector="cusum", family="thermal", fire_after="drift_confirm_samples", evidence=("excess_c",),
              suppresses=("GpuThermalRunaway",),
              meaning="GPU slowly getting hotter than its siblings over hours", method="CUSUM (Numba)",
              detection="A slow rise of the runaway's excess, under load only (at idle, integer temperatures move "
                        "it by ~2 C). A CUSUM with slack `cusum_slack_c` and limit `cusum_limit` sums what no "
                        "single sample shows. It is clamped at twice the limit, so it forgets a finished fault. The "
                        "baseline is what the GPU's own power explains, learnt per GPU as a regression on it: a GPU "
                        "whose cold plate conducts a little worse than its siblings' runs further above them at "
                        "full power than at low power, and its load follows the day, so a constant baseline would "
                        "call every afternoon a drift. It stops learning while the sum is non-zero, so a drift "
                        "cannot teach the baseline to follow it. The drift must hold `drift_confirm_samples` to "
                        "alert. Samples it cannot judge "
                        "(idle, forced clocks, coolant alert) neither raise nor clear it. A drift already alerted "
                        "stands for the GPU's runaway."),
    AlertSpec("GpuStraggler", "warning", "gpu",
              "{node} GPU {gpu} is a straggler: {power_w:.0f} W and {sm_mhz:.0f} MHz vs peers' "
              "{peer_power_w:.0f} W and {peer_sm_mhz:.0f} MHz at full utilisation",
              "Run `dcgmi diag -r 3` on the node; a straggler slows every job it is in.",
              remediation="drain_inspect", detector="peer_performance", family="performance",
              evidence=("power_w", "sm_mhz", "peer_power_w", "peer_sm_mhz"),
              meaning="lower power and clocks than its peers at full utilisation", method="peers",
              detection="At >= 90% utilisation and without HW-slowdown reasons, a GPU whose power and SM clock are "
                        "both below `straggler_ratio` of its node's median. Under a power cap (a limit below the "
                        "highest the GPU or its node has shown: demand response, [Power](power.md)) the cap sets "
                        "the power, and healthy GPUs under the same cap settle at the same SM clock: a capped GPU "
                        "is judged by its clock alone, below `straggler_ratio` of the clock its cap allows. That "
                        "is the H100 curve's clock at its cap (`power/curve.py`) times the median, over the "
                        "node's GPUs that their caps hold (reason 0x4, at least 4), of each one's clock over the "
                        "curve's at its own cap (peers at other caps compare); with fewer, the curve's clock. A "
                        "straggler is caught whether it draws under its cap or the cap holds it (same watts, "
                        "fewer MHz). A GPU with fewer than 4 uncapped peers (one left uncapped among capped "
                        "siblings) is judged the same way at its own limit. A fault that only lowers the clock "
                        "ceiling hides under a cap deeper than it, and shows when the cap goes."),
    AlertSpec("PowerCapNotBinding", "warning", "gpu",
              "{node} GPU {gpu} is capped at {power_limit_w:.0f} W but draws {power_w:.0f} W: the cap saves nothing",
              "Nothing is wrong with the GPU: its load fell under its cap. A demand-response request counts on "
              "savings this GPU no longer gives; the site's loop re-plans from the meter (docs/power.md).",
              detector="power_cap", family="power", fire_after="cap_not_binding_samples",
              evidence=("power_w", "power_limit_w"),
              meaning="a busy GPU under a power cap draws well under it", method="threshold",
              detection="A busy GPU (>= 5% utilisation) whose enforced limit is below the highest seen for it in "
                        "two readings in a row (its default) and that draws less than `cap_not_binding_ratio` of that "
                        "cap without clock reason 0x4 (SW power cap), for `cap_not_binding_samples` samples. A limit "
                        "an operator set under an earlier one (`nvidia-smi -pl`) reads as a cap too: silence the alert "
                        "for those nodes."),
    AlertSpec("PowerTargetMissed", "warning", "site",
              "site {site}: power request {request} {missed}",
              "Check `fleetwatch power status`: at the classes' capacity the loop can shed no more; pause class-0 or "
              "new jobs by hand, or tell the energy desk the commitment is at risk.",
              detector="power_control", family="control", fire_after=None, evidence=("request", "missed"),
              meaning="a power request's reduction was not reached by its ramp deadline, or a minute of its hold fell "
                      "short", method="the site's control loop",
              detection="Raised by the power role (`fleetwatch power`, [Power](power.md)) when a request's reduction "
                        "(baseline minus the meter) is not within 2% of its target by the request's ramp deadline, or "
                        "when a minute's mean of the hold falls under it; resolved when the request is over. Labelled "
                        "with the site, an empty `rack` and `request` (its id). Not raised in dry-run."),
    AlertSpec("RemediationBreakerOpen", "critical", "site",
              "site {site}: remediation halted: {asking} of {nodes} nodes of {where} asked to be quarantined "
              "within {window_min:g} min",
              "Find the common cause before any more nodes go out of service: a rack's cooling or power, a bad "
              "driver roll-out, or a detector misfiring; `fleetwatch remediation status` lists the cases.",
              detector="remediation_breaker", family="remediate", fire_after=None,
              evidence=("asking", "nodes", "where", "window_min"),
              meaning="more of the fleet, or of one rack, was quarantined within the breaker's window than "
                      "remediation may take out of service on its own: it quarantines no more nodes",
              method="the remediation role's circuit breaker",
              detection="Raised by the remediation role (`fleetwatch remediate`, [Remediation](remediation.md)) when "
                        "a quarantine would take more than `remediate.breaker_fleet_pct` of the fleet's nodes, or "
                        "`remediate.breaker_rack_pct` of one rack's, out of service within `remediate.breaker_window_s`; "
                        "resolved when a whole window passed without a new alert asking for one. Raised in "
                        "dry-run too: the plan would have tripped it."),
    AlertSpec("RemediationDrainOverdue", "warning", "node",
              "{node}: quarantined for {trigger} {waited} ago, its work still runs",
              "End or requeue the node's jobs (Slurm: `scontrol requeue`; Kubernetes: evict its pods), or set "
              "remediate.on_drain_timeout = proceed; `fleetwatch remediation status` shows the case.",
              detector="remediation_drain", family="remediate", fire_after=None,
              evidence=("trigger", "waited"),
              meaning="a quarantined node's work ran past remediate.drain_timeout_s: its remediation waits for it",
              method="the remediation role's cases",
              detection="Raised by the remediation role (`fleetwatch remediate`, [Remediation](remediation.md)) when "
                        "a node it quarantined still runs work `remediate.drain_timeout_s` later and "
                        "`remediate.on_drain_timeout` is `wait`: its case waits for the work to end, and a person may "
                        "end it. Resolved when the node drains, or its case ends otherwise (an operator's resume). "
                        "Labelled with the site, rack and node. Not raised in dry-run (a node drains at once)."),
    AlertSpec("NodePowerBrake", "critical", "node",
              "{node}: HW power brake slowdown on {gpus:.0f} GPUs",
              "Check the node's power supplies and the rack PDU; the brake is asserted by the board.",
              remediation="drain_inspect", detector="clock_reasons", family="performance", evidence=("gpus",), suppresses=("GpuHwSlowdown",),
              meaning="HW power brake (reason 0x80) asserted on the node's GPUs", method="clock reasons",
              detection="The HW power brake bit (0x80) on a node's GPUs: one alert per node, not per GPU."),
    AlertSpec("GpuHwSlowdown", "warning", "gpu",
              "{node} GPU {gpu}: clocks forced down ({what}, reasons {reasons}) at {temp_c:.0f} C, {sm_mhz:.0f} MHz",
              "Check the GPU's HBM temperature, the board's power and the node's inlet air; drain if it persists.",
              detector="clock_reasons", family="performance", evidence=("what", "reasons", "temp_c", "sm_mhz"),
              meaning="clocks forced down (HW or thermal slowdown) that no other alert explains",
              method="clock reasons (DCGM semantics)",
              detection="HW slowdown (0x8), SW thermal (0x20) or HW thermal (0x40) slowdown on a GPU, when no power "
                        "brake on its node, thermal alert on the GPU or coolant alert on its rack explains it, for "
                        "example HBM overheating or a PSU signal. The SW power cap (0x4) of a busy GPU at its limit "
                        "is normal and never alerts."),
    AlertSpec("GpuPcieReplayStorm", "warning", "gpu",
              "{node} GPU {gpu}: {rate_per_s:.0f} PCIe replays/s",
              "Check the PCIe link (`nvidia-smi -q` PCIe section); reseat the GPU at the next drain.",
              detector="counter_rate", family="counters", evidence=("rate_per_s",),
              meaning="PCIe replay counter climbing fast: marginal link", method="counter rates",
              detection="Replays per second above `detect.pcie_replay_rate_per_s`. Counter resets count as zero, "
                        "never as negative rates."),
    AlertSpec("GpuNvlinkErrorStorm", "warning", "gpu",
              "{node} GPU {gpu}: {rate_per_s:.0f} NVLink CRC errors/s",
              "Run `nvidia-smi nvlink -e`; reset the GPU or reseat the NVSwitch tray if errors persist.",
              remediation="reset_gpu", detector="counter_rate", family="counters", evidence=("rate_per_s",),
              meaning="NVLink CRC errors climbing fast: marginal link", method="counter rates",
              detection="NVLink CRC errors per second above `detect.nvlink_crc_rate_per_s`. Counter resets count "
                        "as zero, never as negative rates."),
    AlertSpec("GpuPowerSensorStuck", "warning", "gpu",
              "{node} GPU {gpu}: power reading stuck at {power_w:.3f} W for {samples:.0f} samples",
              "Power capping and accounting are blind on this GPU; reset it at the next drain.",
              detector="flatline", family="counters", evidence=("power_w", "samples"),
              meaning="power reading frozen at one value", method="flat-line (Numba)",
              detection="`stuck_samples` identical power readings in a row under load (utilisation 25% or more, "
                        "or a reading over a quarter of the GPU's highest limit: a job's draw frozen after the job paused or "
                        "ended), where a real sensor's reading moves every sample. Where 30 readings take longer (15 minutes "
                        "at dcgm-exporter's 30 s), a run that has lasted 2 minutes and is as unlikely as 1e-9 by the "
                        "share of that GPU's loaded readings that repeat the last (6 readings at least, after 60 loaded "
                        "ones) is enough; not while a limit holds the GPU (a cap, or its own limit at full load, reason "
                        "0x4: a real H200 held there repeats its reading to the watt 10-50% of the time), nor where the "
                        "source sends no clocks event reasons or enforced limit to tell (add both to dcgm-exporter's "
                        "counters file): there `stuck_samples`. At idle a reading to whole watts may "
                        "repeat for minutes (an H100 idles at 71.0 +- 0.2 W): there a run must be one in a million "
                        "by the idle runs that GPU has finished with a flicker (geometric, from their mean), 3x "
                        "its longest and at least 300 samples (an idle GPU's level drifts with its temperature, "
                        "across a whole watt or onto one), and an idle GPU is not judged before it has finished 5."),
    AlertSpec("CoolantFlowLoss", "critical", "rack",
              "rack {rack}: coolant flow {flow_lpm:.0f} l/min, {ratio:.0%} of its normal {baseline_lpm:.0f}",
              "Check the CDU pumps and valves now; cap or drain the rack's GPUs if temperatures climb.",
              detector="ewma", family="facility", evidence=("flow_lpm", "ratio", "baseline_lpm"),
              inhibits=_COOLING_TARGETS, suppresses=_COOLING_SUPPRESSES + ("RackThermalAnomaly",),
              meaning="rack coolant flow far below its normal", method="EWMA baseline (Numba)",
              detection="Rack flow below `flow_loss_ratio` of its learned baseline. Outliers do not move the "
                        "baseline, so the alert holds while the flow stays low."),
    AlertSpec("CoolantLeak", "critical", "rack",
              "rack {rack}: coolant leak detected by {device}",
              "Isolate the rack's coolant loop and drain its nodes; send facilities to inspect.",
              detector="leak_sensor", family="facility", fire_after=1, evidence=("device",),
              inhibits=_COOLING_TARGETS, suppresses=_COOLING_SUPPRESSES + ("RackThermalAnomaly",),
              meaning="a rack leak sensor tripped", method="leak sensor",
              detection="The CDU's leak point reads 1."),
    AlertSpec("RackThermalAnomaly", "critical", "rack",
              "rack {rack}: its GPUs run {excess_c:.1f} C hotter over their coolant than the site's other racks",
              "Check the rack's coolant loop for air (bleed it), its filters and cold plates; cap or drain the rack "
              "if it keeps rising.",
              detector="peer_rack_temperature", family="peers", evidence=("excess_c",),
              inhibits=_COOLING_TARGETS + ("RackHeatImbalance",),
              meaning="all the rack's GPUs hotter over their coolant than the site's other racks",
              method="physics + peers: rack against site",
              detection="Each rack's GPUs taken to zero power (the median over its nodes, as above) minus the "
                        "rack's mean coolant temperature (CDU supply and return): how far the GPUs sit above the "
                        "coolant that cools them. A rack whose gap exceeds the median of the site's racks by "
                        "`rack_temp_excess_c` (5 C) has something that warms all its GPUs alike while the coolant "
                        "reads normal: air in the loop, fouled cold plates, wrong coolant mix. It needs three racks "
                        "with data in the site, is quiet while the rack has a coolant alert, and inhibits its GPUs' "
                        "thermal alerts and the rack's heat balance at notification (the site tier judges it, apart "
                        "from them)."),
    AlertSpec("RackHeatImbalance", "warning", "rack",
              "rack {rack}: the coolant carries {coolant_w:.0f} W, {ratio:.0%} of the rack's {power_w:.0f} W "
              "(expected {expected:.0%})",
              "Compare the CDU's flow and temperature sensors with a handheld reading; then check the loop for air "
              "and the cold plates for contact.",
              detector="heat_balance", family="heat_balance", evidence=("coolant_w", "ratio", "power_w", "expected"),
              meaning="the coolant carries more or less of the rack's power than `detect.liquid_fraction` (0.8)",
              method="physics: heat balance",
              detection="The heat the coolant carries away, flow x 4186 J/(kg K) x (return - supply), against the "
                        "rack's power: the sum of its PDUs' latest readings (a rack fed by A and B feeds has two, "
                        "each reading its share; one silent for three of its intervals while the other reads, "
                        "failed over, is left out). Liquid cooling removes `liquid_fraction` (0.8) of IT power, so the PDU's power "
                        "and the flow predict the delta-T; the prediction follows a power change with the coolant's "
                        "lag (`coolant_lag_s`, 20 s), as the return temperature does. PDUs read 5 s apart or more "
                        "step it with the mean power their energy counter gives since the last reading, not the "
                        "instant (read every 30 s, a training job's swing had raised it falsely), where the counter "
                        "comes with the power reading, spans 50 of its steps or more, and is plausible against the "
                        "instants (a reset, a frozen counter: the instant). A measured delta-T off the "
                        "prediction by more than `heat_balance_tolerance` (20%) means heat going to the room (air in "
                        "the loop, cold plates losing contact) or a flow or temperature sensor that drifted. Judged "
                        "only once the prediction has settled and where the expected delta-T is at least "
                        "`heat_balance_min_delta_c` (1.5 C, well above sensor resolution); quiet while a coolant "
                        "alert or `PduOverload` explains it, and for three coolant lags after (`RackThermalAnomaly` "
                        "inhibits it at notify). The rack's two temperature sensors' offset (a BMS recalibrates them "
                        "in steps of tenths of a degree) is learned while the rack is healthy, over 30 minutes, up to "
                        "twice `heat_balance_sensor_c`. It explains "
                        "nothing itself: a drifting sensor raises it too, and it must not hide a GPU that really "
                        "overheats."),
    AlertSpec("PduOverload", "critical", "rack",
              "rack {rack}: PDU {device} draws {power_w:.0f} W, {ratio:.0%} of its {rating_w:.0f} W rating",
              "Lower the rack's GPU power caps or drain nodes before the breaker trips.",
              detector="threshold", family="facility", evidence=("device", "power_w", "ratio", "rating_w"),
              suppresses=("RackHeatImbalance",),
              meaning="rack PDU near or above its rating", method="threshold",
              detection="PDU power above `pdu_load_ratio` of `fleet.pdu_rating_w`."),
    AlertSpec("SitePowerOverCap", "warning", "site",
              "site {site}: meter {device} reads {power_w:.0f} W, {ratio:.0%} of the site's {cap_w:.0f} W cap",
              "Lower GPU power caps across the site (the cheapest watts) until the meter is back under the cap.",
              detector="threshold", family="facility", evidence=("device", "power_w", "ratio", "cap_w"),
              meaning="the site's main meter above `detect.site_power_cap_w`", method="physics: site power",
              detection="The main meter (a site-level `power_w`) above `detect.site_power_cap_w`, the contracted or "
                        "breaker cap (off when 0). Labelled with the site and an empty `rack`."),
    AlertSpec("FleetwatchArchiveFailing", "critical", "fleetwatch",
              "archive on {instance} cannot write since {since}: {error}",
              "Free space or fix permissions under the archive; detection and alerting go on, data waits in "
              "memory (in-process: the oldest is dropped past archive.outage_buffer_mb) or on Kafka.",
              detector="archive", family="archive", fire_after=None, evidence=("since", "error"),
              meaning="the Parquet archive cannot write (full disk, permissions); detection and alerting go on",
              method="the archive itself",
              detection="The Parquet archive cannot write: full disk, less free than `archive.min_free_mb` (kept "
                        "for `alerts.jsonl` and the outboxes), a permission error, `archive/` deleted. Detection and "
                        "alerting go on. The archive retries with backoff (up to `archive.retry_max_s`) and holds up "
                        "to `archive.outage_buffer_mb`: in-process it then drops the oldest rows, counted per "
                        "dataset on the status line and in the summary; over Kafka it commits nothing and pauses "
                        "reading, so nothing is lost. Resolves on the first write that succeeds. While it fires "
                        "the archive sends it again every `daemon.watchdog_heartbeat_s`, and notify resolves one "
                        "that missed three (an archive that stopped while failing: its successor, on another "
                        "host, cannot). Labelled with the site and the archive's host (`instance`)."),
    AlertSpec("FleetwatchWatchdog", "none", "fleetwatch",
              "Fleetwatch on {instance} is healthy; this alert always fires (dead-man's switch)",
              "Nothing while it fires. Route it to a heartbeat check that pages when it stops arriving.",
              detector="watchdog", family="ops", fire_after=None,
              meaning="always firing while Fleetwatch is healthy: the dead-man's switch of the whole alert path",
              method="the process's own health",
              detection="Fires in every process that runs detect once it is ready (warmed up, its first read done, "
                        "Kafka reachable) and while none of its roles is stalled, so its arrival proves that "
                        "detection, the bus, notify and the route to the receiver work (kube-prometheus's "
                        "`Watchdog`). It resolves when the process stops or stays unhealthy for "
                        "`daemon.stall_intervals` checks. Route it to a heartbeat service that pages when it stops "
                        "arriving (deploy/alertmanager: receiver `deadmans-switch`), never to people. Labelled with "
                        "the site and `instance`, the process: the `host:port` of its `--http`, else `host/pid`."),
    AlertSpec("FleetwatchStalled", "critical", "fleetwatch",
              "Fleetwatch {role} on {instance} stalled: {detail}",
              "Read the process's log and /readyz; restart the role if it does not recover (over Kafka nothing is "
              "lost: it resumes from its last commit).",
              detector="progress", family="ops", fire_after=None, evidence=("role", "detail"),
              meaning="a role of Fleetwatch stopped making progress: no samples, consumer lag growing, archive not "
                      "flushing",
              method="the roles' own progress",
              detection="A role of a process stopped making progress for `daemon.stall_intervals` of its "
                        "intervals (label `stalled`): `samples`, a source published nothing while Kafka and the MQTT "
                        "broker are reachable; `consumer_lag`, a consumer's input waits unread, or its Kafka "
                        "consumer lag grew at every check (one a second); `archive_flush`, the archive holds rows and "
                        "made nothing durable for that many flush intervals (`archive.flush_interval_s`; not while "
                        "`FleetwatchArchiveFailing` fires). A stalled source also fails `/healthz` (systemd's "
                        "watchdog or Kubernetes restart it); a stalled consumer does not. Resolves when the role "
                        "moves again. "
                        "Labelled with the site, `instance` (as the Watchdog), `role` and `stalled`."),
    # Prometheus's, on Fleetwatch's /metrics: what no Fleetwatch process can say when it is the one that is down,
    # or when the receiver it would say it to is. Labelled with the scrape's `job` and `instance`, not `site`
    # (unless the Prometheus's external_labels set one).
    AlertSpec("FleetwatchTargetDown", "warning", "fleetwatch",
              "Prometheus cannot scrape Fleetwatch {job} at {instance}",
              "Check the process (systemctl status fleetwatch, kubectl get pods -n fleetwatch) and its --http; "
              "a central role down also ends FleetwatchWatchdog, an agent's node raises NodeNotReporting.",
              detector="prometheus", family="prometheus", fire_after=None, evidence=("job",),
              meaning="Prometheus cannot scrape a Fleetwatch process for 10 minutes: it is down, or its --http is",
              method="Prometheus rule",
              detection="`up == 0` for a target of a job named `fleetwatch*` (compose's `fleetwatch-<role>`, the "
                        "PodMonitor's `fleetwatch/fleetwatch`) for 10 minutes.",
              promql='up{job=~"fleetwatch.*"} == 0', pending_for="10m"),
    AlertSpec("FleetwatchNotificationsBacklog", "critical", "fleetwatch",
              "Fleetwatch notify on {instance}: receiver {receiver} has held notifications for 10 minutes",
              "The receiver refuses or does not answer: alerts are not reaching it. Read notify's log for the "
              "receiver's errors; fix the receiver or its URL and credentials (the outbox delivers what it holds).",
              detector="prometheus", family="prometheus", fire_after=None, evidence=("receiver",),
              meaning="a receiver's outbox has not emptied for 10 minutes: alerts are not reaching it",
              method="Prometheus rule",
              detection="`fleetwatch_outbox_pending > 0` for 10 minutes: notify retries (with backoff) what the "
                        "receiver refuses or does not answer, and holds it in the receiver's outbox on disk. Goes "
                        "through Prometheus's Alertmanager, not the receiver that fails.",
              promql="fleetwatch_outbox_pending > 0", pending_for="10m"),
    AlertSpec("FleetwatchNotificationsLost", "critical", "fleetwatch",
              "Fleetwatch notify on {instance} gave up on notifications to {receiver} in the last hour",
              "Read notify's log for why the receiver rejected them; fix it, then read what was missed with "
              "`fleetwatch alerts` (every alert is in alerts.jsonl and the archive).",
              detector="prometheus", family="prometheus", fire_after=None, evidence=("receiver",),
              meaning="notify gave up on notifications to a receiver: alerts were not delivered",
              method="Prometheus rule",
              detection="`fleetwatch_notifications_dead_lettered_total` rose in the last hour: notify gave up on a "
                        "notification (the receiver refused it for good, a 4xx, or it outlived its retries). "
                        "Resolves an hour after the last.",
              # (a series younger than an hour that is already above 0: given up on before the first scrape,
              # e.g. records expired as notify started, which increase() cannot see)
              promql="increase(fleetwatch_notifications_dead_lettered_total[1h]) > 0 or "
                     "(fleetwatch_notifications_dead_lettered_total unless "
                     "fleetwatch_notifications_dead_lettered_total offset 1h) > 0"),
    AlertSpec("FleetwatchIntakeRejecting", "warning", "fleetwatch",
              "Fleetwatch on {instance} rejects input at intake ({group}: {reason})",
              "Read the process's log for the first rejected record of the reason and fix its producer (an "
              "agent of another version, a BMS gateway's payload); over Kafka the records wait on the dead-letter "
              "topic.",
              detector="prometheus", family="prometheus", fire_after=None, evidence=("group", "reason"),
              meaning="rows or messages rejected at intake for 15 minutes: a producer sends what Fleetwatch cannot "
                      "read",
              method="Prometheus rule",
              detection="`fleetwatch_dead_letters_total` rose in every 5 minutes for 15 minutes, per group and "
                        "reason: a producer keeps sending what Fleetwatch cannot read (counted, logged once, "
                        "dead-lettered; the data beside it is kept). One bad record now and then raises nothing.",
              promql="sum by (job, instance, group, reason) (increase(fleetwatch_dead_letters_total[5m])) > 0",
              pending_for="15m"),
    AlertSpec("FleetwatchCollectorStalled", "warning", "fleetwatch",
              "Fleetwatch collector on {instance} stalled (on its /metrics)",
              "On the agent's node run nvidia-smi: a hang needs a GPU reset or a reboot (drain first); on a DCGM "
              "source check the exporters' /metrics.",
              detector="prometheus", family="prometheus", fire_after=None,
              meaning="an NVML agent or a DCGM source stalled, which only its /metrics can say",
              method="Prometheus rule",
              detection="`fleetwatch_alerts_firing{alertname=\"FleetwatchStalled\"}` of a process that runs the "
                        "agent, the DCGM source or the simulator and no role that writes the alerts topic (such a "
                        "process keeps `FleetwatchStalled` on its /metrics only), for 5 minutes.",
              promql='fleetwatch_alerts_firing{alertname="FleetwatchStalled"} > 0 '
                     'and on (job, instance) fleetwatch_up{role=~"agent|dcgm|simulate"} '
                     'unless on (job, instance) fleetwatch_up{role=~"facility|detect|power|remediate|archive"}',
              pending_for="5m"),
)

ALERTS_BY_NAME: dict[str, AlertSpec] = {a.name: a for a in ALERTS}

# The alerts the detectors raise (the rest Fleetwatch raises about itself: pipeline/sinks/archive_outage.py,
# pipeline/ops/selfalerts.py; the power role about a request: pipeline/roles/power.py; or Prometheus by the rules
# generated from `promql`: deploy/prometheus/rules.yml).
# The engine tracks each on its `entity` (a site-scoped alert on the site's rack "" entry).
NOT_DETECTORS = ("archive", "ops", "control", "remediate", "prometheus")  # families outside the detect engine
DETECTOR_ALERTS: tuple[AlertSpec, ...] = tuple(a for a in ALERTS if a.family not in NOT_DETECTORS)
# The alerts Prometheus raises by the rules generated from them (deploy/prometheus/rules.yml).
RULE_ALERTS: tuple[AlertSpec, ...] = tuple(a for a in ALERTS if a.family == "prometheus")


def explained_by(target: str, scope: str) -> tuple[str, ...]:
    """The alerts of `scope` that suppress `target` in the detector (catalog order)."""
    return tuple(a.name for a in ALERTS if a.scope == scope and target in a.suppresses)


def inhibit_rules() -> list[tuple[str, str, list[str]]]:
    """The default alerts.inhibit_rules as (source regex, target regex, equal labels): one rule
    per set of sources that inhibit the same targets at the same scope, broader scopes first."""
    groups: dict[tuple[tuple[str, ...], str], list[str]] = {}
    for a in ALERTS:
        if a.inhibits:
            groups.setdefault((a.inhibits, a.scope), []).append(a.name)
    ordered = sorted(groups.items(), key=lambda kv: _BREADTH[kv[0][1]])  # stable: catalog order within a scope
    return [("|".join(sources), "|".join(targets), list(INHIBIT_EQUAL[scope]))
            for (targets, scope), sources in ordered]


# DCGM's critical XIDs and the alert each raises; any other XID raises GpuXid.
XID_ALERTS: dict[int, str] = {
    48: "GpuUncorrectableEcc", 63: "GpuUncorrectableEcc", 64: "GpuUncorrectableEcc",
    94: "GpuUncorrectableEcc", 95: "GpuUncorrectableEcc", 140: "GpuUncorrectableEcc",
    74: "GpuNvlinkError", 79: "GpuFellOffBus", 92: "GpuHighSbeRate",
    119: "GpuGspError", 120: "GpuGspError",
}


# The remediation of each XID that has one other than its alert's (the runbooks' XID table).
XID_REMEDIATIONS: dict[int, str] = {
    61: "reset_gpu", 62: "reset_gpu",  # micro-controller breakpoint, halt (GpuXid)
    64: "replace",                      # row remap failure (GpuUncorrectableEcc)
    154: "drain_inspect",               # the driver asks for a recovery action: read it on the node
}


def remediation(name: str, evidence: dict | None = None) -> str:
    """What a remediation does about alert `name`: its XID's action where it has one, else its spec's.
    A row remap failure NVML's flag shows (evidence `remap_failure`) is what XID 64 reports."""
    evidence = evidence or {}
    own, xid = ALERTS_BY_NAME[name].remediation, evidence.get("xid")
    if evidence.get("remap_failure"):
        xid = 64
    return own if xid is None else XID_REMEDIATIONS.get(int(xid), own)


def costliest(remediations) -> str:
    """The costliest of some remediations (REMEDIATIONS' order); "none" of none."""
    return max(remediations, key=REMEDIATIONS.index, default="none")


def raised(name: str, labels: dict[str, str], evidence: dict, now, runbook_base_url: str = "",
           score: float = 1.0, shown: dict | None = None):
    """A firing Alert of the catalog's `name` raised outside the detectors (the power role,
    ops/selfalerts.py, sinks/archive_outage.py; an Alert of the model): its severity, summary
    over labels and evidence, action and runbook from the catalog. `shown`: values the summary
    shows in place of the evidence's (a time to the second where the evidence has it finer)."""
    from pipeline.model import Alert
    spec = ALERTS_BY_NAME[name]
    labels = {"alertname": name, "severity": spec.severity, **labels}
    facts = ", ".join(f"{k}={v}" for k, v in evidence.items())
    return Alert(labels=labels,
                 annotations={"summary": spec.summary.format(**{**labels, **evidence, **(shown or {})}),
                              "description": spec.action + (f" Evidence ({spec.detector}): {facts}." if facts else ""),
                              "runbook_url": runbook_url(runbook_base_url, name),
                              "remediation": remediation(name, evidence)},
                 starts_at=now, detector=spec.detector, score=score, evidence=evidence)


def runbook_url(base_url: str, alertname: str) -> str:
    """The runbook of an alert: under alerts.runbook_base_url, or (empty) the page
    installed with Fleetwatch, as a file:// URL that resolves on this machine. A base without
    its trailing slash gets one (".../runbooksGpuXid.md" had been every page's dead link),
    but one that ends in a query, a fragment or a name's separator (?page=, #, Runbook-, rb_, wiki:) is
    a prefix as given."""
    if base_url and not base_url.endswith(("/", "=", "#", "?", "-", "_", ":")):
        base_url += "/"
    return f"{base_url or runbooks_dir().as_uri() + '/'}{alertname}.md"
