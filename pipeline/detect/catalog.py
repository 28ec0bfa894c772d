"""Every alert Fleetwatch can raise: its severity, what it targets and how it reads.

Each alertname has a runbook at runbooks/<alertname>.md (a test enforces it).
Summaries are format strings over the alert's labels and evidence.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.resources import runbooks_dir


@dataclass(frozen=True)
class AlertSpec:
    name: str
    severity: str   # critical: act now; warning: act today
    scope: str      # gpu, node or rack: which labels identify it; fleetwatch: raised by Fleetwatch about itself
    summary: str    # format string over labels and evidence
    action: str     # the first thing to do, repeated in the description


ALERTS: tuple[AlertSpec, ...] = (
    AlertSpec("GpuFellOffBus", "critical", "gpu",
              "{node} GPU {gpu} fell off the bus (XID 79)",
              "Drain the node and reboot it; if XID 79 recurs, reseat or RMA the GPU."),
    AlertSpec("GpuNotReporting", "critical", "gpu",
              "{node} GPU {gpu} stopped reporting ({silent_s:.0f} s) while its node still reports",
              "Check `nvidia-smi` on the node and the kernel log for XIDs; drain if the GPU is gone."),
    AlertSpec("NodeNotReporting", "critical", "node",
              "{node} sent no GPU telemetry for {silent_s:.0f} s",
              "Check that the node is up and its agent runs; then check its network path."),
    AlertSpec("GpuUncorrectableEcc", "critical", "gpu",
              "{node} GPU {gpu}: uncorrectable memory error ({what})",
              "Drain the node; reset the GPU to apply a pending row remap; a remap failure means RMA."),
    AlertSpec("GpuNvlinkError", "warning", "gpu",
              "{node} GPU {gpu}: NVLink error (XID 74)",
              "Run `nvidia-smi nvlink -e` and `dcgmi diag -r 3`; reset the GPU if links are down."),
    AlertSpec("GpuHighSbeRate", "warning", "gpu",
              "{node} GPU {gpu}: high single-bit ECC error rate (XID 92)",
              "Watch row remapping; schedule a GPU reset at the next drain."),
    AlertSpec("GpuGspError", "critical", "gpu",
              "{node} GPU {gpu}: GSP firmware error (XID {xid})",
              "Drain the node and reset the GPU; if it recurs, reboot and update the driver."),
    AlertSpec("GpuXid", "warning", "gpu",
              "{node} GPU {gpu}: XID {xid}",
              "Look the XID up in the runbook's table; most application XIDs need no hardware action."),
    AlertSpec("GpuOverTemperature", "critical", "gpu",
              "{node} GPU {gpu} at {temp_c:.0f} C, over its {limit_c:.0f} C limit ({limit_why})",
              "Check the coolant loop of the rack, then the GPU's cold plate; drain if it keeps rising."),
    AlertSpec("GpuThermalRunaway", "critical", "gpu",
              "{node} GPU {gpu} at {temp_c:.0f} C, {excess_c:.1f} C hotter than its siblings and rising "
              "({rise_c:+.1f} C against its last ~20 s)",
              "Drain the node; the GPU's cold plate or thermal interface is failing."),
    AlertSpec("NodeThermalAnomaly", "critical", "node",
              "{node}: its GPUs run {excess_c:.1f} C hotter than the rack's other nodes at the same power",
              "Check the node's coolant branch (valve, quick disconnects, manifold) and drain it if it keeps rising."),
    AlertSpec("GpuThermalDrift", "warning", "gpu",
              "{node} GPU {gpu} runs {excess_c:.1f} C hotter than its siblings than it used to",
              "Schedule an inspection of the GPU's cold plate and coolant connections."),
    AlertSpec("GpuStraggler", "warning", "gpu",
              "{node} GPU {gpu} is a straggler: {power_w:.0f} W and {sm_mhz:.0f} MHz vs peers' "
              "{peer_power_w:.0f} W and {peer_sm_mhz:.0f} MHz at full utilisation",
              "Run `dcgmi diag -r 3` on the node; a straggler slows every job it is in."),
    AlertSpec("NodePowerBrake", "critical", "node",
              "{node}: HW power brake slowdown on {gpus:.0f} GPUs",
              "Check the node's power supplies and the rack PDU; the brake is asserted by the board."),
    AlertSpec("GpuHwSlowdown", "warning", "gpu",
              "{node} GPU {gpu}: clocks forced down ({what}, reasons {reasons}) at {temp_c:.0f} C, {sm_mhz:.0f} MHz",
              "Check the GPU's HBM temperature, the board's power and the node's inlet air; drain if it persists."),
    AlertSpec("GpuPcieReplayStorm", "warning", "gpu",
              "{node} GPU {gpu}: {rate_per_s:.0f} PCIe replays/s",
              "Check the PCIe link (`nvidia-smi -q` PCIe section); reseat the GPU at the next drain."),
    AlertSpec("GpuNvlinkErrorStorm", "warning", "gpu",
              "{node} GPU {gpu}: {rate_per_s:.0f} NVLink CRC errors/s",
              "Run `nvidia-smi nvlink -e`; reset the GPU or reseat the NVSwitch tray if errors persist."),
    AlertSpec("GpuPowerSensorStuck", "warning", "gpu",
              "{node} GPU {gpu}: power reading stuck at {power_w:.3f} W for {samples:.0f} samples",
              "Power capping and accounting are blind on this GPU; reset it at the next drain."),
    AlertSpec("CoolantFlowLoss", "critical", "rack",
              "rack {rack}: coolant flow {flow_lpm:.0f} l/min, {ratio:.0%} of its normal {baseline_lpm:.0f}",
              "Check the CDU pumps and valves now; cap or drain the rack's GPUs if temperatures climb."),
    AlertSpec("CoolantLeak", "critical", "rack",
              "rack {rack}: coolant leak detected by {device}",
              "Isolate the rack's coolant loop and drain its nodes; send facilities to inspect."),
    AlertSpec("RackThermalAnomaly", "critical", "rack",
              "rack {rack}: its GPUs run {excess_c:.1f} C hotter over their coolant than the site's other racks",
              "Check the rack's coolant loop for air (bleed it), its filters and cold plates; cap or drain the rack "
              "if it keeps rising."),
    AlertSpec("RackHeatImbalance", "warning", "rack",
              "rack {rack}: the coolant carries {coolant_w:.0f} W, {ratio:.0%} of the rack's {power_w:.0f} W "
              "(expected {expected:.0%})",
              "Compare the CDU's flow and temperature sensors with a handheld reading; then check the loop for air "
              "and the cold plates for contact."),
    AlertSpec("PduOverload", "critical", "rack",
              "rack {rack}: PDU {device} draws {power_w:.0f} W, {ratio:.0%} of its {rating_w:.0f} W rating",
              "Lower the rack's GPU power caps or drain nodes before the breaker trips."),
    AlertSpec("SitePowerOverCap", "warning", "rack",
              "site {site}: meter {device} reads {power_w:.0f} W, {ratio:.0%} of the site's {cap_w:.0f} W cap",
              "Lower GPU power caps across the site (the cheapest watts) until the meter is back under the cap."),
    AlertSpec("FleetwatchArchiveFailing", "critical", "fleetwatch",
              "archive on {instance} cannot write since {since}: {error}",
              "Free space or fix permissions under the archive; detection and alerting go on, data waits in "
              "memory (in-process: the oldest is dropped past archive.outage_buffer_mb) or on Kafka."),
)

# The alerts the detectors raise (the rest Fleetwatch raises about itself: pipeline/sinks/archive_outage.py).
DETECTOR_ALERTS: tuple[AlertSpec, ...] = tuple(a for a in ALERTS if a.scope != "fleetwatch")

ALERTS_BY_NAME: dict[str, AlertSpec] = {a.name: a for a in ALERTS}

# DCGM's critical XIDs and the alert each raises; any other XID raises GpuXid.
XID_ALERTS: dict[int, str] = {
    48: "GpuUncorrectableEcc", 63: "GpuUncorrectableEcc", 64: "GpuUncorrectableEcc",
    94: "GpuUncorrectableEcc", 95: "GpuUncorrectableEcc", 140: "GpuUncorrectableEcc",
    74: "GpuNvlinkError", 79: "GpuFellOffBus", 92: "GpuHighSbeRate",
    119: "GpuGspError", 120: "GpuGspError",
}


def runbook_url(base_url: str, alertname: str) -> str:
    """The runbook of an alert: under alerts.runbook_base_url, or (empty) the page
    installed with Fleetwatch, as a file:// URL that resolves on this machine."""
    return f"{base_url or runbooks_dir().as_uri() + '/'}{alertname}.md"
