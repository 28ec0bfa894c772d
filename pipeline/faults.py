"""The fault catalog: what the simulator can inject and what the detectors should say.

Shared vocabulary of the simulator (which injects faults and writes ground-truth
labels) and the evaluator (which scores alerts against those labels).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FaultType:
    name: str
    scope: str                      # "gpu", "node" or "rack": what the label targets
    alertnames: tuple[str, ...]     # alerts that count as detecting it
    duration_s: tuple[float, float]  # injected duration range
    score_window_s: float           # scored only when it started at least this long before the run ended
    needs_load: bool                # visible only while the node runs a job (the node is kept busy)
    summary: str


FAULTS: tuple[FaultType, ...] = (
    FaultType("gpu_fell_off_bus", "gpu", ("GpuFellOffBus", "GpuNotReporting"), (300, 900), 60, False,
              "XID 79: the GPU fell off the bus and stops reporting"),
    FaultType("ecc_uncorrectable", "gpu", ("GpuUncorrectableEcc",), (300, 900), 60, False,
              "uncorrectable ECC error (XID 48/94/95) with row remap pending or failed"),
    FaultType("thermal_runaway", "gpu", ("GpuThermalRunaway", "GpuOverTemperature"), (240, 600), 300, True,
              "one GPU heats up far beyond its siblings under normal coolant"),
    FaultType("coolant_flow_loss", "rack", ("CoolantFlowLoss",), (240, 600), 120, False,
              "a rack's coolant flow drops to 10-30% (pump or valve failure)"),
    FaultType("coolant_leak", "rack", ("CoolantLeak",), (240, 600), 60, False,
              "the rack's leak sensor trips"),
    FaultType("straggler_gpu", "gpu", ("GpuStraggler",), (300, 900), 300, True,
              "one GPU runs at lower clocks and power than its 7 siblings at 100% utilisation"),
    FaultType("hw_power_brake", "node", ("NodePowerBrake",), (120, 600), 120, True,
              "HW power brake slowdown asserted on every GPU of a node"),
    FaultType("pcie_replay_storm", "gpu", ("GpuPcieReplayStorm",), (180, 600), 120, False,
              "PCIe replay counter climbs by tens to hundreds per second"),
    FaultType("nvlink_crc_storm", "gpu", ("GpuNvlinkErrorStorm",), (180, 600), 120, False,
              "NVLink CRC error counter climbs by hundreds per second"),
    FaultType("stuck_power_sensor", "gpu", ("GpuPowerSensorStuck",), (300, 900), 300, False,
              "the GPU's power reading freezes at one value"),
    FaultType("pdu_overload", "rack", ("PduOverload",), (180, 600), 120, False,
              "the rack PDU draws more than its rating"),
    FaultType("node_cooling_degraded", "node", ("NodeThermalAnomaly", "GpuOverTemperature"), (300, 900), 180, True,
              "a node's coolant branch is restricted: all its GPUs run 8-15 C hotter than the rack's other nodes"),
    FaultType("rack_cooling_degraded", "rack", ("RackThermalAnomaly", "RackHeatImbalance", "GpuOverTemperature"),
              (300, 900), 180, False,
              "air in a rack's coolant loop (or fouled cold plates): its GPUs run 6-12 C hotter than the site's "
              "other racks and the coolant carries 25-45% less of the rack's heat (a worse loss, as `fleetwatch "
              "eval --rack-cooling-loss` injects, takes them over their slowdown temperature)"),
    FaultType("thermal_drift", "gpu", ("GpuThermalDrift", "GpuThermalRunaway", "GpuOverTemperature"),
              (3 * 3600, 4 * 3600), 3 * 3600, False,
              "one GPU's temperature creeps up by 2-6 C per hour (cold plate degrading)"),
)

FAULT_TYPES: tuple[str, ...] = tuple(f.name for f in FAULTS)
FAULTS_BY_NAME: dict[str, FaultType] = {f.name: f for f in FAULTS}

# Node events (schemas/event.v1.json) that announce a planned outage: a node drained for a
# rolling reboot, or for one that upgrades its driver, about to stop reporting for minutes.
MAINTENANCE_EVENTS: tuple[str, ...] = ("node_reboot", "driver_upgrade")
# Normal events the simulator labels too: any alert they cause is a false alert. A GPU reset
# loses one scrape; with the realistic normal (fleet.normal), the maintenance events.
NORMAL_EVENTS: tuple[str, ...] = ("gpu_reset",) + MAINTENANCE_EVENTS
