"""Fleet simulator: GPUs, coolant loops and power feeds, with faults injected from the
catalog and their ground truth labelled.

Everything is vectorised over the fleet (one numpy operation per quantity per tick)
and driven by one seeded generator, so a seed gives the same fleet and a run can go
as fast as the CPU allows.

Calibration, from the recorded H100 (pipeline/sources/recordings/h100/h100_load_trace.jsonl):
- idle: ~71 W, clocks event reason 0x1 (GPU idle), SM 345 MHz, GPU 34 C, HBM 36 C;
- busy: pinned just under the 700 W limit with reason 0x4 (SW power cap) and SM
  1350-1455 MHz; GPU 34 -> ~62 C and HBM 36 -> ~54 C. At 10 Hz the trace shows two
  time constants: ~60% of the GPU's rise (~32% of the HBM's) within 0.3 s, the rest
  with tau ~6.5 s (GPU 54 C at 2 s, 59 C at 10 s, 62 C at 22 s). So temperatures
  follow two first-order lags, tau 0.2 s and 6.5 s, towards a steady state that is
  linear in power above the coolant temperature.
Time: the physics steps every PHYSICS_STEP_S (1 s) or every scrape if faster; a fleet scraped
every 30 s is the same fleet read every 30th second, its energy counters and work counting
every second between.
Facility: the coolant takes LIQUID_FRACTION of the rack's IT heat, so
return - supply = heat / (flow x cp); GPU temperatures ride on the mean coolant
temperature, so a failing pump heats every GPU of the rack. The site meter adds
cooling overhead, so PUE > 1.

Power caps (`set_caps`), from the recorded H100's cap steps (recordings/h100/README.md,
power/curve.py): NVML reports a new limit at once and the power settles under it within
0.2-0.4 s (first order, tau CAP_TAU_S); a GPU the cap holds below its draw runs at the
curve's clock for that power with reason 0x4 (SW power cap) and does the curve's share
of its work (`work_done` against `work_uncapped`). A straggler, less efficient at any power,
loses the curve's share of its own lower clock: held by a cap it stays slower than its peers.

Jobs differ in how much of their work a cap costs (`group_sens`, the compute-bound share of
a job's time): a compute-bound job (training, prefill) runs at the curve's rate, a
memory-bound one (decode, embedding lookups) waits on HBM, whose bandwidth a lower SM clock
barely touches. A job of sensitivity s held to a compute rate r (the curve at the capped
power over the curve at its draw) keeps 1 / (s / r + 1 - s) of its work (Amdahl), and its
memory traffic (`util_mem`) falls with its work: what NVML would show, and what Fleetwatch
learns sensitivities from (power/learn.py). Sensitivities come from a separate generator
(seed, 15), and change nothing without a cap: an uncapped run stays bit-identical.

The realistic normal (fleet.normal = "realistic", the default; RealisticNormal): what a real
GPU fleet does when nothing is wrong, none of it labelled a fault. Each phenomenon (PHENOMENA)
draws from a generator of its own, (seed, 16, i), and the job structure from (seed, 16), so
the simple normal (fleet.normal = "simple": steady jobs, exact readings, one clock) is
bit-identical to the simulator before it, and a phenomenon can be turned off alone.
- Jobs: a quarter of the 4-node groups serve inference; the others run training jobs on
  runs of 2-4 neighbouring groups (8-16 nodes, one or two racks) that start and stop
  together (the lead group's churn, as before). With diurnal on, a service runs day and
  night and keeps its sensitivity through its group's churn.
- diurnal: inference follows the time of day (local time = UTC): a service's utilisation
  goes from 15-30% at 04:00 to 60-90% at 16:00 (cosine), times minutes-scale bursts (8%,
  tau 5 min) and 4% per GPU and sample. Production LLM inference (Azure's public LLM
  inference traces, Patel et al., "Splitwise", ISCA 2024; Stojkovic et al., "DynamoLLM",
  HPCA 2025) follows the day, its night several times lighter than its afternoon.
- training: a synchronous job alternates compute (pinned at the power limit) and
  collective communication, where its GPUs draw 300-450 W at full clocks and utilisation,
  all its GPUs at once, with a step of 15-45 s (3% jitter), 20-35% of it communicating: a
  16-node job swings the site meter by ~45 kW. Meta's Llama 3 report ("The Llama 3 Herd of
  Models", 2024, sec. 3.3.4) saw tens of thousands of GPUs raise and drop their power together
  (collectives, checkpoints), swinging the data centre by tens of MW; Patel et al.
  ("Characterizing Power Management Opportunities for LLMs in the Cloud", ASPLOS 2024) measured
  the same swings on LLM training servers.
- checkpoints: every 20-60 min a training job stalls for 30-90 s while it writes its state:
  every GPU of the job at ~90 W (sd 10), no utilisation, idle clocks (reason 0x1), memory
  held. Synchronous checkpoints of large models stall training for tens of seconds
  (Mohan et al., "CheckFreq", FAST 2021; Llama 3, above).
- reboots: rolling maintenance, as NVIDIA's GPU Operator upgrades drivers (a few nodes at a
  time: cordon, drain, reload, uncordon). Each node is rebooted about twice a day (a fleet in a
  maintenance campaign: the hardest normal), 1-3 fault-free nodes of one rack at a time:
  drained (idle, still reporting) for 30-90 s, announced by an event row (node-level, kind
  `node_reboot` or `driver_upgrade`), then silent for 120-300 s, then back idle for 60-180 s
  before it takes jobs again; back with its counters started over (NVML's energy counts
  from driver load), after an upgrade (half the batches) with NEW_DRIVER_VERSION. Labelled
  as normal events (faults.NORMAL_EVENTS), node scope, over the whole window.
- noise, quantization: facility temperatures carry 0.03 C of sensor noise, differential
  pressure 0.4 kPa; the BMS reports temperatures to 0.1 C, flow to 0.5 L/min, pressure to
  1 kPa, PDU power to 1 W and energy to 1 Wh, the site meter to 100 W and 1 Wh (BACnet and
  Modbus points of CDUs and meters are scaled integers at about these resolutions; a revenue
  meter keeps its energy as a count of Wh).
- power_quantization: GPU power reported to 1 W (as collectors that round it do; NVML
  itself reports mW).
- averaged_readings: NVML reports GPU power and utilisations as means over the last second, and
  clocks and clock event reasons as the instant's. A training job's phases change between the
  physics' steps, so the reading after a change blends both phases: the first reading of compute
  under a cap has reason 0x4 and part of the communication's draw and memory traffic in it.
  (Everything else changes on a step, and its reading is the step's.)
- dropouts: 0.1% of GPU rows and 0.02% of whole node scrapes missing, each for one sample
  (never long enough for NodeNotReporting), and 0.1% of facility readings.
- recalibration: each facility temperature sensor starts off by N(0, 0.1 C) and about once a
  day steps by 0.2-0.5 C either way (a recalibration, a swapped probe), and stays there.
- thermal_spread: each GPU's temperature rise per watt differs from its model's by N(0, 5%) (the
  contact of its cold plate, its place in the node's coolant path): at 700 W a GPU 2 sd out
  runs 2.8 C hotter than its siblings, at 200 W 0.8 C, so its excess over them follows its
  load. Identical GPUs under one application differ in temperature, power and speed (Sinha et
  al., "Not All GPUs Are Created Equal", SC 2022).
- clock_skew: each node stamps its GPU samples and events by its own clock, a fixed offset
  within +-3 s (to the ms); the BMS is 1-2 s off. Labels keep the true time.
A node whose fault needs load (faults.py: needs_load) is kept busy, as in the simple normal: it
computes and communicates with its job (a synchronous job moves in lockstep; the faults'
signatures hold in either phase), but its job takes no checkpoint while the fault lasts (a
stall would hide the fault while its label says it is there), and no fault is injected on a
node drained for maintenance nor maintenance on a node with a fault.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa

from pipeline.config import FleetConfig
from pipeline.faults import FAULTS_BY_NAME, MAINTENANCE_EVENTS, NORMAL_EVENTS
from pipeline.model import COOLANT_CP_J_PER_KG_K, EVENT, FACILITY_SAMPLE, FAULT_LABEL, GPU_SAMPLE, GPU_WORKLOAD
from pipeline.model import ClockEventReason as Reason
from pipeline.power.curve import PowerCurve, from_recording
from pipeline.waits import wait_set

IDLE_POWER_W = 71.0
NO_SIGNATURE_W = 2.0              # a frozen reading the truth never left by more than a whole-watt reading's step
                                  # and the idle sensor's noise hides nothing: a fault without a signature
NODE_BASE_POWER_W = 1500.0        # CPUs, NICs, fans, PSU losses of an idle node
NODE_LOAD_POWER_W = 1500.0        # extra at full utilisation
LIQUID_FRACTION = 0.8             # share of IT heat the coolant loop removes
NOMINAL_FLOW_LPM = 100.0
NOMINAL_DP_KPA = 150.0
COOLING_OVERHEAD = 0.12           # site meter: chillers, pumps, fans per W of IT
SITE_BASE_W = 20_000.0
# Steady state, fitted to the recorded trace: T = coolant_mean + K * P + C
GPU_K, GPU_C = 0.03943, 0.4
HBM_K, HBM_C = 0.02353, 3.53
TAU_FAST_S, TAU_SLOW_S = 0.2, 6.5
FAST_SHARE_GPU, FAST_SHARE_HBM = 0.6, 0.32
RETURN_TAU_S = 20.0
PHYSICS_STEP_S = 1.0              # the physics' longest step: a fleet scraped every 30 s is the fleet
                                  # read every 30th second, its energy counters counting every second
CAP_TAU_S = 0.1                   # a new power limit: settled (to 5%) within 0.3 s, as recorded
SLOWDOWN_C = 89.0                 # HW thermal slowdown threshold (the recorded H100's NVML threshold)
MEM_IDLE_B = 503_316_480
MEM_CLOCK_MHZ = 2619.0
# Per job, the compute-bound share of its time: most jobs are compute-bound (training, prefill);
# MEMORY_BOUND_SHARE of those that fill the power limit, and every job that does not
# (intensity < 1: memory- or I/O-bound), wait mostly on memory.
COMPUTE_BOUND_SENS = (0.8, 1.0)
MEMORY_BOUND_SENS = (0.1, 0.4)
MEMORY_BOUND_SHARE = 0.3
GPU_MODEL = "NVIDIA H100 80GB HBM3"  # the recorded H100's NVML name
DRIVER_VERSION = "580.159.04"        # and its driver
_HGX_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)  # an HGX H100 8-GPU board's PCI buses


def hgx_bus_id(index: int) -> str:
    """The PCI bus id of GPU `index` on an HGX H100 board (beyond 8 GPUs, the next domains)."""
    return f"{index // len(_HGX_BUSES):08X}:{_HGX_BUSES[index % len(_HGX_BUSES)]:02X}:00.0"
JOB_GROUP_NODES = 4

FACILITY_POINTS = ("supply_temp_c", "return_temp_c", "flow_lpm", "dp_kpa", "pump_on", "leak")
PDU_POINTS = ("power_w", "energy_j")


@dataclass
class ActiveFault:
    fault_id: int
    kind: str
    rack: int
    node: int | None       # fleet-wide node index
    gpu: int | None        # fleet-wide GPU index
    start_s: float
    end_s: float
    params: dict = field(default_factory=dict)
    started: bool = False  # its start effects (events, counter changes) have been applied


@dataclass
class Tick:
    """What one scrape of the whole fleet produced."""
    ts: datetime
    gpu: pa.RecordBatch
    facility: pa.RecordBatch
    events: pa.RecordBatch | None
    labels: pa.RecordBatch | None


class FleetSimulator:
    def __init__(self, cfg: FleetConfig, start: datetime | None = None, curve: PowerCurve | None = None,
                 phenomena: tuple[str, ...] | None = None, physics_step_s: float = PHYSICS_STEP_S) -> None:
        """`phenomena`: with the realistic normal (cfg.normal), only these of PHENOMENA (default:
        all of them), to see what each one does. `physics_step_s`: the physics' longest step (a
        benchmark that needs only rows of a slow scrape steps once per scrape: `float("inf")`)."""
        self.cfg = cfg
        self.curve = curve if curve is not None else from_recording()  # power -> throughput and SM clock
        self.rng = np.random.default_rng(cfg.seed)
        self.interval = cfg.sample_interval_s  # a scrape's
        self.substeps = max(1, math.ceil(self.interval / physics_step_s - 1e-9))
        self.dt = self.interval / self.substeps  # the physics'
        self.start = (start or datetime.now(timezone.utc)).astimezone(timezone.utc)
        self._start_ns = int(self.start.timestamp() * 1e9)
        self.t = 0.0  # simulated seconds since start
        self.scrapes = 0
        R, N, G = cfg.racks, cfg.nodes_per_rack, cfg.gpus_per_node
        self.n_racks, self.n_nodes, self.n_gpus = R, R * N, R * N * G
        self._pending_labels: list[ActiveFault] = []
        self.gpu_node = np.repeat(np.arange(self.n_nodes), G)
        self.gpu_index = np.tile(np.arange(G), self.n_nodes)
        self.node_rack = np.repeat(np.arange(R), N)
        self.gpu_rack = self.node_rack[self.gpu_node]
        self.rack_names = [f"r{r + 1:02d}" for r in range(R)]
        self.node_names = [f"{self.rack_names[self.node_rack[n]]}-n{n % N + 1:02d}" for n in range(self.n_nodes)]
        self.gpu_uuids = [f"GPU-{cfg.seed:08x}-{n:04x}-4000-8000-{g:012x}" for n, g in zip(self.gpu_node, self.gpu_index)]
        rng = self.rng
        # Per-GPU manufacturing spread: thermal interface and sensor offset.
        self.k_spread = rng.normal(1.0, 0.01, self.n_gpus)
        self.temp_offset = rng.normal(0.0, 0.7, self.n_gpus)
        self.power_spread = rng.normal(1.0, 0.02, self.n_gpus)
        # Thermal state (two lags each), counters.
        self.g_fast = np.zeros(self.n_gpus)
        self.g_slow = np.zeros(self.n_gpus)
        self.m_fast = np.zeros(self.n_gpus)
        self.m_slow = np.zeros(self.n_gpus)
        self.energy_j = rng.uniform(1e6, 5e7, self.n_gpus)
        self.pcie = np.zeros(self.n_gpus, np.int64)
        self.sbe = np.zeros(self.n_gpus, np.int64)
        self.dbe = np.zeros(self.n_gpus, np.int64)
        self.remap_c = np.zeros(self.n_gpus, np.int64)
        self.remap_u = np.zeros(self.n_gpus, np.int64)
        self.remap_pending = np.zeros(self.n_gpus, bool)
        self.remap_failure = np.zeros(self.n_gpus, bool)
        self.nvlink = np.zeros(self.n_gpus, np.int64)
        self.pcie_frac = np.zeros(self.n_gpus)
        self.nvlink_frac = np.zeros(self.n_gpus)
        self.last_power = np.full(self.n_gpus, IDLE_POWER_W)
        # Power caps: the limit set (what NVML reports) and the one the power controller has reached.
        self._cap_w = np.full(self.n_gpus, float(cfg.power_limit_w))
        self._limit_w = self._cap_w.copy()
        # Work in GPU-seconds of a fully loaded uncapped GPU: done, and what it would have been uncapped.
        self.work_done = np.zeros(self.n_gpus)
        self.work_uncapped = np.zeros(self.n_gpus)
        # Jobs run on groups of nodes.
        self.node_group = np.arange(self.n_nodes) // JOB_GROUP_NODES
        n_groups = int(self.node_group.max()) + 1
        # The job each group of nodes runs (its lead group's state): its own, unless the realistic
        # normal joins groups into training jobs spanning racks.
        self.job_of_group = np.arange(n_groups)
        self.gpu_job = self.node_group[self.gpu_node]
        self.group_busy = rng.random(n_groups) < 0.7
        self.group_until = rng.uniform(0, 1800, n_groups)
        self.group_intensity = self._draw_intensity(n_groups)
        self.group_mem = rng.uniform(55e9, 78e9, n_groups)
        # A separate stream: drawing sensitivities leaves the fleet's own draws (and an uncapped run) as they were.
        self.sens_rng = np.random.default_rng((cfg.seed, 15))
        self.group_sens = self._draw_sensitivity(self.group_intensity)
        # The hidden truth of the last tick, for the eval: each GPU's draw were no cap set, its work rate.
        self.power_uncapped = np.zeros(self.n_gpus)
        self.unreachable = np.zeros(self.n_gpus, bool)  # off the bus or resetting: no agent can cap it
        self.scrape_shed_j = 0.0  # the GPUs' energy the caps shed since the last scrape (a truth it misses)
        self._rate = np.zeros(self.n_gpus)
        # Facility state.
        self.return_temp = np.full(R, cfg.supply_temp_c + 4.0)
        self.pdu_energy = rng.uniform(1e9, 1e11, R)
        self.meter_energy = float(rng.uniform(1e12, 1e13))
        # Faults.
        self.faults: list[ActiveFault] = []
        self.hidden_w: dict[int, float] = {}  # per stuck sensor's fault: the furthest the truth went from its reading
        self.next_fault_id = 1
        self.next_fault_s = self._exp(cfg.fault_interval_s)
        self.next_reset_s = self._exp(cfg.gpu_reset_interval_s)
        self._fault_order: list[str] = []
        self.resetting = np.zeros(self.n_gpus, bool)
        self._node_index = {name: n for n, name in enumerate(self.node_names)}
        self.normal: RealisticNormal | None = None
        self._init_thermal_state()
        self._build_static_columns()
        # Last, from streams of its own: the simple normal's draws (and a simple run) stay as they were.
        if cfg.normal == "realistic":
            self.normal = RealisticNormal(self, phenomena)
            self._init_thermal_state()
        elif phenomena:
            raise ValueError(f"phenomena {phenomena} need the realistic normal (fleet.normal = \"realistic\")")

    # ---- setup ---------------------------------------------------------------

    def _exp(self, mean: float) -> float:
        return float(self.rng.exponential(mean)) if mean > 0 else float("inf")

    def _draw_intensity(self, n: int) -> np.ndarray:
        # Most jobs saturate the power cap; some are memory- or I/O-bound.
        return np.where(self.rng.random(n) < 0.85, 1.0, self.rng.uniform(0.35, 0.7, n))

    def _draw_sensitivity(self, intensity: np.ndarray) -> np.ndarray:
        r = self.sens_rng
        n = intensity.size
        memory = (intensity < 1.0) | (r.random(n) < MEMORY_BOUND_SHARE)
        return np.where(memory, r.uniform(*MEMORY_BOUND_SENS, n), r.uniform(*COMPUTE_BOUND_SENS, n))

    def keep(self, power_w, free_w=None, gpus=None) -> np.ndarray:
        """The share of its uncapped work each GPU's job keeps held to `power_w` (W) instead of
        `free_w` (its draw were no cap set; default: this tick's): the simulator's truth."""
        gpus = slice(None) if gpus is None else gpus
        free = self.power_uncapped[gpus] if free_w is None else np.asarray(free_w, np.float64)
        sens = self.group_sens[self.gpu_job][gpus]
        at_free = self.curve.at(free)
        r = np.where(at_free > 0, self.curve.at(np.minimum(power_w, free)) / np.where(at_free > 0, at_free, 1.0), 1.0)
        held = 1.0 / (sens / np.maximum(r, 1e-9) + 1.0 - sens)
        return np.where(r >= 1.0, 1.0, np.where(r > 0, held, 0.0))  # exactly 1 where the cap does not hold

    def work_rate(self, power_w) -> np.ndarray:
        """Each GPU's work per second (full-load GPU-seconds) held to `power_w`, this tick."""
        return self._rate * self.curve.at(self.power_uncapped) * self.keep(power_w)

    def _init_thermal_state(self) -> None:
        busy = self.group_busy[self.gpu_job] if self.normal is None else self.normal.load()[0]
        p = np.where(busy, self.cfg.power_limit_w, IDLE_POWER_W)
        coolant = self.cfg.supply_temp_c + 2.0
        self.g_fast[:] = self.g_slow[:] = coolant + GPU_K * p + GPU_C
        self.m_fast[:] = self.m_slow[:] = coolant + HBM_K * p + HBM_C

    def _build_static_columns(self) -> None:
        site = self.cfg.site
        self._gpu_static = {
            "site": pa.array([site] * self.n_gpus),
            "rack": pa.array([self.rack_names[r] for r in self.gpu_rack]),
            "node": pa.array([self.node_names[n] for n in self.gpu_node]),
            "gpu": pa.array(self.gpu_index.astype(np.int16)),
            "gpu_uuid": pa.array(self.gpu_uuids),
            "slowdown_temp_c": pa.array(np.full(self.n_gpus, SLOWDOWN_C)),
            # What each GPU is: the recorded H100's model and driver, an HGX board's bus ids, made-up serials.
            "model": pa.array([GPU_MODEL] * self.n_gpus),
            "pci_bus_id": pa.array([hgx_bus_id(int(g)) for g in self.gpu_index]),
            "driver_version": pa.array([DRIVER_VERSION] * self.n_gpus),
            "serial": pa.array([f"{1650000000000 + self.cfg.seed % 1000 * 100000 + s:013d}" for s in range(self.n_gpus)]),
            **{c: pa.nulls(self.n_gpus, pa.string()) for c in GPU_WORKLOAD},  # no Kubernetes here
        }
        devices, classes, racks, metrics = [], [], [], []
        for r, name in enumerate(self.rack_names):
            for m in FACILITY_POINTS:
                devices.append(f"cdu-{name}"), classes.append("cdu"), racks.append(name), metrics.append(m)
            for m in PDU_POINTS:
                devices.append(f"pdu-{name}"), classes.append("rack"), racks.append(name), metrics.append(m)
        for m in PDU_POINTS:
            devices.append("meter-main"), classes.append("meter"), racks.append(""), metrics.append(m)
        n = len(devices)
        self._fac_static = {
            "site": pa.array([site] * n), "rack": pa.array(racks),
            "device": pa.array(devices), "metric": pa.array(metrics),
            "quality": pa.array(np.ones(n, np.int8)), "device_class": pa.array(classes),
        }

    # ---- public --------------------------------------------------------------

    @property
    def now(self) -> datetime:
        return datetime.fromtimestamp(self._start_ns / 1e9 + self.t, timezone.utc)

    def step(self) -> Tick:
        """Advance one sample interval and return what the fleet reported (its last physics step)."""
        events: list[dict] = []
        labels = []
        self.scrape_shed_j = 0.0
        # Each step's time from the scrape's count, not summed (2.5 / 3 summed thrice passes 2.5, and
        # an event of one scrape would last two).
        scrape, self.scrapes = self.t, self.scrapes + 1
        for k in range(1, self.substeps + 1):
            t = self.scrapes * self.interval if k == self.substeps else scrape + k * self.dt
            if (new := self._schedule(t)) is not None:
                labels.append(new)
            self.t = t
            self._apply_fault_starts_and_ends(events)
            self._update_jobs()
            if self.normal is not None:
                self.normal.advance()
            emitted = self._physics(emit=k == self.substeps)
        gpu, facility = emitted
        labels = (labels[0] if len(labels) == 1 else pa.concat_batches(labels)) if labels else None
        ts = self.now
        if events and self.normal is not None:  # an event is stamped by its node's clock
            events = [{**e, "ts": self.normal.node_time(e["node"], ts)} for e in events]
        return Tick(ts=ts, gpu=gpu, facility=facility,
                    events=pa.RecordBatch.from_pylist([{"ts": ts, **e} for e in events], schema=EVENT) if events else None,
                    labels=labels)

    def node_racks(self) -> dict[str, str]:
        """Every node's rack, by name."""
        return {name: self.rack_names[self.node_rack[n]] for n, name in enumerate(self.node_names)}

    def inject(self, kind: str, rack: int | None = None, node: int | None = None, gpu: int | None = None,
               duration_s: float | None = None, params: dict | None = None) -> ActiveFault:
        """Start a fault with the next scrape (tests and demos name their target; the scheduler picks one)."""
        if kind not in FAULTS_BY_NAME and kind not in NORMAL_EVENTS:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join([*FAULTS_BY_NAME, *NORMAL_EVENTS])}")
        ftype = FAULTS_BY_NAME.get(kind)  # None for a normal event
        if gpu is not None:
            node = int(self.gpu_node[gpu])
        if node is not None:
            rack = int(self.node_rack[node])
        if rack is None:
            raise ValueError(f"fault {kind} needs a target")
        if duration_s is None:
            duration_s = float(self.rng.uniform(*ftype.duration_s)) if ftype else self.interval  # (one scrape)
        start = self.t + self.dt
        f = ActiveFault(self.next_fault_id, kind, rack, node, gpu, start, start + duration_s,
                        self._draw_params(kind) | (params or {}))
        self.next_fault_id += 1
        self.faults.append(f)
        self._pending_labels.append(f)
        return f

    @property
    def caps(self) -> np.ndarray:
        """Each GPU's power limit in W (cfg.power_limit_w where none is set), as NVML reports it."""
        return self._cap_w.copy()

    def set_caps(self, gpus, cap_w) -> None:
        """Cap GPUs `gpus` (indices in the simulator's GPU order) to `cap_w` W (one value, or one
        per GPU); NaN restores the default limit. A cap outside the GPU's limits raises
        ValueError and sets nothing, as NVML refuses an out-of-range limit."""
        gpus = np.atleast_1d(np.asarray(gpus))
        if gpus.size == 0:
            return
        if not np.issubdtype(gpus.dtype, np.integer):
            raise TypeError(f"GPU indices must be integers, not {gpus.dtype}")
        cap = np.broadcast_to(np.asarray(cap_w, np.float64), gpus.shape)
        bad_gpu = (gpus < 0) | (gpus >= self.n_gpus)
        if bad_gpu.any():
            raise ValueError(f"GPU index {int(gpus[bad_gpu][0])} out of range: the fleet has {self.n_gpus} GPUs")
        lo, hi = self.curve.min_limit_w, float(self.cfg.power_limit_w)
        bad = ~np.isnan(cap) & ~((cap >= lo) & (cap <= hi))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            g = int(gpus[i])
            raise ValueError(f"power cap {cap[i]:g} W for GPU {g} ({self.node_names[self.gpu_node[g]]} "
                             f"gpu {self.gpu_index[g]}, {self.gpu_uuids[g]}) outside its limits [{lo:g}, {hi:g}] W")
        self._cap_w[gpus] = np.where(np.isnan(cap), hi, cap)

    # ---- faults --------------------------------------------------------------

    def _draw_params(self, kind: str) -> dict:
        u = self.rng.uniform
        return {
            "thermal_runaway": lambda: {"rate_c_per_s": round(u(0.15, 0.4), 3)},
            "thermal_drift": lambda: {"rate_c_per_h": round(u(2.0, 6.0), 2)},
            "node_cooling_degraded": lambda: {"extra_c": round(u(8.0, 15.0), 1), "rate_c_per_s": round(u(0.05, 0.2), 3)},
            "rack_cooling_degraded": lambda: {"extra_c": round(u(6.0, 12.0), 1), "rate_c_per_s": round(u(0.05, 0.2), 3),
                                              "liquid_factor": round(u(0.55, 0.75), 3)},
            "coolant_flow_loss": lambda: {"flow_factor": round(u(0.2, 0.4), 3)},
            "coolant_leak": lambda: {"flow_factor": 0.9},
            "straggler_gpu": lambda: {"factor": round(u(0.65, 0.8), 3)},
            "hw_power_brake": lambda: {"power_w": round(u(200, 320), 1)},
            "pcie_replay_storm": lambda: {"rate_per_s": round(u(20, 200), 1)},
            "nvlink_crc_storm": lambda: {"rate_per_s": round(u(50, 500), 1)},
            "pdu_overload": lambda: {"load_ratio": round(u(1.0, 1.15), 3)},
            "ecc_uncorrectable": lambda: {"xid": int(self.rng.choice([94, 95])),
                                          "remap": "failure" if self.rng.random() < 0.3 else "pending"},
        }.get(kind, dict)()

    def _free_target(self, scope: str) -> tuple[int | None, int | None, int | None] | None:
        busy_racks = {f.rack for f in self.faults if f.node is None}
        busy_nodes = {f.node for f in self.faults if f.node is not None}
        if scope == "rack":
            free = [r for r in range(self.n_racks) if r not in busy_racks
                    and not any(self.node_rack[n] == r for n in busy_nodes)]
            return (int(self.rng.choice(free)), None, None) if free else None
        free_nodes = [n for n in range(self.n_nodes) if n not in busy_nodes and self.node_rack[n] not in busy_racks]
        if not free_nodes:
            return None
        node = int(self.rng.choice(free_nodes))
        if scope == "node":
            return None, node, None
        return None, None, int(node * self.cfg.gpus_per_node + self.rng.integers(self.cfg.gpus_per_node))

    def _schedule(self, now: float) -> pa.RecordBatch | None:
        while now >= self.next_fault_s:
            self.next_fault_s += self._exp(self.cfg.fault_interval_s)
            if not self.cfg.faults:
                break
            if not self._fault_order:  # every type once per round, in random order
                self._fault_order = list(self.rng.permutation(self.cfg.faults))
            kind = self._fault_order.pop()
            target = self._free_target(FAULTS_BY_NAME[kind].scope)
            if target is None:  # no free target now: it goes first next time
                self._fault_order.append(kind)
            else:
                self.inject(kind, *target)
        while now >= self.next_reset_s:
            self.next_reset_s += self._exp(self.cfg.gpu_reset_interval_s)
            target = self._free_target("gpu")
            if target is not None:
                self.inject("gpu_reset", gpu=target[2])
        if self.normal is not None:
            self.normal.schedule(now)
        if not self._pending_labels:
            return None
        rows = []
        for f in self._pending_labels:
            rows.append({
                "fault_id": f.fault_id, "fault_type": f.kind, "normal": f.kind in NORMAL_EVENTS,
                "site": self.cfg.site, "rack": self.rack_names[f.rack],
                "node": self.node_names[f.node] if f.node is not None else None,
                "gpu": int(self.gpu_index[f.gpu]) if f.gpu is not None else None,
                "start": self._at(f.start_s), "end": self._at(f.end_s),
                "params_json": json.dumps(f.params, sort_keys=True),
            })
        self._pending_labels = []
        return pa.RecordBatch.from_pylist(rows, schema=FAULT_LABEL)

    def without_signature(self) -> set[int]:
        """The faults so far that nothing could have told from healthy (ids): a stuck power
        sensor whose GPU's true draw never left the frozen reading by more than
        `NO_SIGNATURE_W` (an idle GPU that stayed put), so a healthy sensor would have read
        about the same."""
        return {fid for fid, w in self.hidden_w.items() if w <= NO_SIGNATURE_W}

    def _at(self, t_s: float) -> datetime:
        return datetime.fromtimestamp(self._start_ns / 1e9 + t_s, timezone.utc)

    def _event(self, f: ActiveFault, kind: str, code: int | None, text: str) -> dict:
        return {"site": self.cfg.site, "rack": self.rack_names[f.rack], "node": self.node_names[f.node],
                "gpu": int(self.gpu_index[f.gpu]), "gpu_uuid": self.gpu_uuids[f.gpu],
                "kind": kind, "code": code, "text": text}

    def _node_event(self, f: ActiveFault, kind: str, text: str) -> dict:
        return {"site": self.cfg.site, "rack": self.rack_names[f.rack], "node": self.node_names[f.node],
                "gpu": None, "gpu_uuid": None, "kind": kind, "code": None, "text": text}

    def _zero_counters(self, g: int) -> None:
        """A GPU reset zeroes the energy counter and the volatile error counters."""
        for arr in (self.energy_j, self.pcie, self.sbe, self.dbe, self.nvlink):
            arr[g] = 0
        self.remap_pending[g] = False

    def _apply_fault_starts_and_ends(self, events: list[dict]) -> None:
        for f in self.faults:
            if not f.started:
                f.started = True
                if f.kind == "gpu_fell_off_bus":
                    events.append(self._event(f, "xid", 79, "GPU has fallen off the bus"))
                elif f.kind == "ecc_uncorrectable":
                    g = f.gpu
                    self.dbe[g] += 1
                    self.remap_u[g] += 1
                    self.remap_pending[g] = f.params["remap"] == "pending"
                    self.remap_failure[g] = f.params["remap"] == "failure"
                    events.append(self._event(f, "xid", 48, "DBE (double bit error) ECC error"))
                    events.append(self._event(f, "xid", f.params["xid"],
                                              "contained ECC error" if f.params["xid"] == 94 else "uncontained ECC error"))
                    events.append(self._event(f, "xid", 63 if f.params["remap"] == "pending" else 64,
                                              "row remapping " + f.params["remap"]))
                elif f.kind == "stuck_power_sensor":
                    f.params["stuck_w"] = float(self.last_power[f.gpu])
                elif f.kind == "gpu_reset":
                    self._zero_counters(f.gpu)
                elif f.kind in MAINTENANCE_EVENTS:  # drained now, announced: down after drain_s for about down_s
                    p = f.params
                    what = (f"drained for a driver upgrade {p['driver_from']} -> {p['driver']}"
                            if f.kind == "driver_upgrade" else "drained for a rolling reboot")
                    events.append(self._node_event(f, f.kind, f"{what}: down in {p['drain_s']:.0f} s for about "
                                                              f"{p['down_s']:.0f} s"))
        ended = [f for f in self.faults if f.end_s <= self.t]
        for f in ended:
            if f.kind in ("gpu_fell_off_bus", "ecc_uncorrectable"):
                # Recovery means a GPU reset or node reboot: counters and remap state start over.
                self._zero_counters(f.gpu)
                self.remap_failure[f.gpu] = False
        self.faults = [f for f in self.faults if f.end_s > self.t]

    # ---- jobs ----------------------------------------------------------------

    def _update_jobs(self) -> None:
        forced = {int(self.job_of_group[self.node_group[f.node]]) for f in self.faults
                  if f.node is not None and f.kind in FAULTS_BY_NAME and FAULTS_BY_NAME[f.kind].needs_load}
        for g in forced:
            if not self.group_busy[g]:
                self.group_busy[g], self.group_intensity[g] = True, 1.0
            self.group_intensity[g] = 1.0
            self.group_until[g] = max(self.group_until[g], self.t + self.dt)
        due = np.flatnonzero(self.group_until <= self.t)
        if due.size == 0:
            return
        rng = self.rng
        self.group_busy[due] = ~self.group_busy[due]
        starting = due[self.group_busy[due]]
        self.group_intensity[starting] = self._draw_intensity(starting.size)
        self.group_mem[starting] = rng.uniform(55e9, 78e9, starting.size)
        drawn = self._draw_sensitivity(self.group_intensity[starting])
        # A service runs day and night (RealisticNormal): its group's churn starts no new job there,
        # and it keeps what a cap costs it (redrawn, its GPUs' job changed under their caps with no
        # idle moment and no new job name: nothing that tells the power loop of a new job).
        kept = self.normal.services[starting] if self.normal is not None else np.zeros(starting.size, bool)
        self.group_sens[starting] = np.where(kept, self.group_sens[starting], drawn)
        durations = np.where(self.group_busy[due],
                             np.clip(rng.exponential(2400, due.size), 300, 4 * 3600),
                             np.clip(rng.exponential(480, due.size), 60, 3600))
        self.group_until[due] = self.t + durations

    # ---- physics -------------------------------------------------------------

    def _fault_effects(self) -> dict[str, np.ndarray]:
        G, N, R = self.n_gpus, self.n_nodes, self.n_racks
        fx = {
            "missing": np.zeros(G, bool), "extra_temp": np.zeros(G), "perf": np.ones(G),
            "stuck": np.full(G, np.nan), "pcie_rate": np.zeros(G), "nvlink_rate": np.zeros(G),
            "brake_w": np.full(N, np.nan), "flow": np.ones(R), "leak": np.zeros(R), "pdu_ratio": np.zeros(R),
            "liquid": np.ones(R),
        }
        for f in self.faults:
            age = self.t - f.start_s
            p = f.params
            match f.kind:
                case "gpu_fell_off_bus":
                    fx["missing"][f.gpu] = True
                case "gpu_reset":
                    fx["missing"][f.gpu] = True  # one scrape lost while the GPU resets
                case "thermal_runaway":
                    fx["extra_temp"][f.gpu] += min(40.0, p["rate_c_per_s"] * age)
                case "thermal_drift":
                    fx["extra_temp"][f.gpu] += p["rate_c_per_h"] * age / 3600
                case "node_cooling_degraded":
                    fx["extra_temp"][self.gpu_node == f.node] += min(p["extra_c"], p["rate_c_per_s"] * age)
                case "rack_cooling_degraded":  # less heat reaches the coolant; the GPUs keep the rest
                    ramp = min(p["extra_c"], p["rate_c_per_s"] * age)
                    fx["extra_temp"][self.gpu_rack == f.rack] += ramp
                    fx["liquid"][f.rack] *= 1.0 - (1.0 - p["liquid_factor"]) * ramp / p["extra_c"]
                case "straggler_gpu":
                    fx["perf"][f.gpu] = p["factor"]
                case "stuck_power_sensor":
                    fx["stuck"][f.gpu] = p["stuck_w"]
                case "pcie_replay_storm":
                    fx["pcie_rate"][f.gpu] = p["rate_per_s"]
                case "nvlink_crc_storm":
                    fx["nvlink_rate"][f.gpu] = p["rate_per_s"]
                case "hw_power_brake":
                    fx["brake_w"][f.node] = p["power_w"]
                case "coolant_flow_loss" | "coolant_leak":
                    fx["flow"][f.rack] = p["flow_factor"]
                    fx["leak"][f.rack] = 1.0 if f.kind == "coolant_leak" else 0.0
                case "pdu_overload":
                    fx["pdu_ratio"][f.rack] = p["load_ratio"]
                case kind if kind in MAINTENANCE_EVENTS:  # drained (RealisticNormal.load), then down
                    if p["drain_s"] <= age < p["drain_s"] + p["down_s"]:
                        fx["missing"][self.gpu_node == f.node] = True
        return fx

    def _physics(self, emit: bool = True) -> tuple[pa.RecordBatch, pa.RecordBatch] | None:
        cfg, rng, dt = self.cfg, self.rng, self.dt
        G = self.n_gpus
        fx = self._fault_effects()
        nm = self.normal
        if nm is None:
            busy = self.group_busy[self.gpu_job]
            intensity = self.group_intensity[self.gpu_job]
        else:
            busy, intensity = nm.load()
        limit = cfg.power_limit_w

        # Power and clocks.
        demand = IDLE_POWER_W + intensity * 800.0 * self.power_spread
        capped = busy & (demand >= limit)
        drawn = demand * rng.normal(1.0, 0.004, G)
        below = np.abs(rng.normal(1.5, 1.0, G))  # how far under its limit a GPU holds (the same draws as ever)
        power = np.where(busy, np.minimum(drawn, limit - below), IDLE_POWER_W + rng.normal(0.0, 0.3, G))
        sm = np.where(capped, 1380.0 + 15.0 * rng.integers(-2, 3, G), np.where(busy, 1980.0, 345.0))
        reasons = np.where(capped, int(Reason.SW_POWER_CAP),
                           np.where(busy, 0, int(Reason.GPU_IDLE))).astype(np.int64)
        if nm is not None:  # training jobs' communication phases and checkpoint stalls; faults come after
            power, sm, reasons, capped = nm.phases(busy, power, sm, reasons, capped)
        perf = fx["perf"]
        slow = busy & (perf < 1.0)
        power = np.where(slow, power * perf, power)
        sm = np.where(slow, np.round(sm * (perf - 0.05) / 15.0) * 15.0, sm)
        reasons = np.where(slow, 0, reasons)
        brake_w = fx["brake_w"][self.gpu_node]
        braked = ~np.isnan(brake_w) & busy
        power = np.where(braked, brake_w * rng.normal(1.0, 0.01, G), power)
        sm = np.where(braked, 600.0 + 15.0 * rng.integers(-3, 4, G), sm)
        reasons = np.where(braked, reasons & ~int(Reason.SW_POWER_CAP)
                           | int(Reason.HW_POWER_BRAKE_SLOWDOWN | Reason.HW_SLOWDOWN), reasons)
        # HW thermal slowdown: a GPU at its slowdown temperature halves its clocks.
        hot = self.g_fast + self.g_slow >= 2 * SLOWDOWN_C
        power = np.where(hot & busy, power * 0.6, power)
        sm = np.where(hot & busy, np.round(sm * 0.5 / 15.0) * 15.0, sm)
        reasons = np.where(hot, reasons | int(Reason.HW_THERMAL_SLOWDOWN | Reason.HW_SLOWDOWN), reasons)
        # A cap below the default limit holds whatever the GPU would draw at the default (faults
        # included) under it: the power controller's limit settles towards the cap first order.
        # Only GPUs under such a cap change, so an uncapped fleet is bit-identical to one without caps.
        self._limit_w += (self._cap_w - self._limit_w) * (1.0 - np.exp(-dt / CAP_TAU_S))
        settled = np.abs(self._cap_w - self._limit_w) < 1e-3  # within NVML's mW: reached
        self._limit_w[settled] = self._cap_w[settled]
        free_power = power
        held = busy & (self._limit_w < limit) & (power > self._limit_w - below)
        any_held = bool(held.any())
        if any_held:
            power = np.where(held, self._limit_w - below, power)
            # A straggler is less efficient at any power: held, it keeps its own clock's share of
            # what the curve loses between its draw and its cap (a healthy GPU runs the curve's clock).
            clock = self.curve.clock_at(power)
            with np.errstate(invalid="ignore", divide="ignore"):
                own = np.round(sm * clock / self.curve.clock_at(free_power) / 15.0) * 15.0
            sm = np.where(held, np.where(slow, np.minimum(sm, own), np.minimum(sm, clock)), sm)
            reasons = np.where(held, reasons | int(Reason.SW_POWER_CAP), reasons)
        # Work: a busy GPU's job does `intensity` of a full-load GPU's work at the default limit,
        # scaled by the curve between that nominal power and the power it holds (faults lower both).
        working = busy & ~fx["missing"]
        rate = np.where(working, intensity / self.curve.at(np.minimum(demand, limit)), 0.0)
        self._rate, self.power_uncapped = rate, free_power
        self.unreachable = fx["missing"]
        rate = rate * dt
        work_free = rate * self.curve.at(free_power)
        self.work_uncapped += work_free
        kept = self.keep(power) if any_held else None  # the job's sensitivity: what the cap costs it
        self.work_done += work_free * kept if any_held else work_free
        self.last_power = power
        self.scrape_shed_j += float(np.sum(np.maximum(free_power - power, 0.0))) * dt  # what caps shed, every step

        # Rack power and coolant.
        util = np.where(busy, np.where(capped | braked | slow, rng.uniform(0.99, 1.0, G), intensity), 0.0)
        if nm is not None and nm.stalled is not None:
            util = np.where(nm.stalled, 0.0, util)
        util_mem = np.where(busy, util * 0.34 * (kept if any_held else 1.0), 0.0)
        read_power, read_util, read_util_mem = (power, util, util_mem) if nm is None else nm.averaged(
            busy, power, util, util_mem)
        node_power = (np.bincount(self.gpu_node, power, self.n_nodes)
                      + NODE_BASE_POWER_W + NODE_LOAD_POWER_W * np.bincount(self.gpu_node, util, self.n_nodes) / cfg.gpus_per_node)
        rack_it = np.bincount(self.node_rack, node_power, self.n_racks)
        flow = NOMINAL_FLOW_LPM * fx["flow"] * rng.normal(1.0, 0.005, self.n_racks)
        delta_t = LIQUID_FRACTION * fx["liquid"] * rack_it / (flow / 60.0 * COOLANT_CP_J_PER_KG_K)
        supply = cfg.supply_temp_c + rng.normal(0.0, 0.05, self.n_racks)
        a_ret = 1.0 - np.exp(-dt / RETURN_TAU_S)
        self.return_temp += (cfg.supply_temp_c + delta_t - self.return_temp) * a_ret
        coolant_mean = 0.5 * (cfg.supply_temp_c + self.return_temp)

        # Temperatures: two first-order lags towards the steady state.
        base = coolant_mean[self.gpu_rack] + self.temp_offset + fx["extra_temp"]
        k_spread = self.k_spread if self.normal is None else self.k_spread * self.normal.k_spread
        g_target = base + GPU_K * k_spread * power + GPU_C
        m_target = base + HBM_K * k_spread * power + HBM_C
        af, asl = 1.0 - np.exp(-dt / TAU_FAST_S), 1.0 - np.exp(-dt / TAU_SLOW_S)
        self.g_fast += (g_target - self.g_fast) * af
        self.g_slow += (g_target - self.g_slow) * asl
        self.m_fast += (m_target - self.m_fast) * af
        self.m_slow += (m_target - self.m_slow) * asl
        gpu_temp = np.round(FAST_SHARE_GPU * self.g_fast + (1 - FAST_SHARE_GPU) * self.g_slow)
        mem_temp = np.round(FAST_SHARE_HBM * self.m_fast + (1 - FAST_SHARE_HBM) * self.m_slow)

        # Counters.
        self.energy_j += power * dt
        self.pcie_frac += fx["pcie_rate"] * dt + (rng.random(G) < 1e-5)
        self.nvlink_frac += fx["nvlink_rate"] * dt + (rng.random(G) < 1e-5)
        for frac, counter in ((self.pcie_frac, self.pcie), (self.nvlink_frac, self.nvlink)):
            whole = np.floor(frac)
            counter += whole.astype(np.int64)
            frac -= whole
        self.sbe += rng.random(G) < 2e-6

        reported_power = np.where(np.isnan(fx["stuck"]), np.round(read_power, 3), fx["stuck"])
        # The racks' and the site's power, their energy counters: every step; the rest only when scraped.
        pdu_power = np.maximum(rack_it, fx["pdu_ratio"] * cfg.pdu_rating_w) * rng.normal(1.0, 0.002, self.n_racks)
        self.pdu_energy += pdu_power * dt
        site_power = pdu_power.sum() * (1.0 + COOLING_OVERHEAD) + SITE_BASE_W
        self.meter_energy += site_power * dt
        if not emit:
            return None
        for f in self.faults:  # (a few at a time; what a scrape would have shown: its signature)
            if f.kind == "stuck_power_sensor":
                gone = abs(float(power[f.gpu]) - f.params["stuck_w"])
                self.hidden_w[f.fault_id] = max(self.hidden_w.get(f.fault_id, 0.0), gone)
        mem_used = np.where(busy, self.group_mem[self.gpu_job], MEM_IDLE_B).astype(np.int64)
        cols = dict(self._gpu_static)
        ts_ns = self._start_ns + int(round(self.t * 1e9))
        if nm is None:
            gpu_ts = np.full(G, ts_ns, "datetime64[ns]")
        else:
            gpu_ts = nm.gpu_ts(ts_ns)
            reported_power = nm.gpu_power(reported_power)
            cols["driver_version"] = nm.driver_column()
        cols.update({
            "ts": pa.array(gpu_ts, GPU_SAMPLE.field("ts").type),
            "power_w": reported_power, "energy_j": np.round(self.energy_j, 3), "gpu_temp_c": gpu_temp,
            "mem_temp_c": mem_temp, "sm_clock_mhz": sm, "mem_clock_mhz": np.full(G, MEM_CLOCK_MHZ),
            "util_gpu": np.round(read_util, 2), "util_mem": np.round(read_util_mem, 2),
            "mem_used_bytes": mem_used, "clock_event_reasons": reasons, "pstate": np.zeros(G, np.int16),
            "pcie_replay_total": self.pcie.copy(), "ecc_sbe_volatile_total": self.sbe.copy(),
            "ecc_dbe_volatile_total": self.dbe.copy(), "remapped_rows_correctable": self.remap_c.copy(),
            "remapped_rows_uncorrectable": self.remap_u.copy(), "remapped_rows_pending": self.remap_pending.copy(),
            "remapped_rows_failure": self.remap_failure.copy(), "nvlink_crc_errors_total": self.nvlink.copy(),
            "power_limit_w": self._cap_w.copy(),
        })
        gpu = pa.RecordBatch.from_pydict({f.name: cols[f.name] for f in GPU_SAMPLE}, schema=GPU_SAMPLE)
        missing = fx["missing"] if nm is None else nm.dropped(fx["missing"])
        if missing.any():
            gpu = gpu.filter(pa.array(~missing))

        # Facility: CDU points and PDU per rack, then the site meter.
        dp = NOMINAL_DP_KPA * (flow / NOMINAL_FLOW_LPM) ** 2
        if nm is None:
            per_rack = np.column_stack([
                supply, self.return_temp, flow, dp, np.ones(self.n_racks), fx["leak"], pdu_power, self.pdu_energy,
            ])
            values = np.concatenate([np.round(per_rack, 3).ravel(), [round(site_power, 1), round(self.meter_energy, 1)]])
            fac_ts, kept_points = np.full(values.size, ts_ns, "datetime64[ns]"), None
        else:
            values, fac_ts, kept_points = nm.facility(ts_ns, supply, flow, dp, fx["leak"], pdu_power, site_power)
        fcols = dict(self._fac_static)
        fcols["ts"] = pa.array(fac_ts, FACILITY_SAMPLE.field("ts").type)
        fcols["value"] = values
        facility = pa.RecordBatch.from_pydict({f.name: fcols[f.name] for f in FACILITY_SAMPLE}, schema=FACILITY_SAMPLE)
        if kept_points is not None and not kept_points.all():
            facility = facility.filter(pa.array(kept_points))
        return gpu, facility


# ---- the realistic normal ------------------------------------------------------
# What a real fleet does when nothing is wrong (module docstring: where each number comes from).
PHENOMENA = ("diurnal", "training", "checkpoints", "reboots", "noise", "quantization", "dropouts",
             "recalibration", "clock_skew", "power_quantization", "thermal_spread", "averaged_readings")
INFERENCE_SHARE = 0.25                # job groups that serve inference
TRAINING_JOB_GROUPS = (2, 4)          # a training job spans 2-4 groups of 4 nodes: 8-16 nodes, 1-2 racks
STEP_PERIOD_S = (15.0, 45.0)          # a training job's compute + communication cycle
STEP_JITTER = 0.03                    # step to step, relative
COMM_SHARE = (0.2, 0.35)              # share of the cycle spent communicating
COMM_POWER_W = (300.0, 450.0)         # a GPU's draw while its job communicates
AVERAGED_S = 1.0                      # NVML's power and utilisation: means over the last second
CHECKPOINT_EVERY_S = (20 * 60.0, 60 * 60.0)
CHECKPOINT_STALL_S = (30.0, 90.0)
CHECKPOINT_POWER_W = (90.0, 10.0)     # a stalled GPU: mean and sd (memory held, no kernels)
MAX_SM_MHZ = 1980.0
IDLE_SM_MHZ = 345.0
DIURNAL_TROUGH_H = 4.0                # local (= UTC) hour of the least inference load; the peak is 12 h later
INFERENCE_LOW = (0.15, 0.3)           # a service's utilisation at the trough
INFERENCE_HIGH = (0.6, 0.9)           # and at the peak
INFERENCE_BURST = (0.08, 300.0)       # minutes-scale load bursts: relative sd and time constant (s)
INFERENCE_GPU_SD = 0.04               # per GPU and sample (batching)
REBOOT_EVERY_NODE_S = 12 * 3600.0     # each node drained and rebooted about twice a day (a maintenance campaign)
REBOOT_BATCH = (1, 3)                 # nodes of one rack at a time
REBOOT_DRAIN_S = (30.0, 90.0)         # announced and drained, still reporting
REBOOT_DOWN_S = (120.0, 300.0)        # silent
REBOOT_HOLD_S = (60.0, 180.0)         # back, idle, before it takes jobs again
UPGRADE_SHARE = 0.5                   # batches that upgrade the driver (of the nodes still on the old one)
NEW_DRIVER_VERSION = "580.173.02"     # made up: a later release of the same branch
GPU_DROPOUT = 1e-3                    # a GPU's row missing from a scrape
NODE_DROPOUT = 2e-4                   # a whole node's scrape missing
POINT_DROPOUT = 1e-3                  # one facility reading missing
TEMP_NOISE_C = 0.03                   # facility temperature sensors (on top of the supply's control noise)
DP_NOISE_KPA = 0.4
RACK_QUANTA = np.array([0.1, 0.1, 0.5, 1.0, 1.0, 1.0, 1.0, 3600.0])  # supply, return C; flow L/min; dp kPa;
# pump, leak; PDU W; PDU energy J (1 Wh). The site meter: 100 W and 1 Wh.
METER_QUANTA = (100.0, 3600.0)
CALIBRATION_SD_C = 0.1                # each temperature sensor's offset at the start
RECALIBRATION_EVERY_S = 24 * 3600.0   # per sensor
RECALIBRATION_STEP_C = (0.2, 0.5)
THERMAL_SPREAD = 0.05                 # sd of a GPU's temperature rise per watt against its model's
CLOCK_SKEW_S = 3.0                    # each node's clock: a fixed offset within +-3 s
BMS_SKEW_S = (1.0, 2.0)               # the BMS's clock, either way


class RealisticNormal:
    """The realistic normal of a FleetSimulator (fleet.normal = "realistic"): job structure,
    phases, maintenance and how sensors and clocks report. Each phenomenon draws from its
    own generator (seed, 16, i), the job structure from (seed, 16): the simulator's own draws
    are those of the simple normal, and turning one phenomenon off changes no other."""

    def __init__(self, sim: FleetSimulator, phenomena: tuple[str, ...] | None = None) -> None:
        on = PHENOMENA if phenomena is None else tuple(phenomena)
        unknown = set(on) - set(PHENOMENA)
        if unknown:
            raise ValueError(f"unknown phenomena {sorted(unknown)}; known: {', '.join(PHENOMENA)}")
        self.sim, self.on = sim, frozenset(on)
        seed = sim.cfg.seed
        self.rngs = {name: np.random.default_rng((seed, 16, i + 1)) for i, name in enumerate(PHENOMENA)}
        G, N, R = sim.n_gpus, sim.n_nodes, sim.n_racks
        n = sim.group_busy.size
        # Jobs: inference services on single groups, training jobs on runs of 2-4 neighbouring groups.
        jobs = np.random.default_rng((seed, 16))
        self.inference = jobs.random(n) < INFERENCE_SHARE
        if n >= 3 and not self.inference.any():
            self.inference[jobs.integers(n)] = True
        job = np.arange(n)
        g = 0
        while g < n:
            if self.inference[g]:
                g += 1
                continue
            size, h = int(jobs.integers(TRAINING_JOB_GROUPS[0], TRAINING_JOB_GROUPS[1] + 1)), g + 1
            while h < n and h - g < size and not self.inference[h]:
                h += 1
            job[g:h] = g
            g = h
        sim.job_of_group = job
        sim.gpu_job = job[sim.node_group][sim.gpu_node]
        self.lead = (job == np.arange(n)) & ~self.inference      # training jobs, by their lead group
        self.gpu_training = ~self.inference[sim.node_group][sim.gpu_node]
        self.services = self.inference if "diurnal" in self.on else np.zeros(n, bool)  # groups serving day and night
        self.gpu_inference = self.services[sim.node_group][sim.gpu_node]
        self._was_busy = sim.group_busy.copy()
        # Training jobs' steps and checkpoints (per lead group).
        r, c = self.rngs["training"], self.rngs["checkpoints"]
        self.period, self.comm_share = r.uniform(*STEP_PERIOD_S, n), r.uniform(*COMM_SHARE, n)
        self.comm_w, self.phase = r.uniform(*COMM_POWER_W, n), r.random(n)
        self.comm = np.zeros(n, bool)
        # Averaged readings: when each job last changed phase (s), and what its GPUs read before.
        self.averaging = "averaged_readings" in self.on and "training" in self.on
        self._phase_changed = np.zeros(n, bool)
        self._changed_at = np.full(n, -np.inf)
        self._instant: tuple | None = None  # the last physics step's (power, util_gpu, util_mem)
        self._before: tuple | None = None   # ... the last one before its job's phase changed
        self.ckpt_next = c.random(n) * c.uniform(*CHECKPOINT_EVERY_S, n)  # running jobs: part-way to their next
        self.stall_until = np.full(n, -np.inf)
        # Inference services' levels and bursts.
        d = self.rngs["diurnal"]
        self.inf_low, self.inf_high, self.burst = d.uniform(*INFERENCE_LOW, n), d.uniform(*INFERENCE_HIGH, n), np.ones(n)
        # Per tick: nodes drained for maintenance, nodes a fault keeps at a steady full load.
        self.drained, self.held = np.zeros(N, bool), np.zeros(N, bool)
        self.stalled: np.ndarray | None = None
        self._gpu_noise = self._comm_noise = self._stall_w = None
        # Maintenance.
        self.next_maint = (float(self.rngs["reboots"].exponential(self._maint_mean()))
                           if "reboots" in self.on else float("inf"))
        self.upgraded = np.zeros(N, bool)
        self._up: set[int] = set()
        self._driver = None
        # Facility sensors: calibration offsets (supply, then return, per rack) and their steps.
        k = self.rngs["recalibration"]
        self.offset = np.zeros((2, R))
        self.next_recal = np.full((2, R), np.inf)
        if "recalibration" in self.on:
            self.offset = k.normal(0.0, CALIBRATION_SD_C, (2, R))
            self.next_recal = k.exponential(RECALIBRATION_EVERY_S, (2, R))
        # Each GPU's rise per watt (its cold plate's contact, its place in the coolant path).
        self.k_spread = (self.rngs["thermal_spread"].normal(1.0, THERMAL_SPREAD, G) if "thermal_spread" in self.on
                         else np.ones(G))
        # Clocks.
        s = self.rngs["clock_skew"]
        skew = np.round(s.uniform(-CLOCK_SKEW_S, CLOCK_SKEW_S, N), 3)  # ms: timestamps stay datetime-exact
        bms = round(float(s.choice([-1.0, 1.0]) * s.uniform(*BMS_SKEW_S)), 3)
        if "clock_skew" not in self.on:
            skew, bms = np.zeros(N), 0.0
        self.node_skew_s, self.bms_skew_s = skew, bms
        self._gpu_skew_ns = np.round(skew[sim.gpu_node] * 1e9).astype(np.int64)
        self._bms_skew_ns = int(round(bms * 1e9))

    def _maint_mean(self) -> float:
        return REBOOT_EVERY_NODE_S * (REBOOT_BATCH[0] + REBOOT_BATCH[1]) / 2 / self.sim.n_nodes

    # ---- per tick ----------------------------------------------------------------

    def advance(self) -> None:
        """Move the phases on one sample interval (after the jobs' churn, before the physics)."""
        sim, on = self.sim, self.on
        t, dt, n, G = sim.t, sim.dt, self.period.size, sim.n_gpus
        self.drained[:] = False
        self.held[:] = False
        for f in sim.faults:
            if f.node is None:
                continue
            if f.kind in MAINTENANCE_EVENTS:
                self.drained[f.node] = True
                if f.fault_id not in self._up and sim.t >= f.start_s + f.params["drain_s"] + f.params["down_s"]:
                    self._back(f)
            elif f.kind in FAULTS_BY_NAME and FAULTS_BY_NAME[f.kind].needs_load:
                self.held[f.node] = True  # the fault shows under load: its node is kept busy
        self._up &= {f.fault_id for f in sim.faults}
        # A job with such a node takes no checkpoint while the fault lasts (one in progress ends).
        held_job = np.zeros(n, bool)
        held_job[sim.job_of_group[sim.node_group[self.held]]] = True
        busy = sim.group_busy
        started = self.lead & busy & ~self._was_busy
        self._was_busy = busy.copy()
        running = self.lead & busy
        if "training" in on:
            r = self.rngs["training"]
            if started.any():  # a new job: its own step
                k = int(started.sum())
                self.period[started], self.comm_share[started] = r.uniform(*STEP_PERIOD_S, k), r.uniform(*COMM_SHARE, k)
                self.comm_w[started], self.phase[started] = r.uniform(*COMM_POWER_W, k), r.random(k)
            step = dt / self.period * (1.0 + r.normal(0.0, STEP_JITTER, n))
            moving = self.stall_until <= t
            self.phase = np.where(moving, (self.phase + step) % 1.0, self.phase)
            comm = self.phase < self.comm_share
            # When the phase changed, between two steps: (its distance past the boundary) / (its speed).
            self._phase_changed = (comm != self.comm) & moving & ~started
            past = (self.phase - np.where(comm, 0.0, self.comm_share)) % 1.0
            self._changed_at = np.where(self._phase_changed, t - past * dt / step, self._changed_at)
            self._changed_at[started | ~moving] = -np.inf  # (a job's start, a checkpoint: on a step)
            self.comm = comm
            self._comm_noise = r.normal(1.0, 0.02, G)
        if "checkpoints" in on:
            c = self.rngs["checkpoints"]
            if started.any():
                self.ckpt_next[started] = t + c.uniform(*CHECKPOINT_EVERY_S, int(started.sum()))
                self.stall_until[started] = -np.inf
            self.stall_until[held_job] = np.minimum(self.stall_until[held_job], t)
            due = running & ~held_job & (t >= self.ckpt_next) & (self.stall_until <= t)
            if due.any():
                k = int(due.sum())
                self.stall_until[due] = t + c.uniform(*CHECKPOINT_STALL_S, k)
                self.ckpt_next[due] = self.stall_until[due] + c.uniform(*CHECKPOINT_EVERY_S, k)
            self._stall_w = c.normal(*CHECKPOINT_POWER_W, G)
        if "diurnal" in on:
            d = self.rngs["diurnal"]
            sd, tau = INFERENCE_BURST
            a = float(np.exp(-dt / tau))
            self.burst = 1.0 + (self.burst - 1.0) * a + d.normal(0.0, sd * np.sqrt(1.0 - a * a), n)
            self._gpu_noise = d.normal(0.0, INFERENCE_GPU_SD, G)
        if "recalibration" in on:
            due = t >= self.next_recal
            if due.any():  # a technician's recalibration, a swapped sensor: the offset steps, and stays
                k = self.rngs["recalibration"]
                m = int(due.sum())
                self.offset[due] += k.choice([-1.0, 1.0], m) * k.uniform(*RECALIBRATION_STEP_C, m)
                self.next_recal[due] += k.exponential(RECALIBRATION_EVERY_S, m)

    def _back(self, f: ActiveFault) -> None:
        """A node back from its reboot: the driver loaded anew (its counters start over), the new
        one after an upgrade."""
        sim = self.sim
        self._up.add(f.fault_id)
        for g in np.flatnonzero(sim.gpu_node == f.node):
            sim._zero_counters(int(g))
        if f.kind == "driver_upgrade":
            self.upgraded[f.node] = True
            self._driver = None

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """Each GPU's job: busy, and its intensity (the share of the power range it uses)."""
        sim = self.sim
        job = sim.gpu_job
        busy, intensity = sim.group_busy[job], sim.group_intensity[job]
        if self._gpu_noise is not None and self.gpu_inference.any():  # services run day and night
            hour = ((sim._start_ns / 1e9 + sim.t) / 3600.0) % 24.0
            day = 0.5 - 0.5 * np.cos(2 * np.pi * (hour - DIURNAL_TROUGH_H) / 24.0)
            level = (self.inf_low + (self.inf_high - self.inf_low) * day) * self.burst
            inf = self.gpu_inference
            busy = busy | inf
            intensity = np.where(inf, np.clip(level[job] + self._gpu_noise, 0.05, 1.0), intensity)
        held, drained = self.held[sim.gpu_node], self.drained[sim.gpu_node]
        return (busy | held) & ~drained, np.where(held, 1.0, intensity)

    def phases(self, busy, power, sm, reasons, capped):
        """Training jobs in lockstep: near the power limit while they compute, 300-450 W while they
        communicate (a node with a fault too: the faults that need load still show), near idle
        while they checkpoint."""
        sim = self.sim
        job = sim.gpu_job
        train = busy & self.gpu_training
        stall = None
        if self._stall_w is not None:
            stall = train & (self.stall_until > sim.t)[job]
            if stall.any():
                power = np.where(stall, np.maximum(self._stall_w, IDLE_POWER_W), power)
                sm = np.where(stall, IDLE_SM_MHZ, sm)
                reasons = np.where(stall, int(Reason.GPU_IDLE), reasons)
                capped = capped & ~stall
            else:
                stall = None
        self.stalled = stall
        if self._comm_noise is not None:
            comm = train & self.comm[job]
            if stall is not None:
                comm &= ~stall
            power = np.where(comm, np.minimum(self.comm_w[job] * self._comm_noise, power), power)
            sm = np.where(comm, MAX_SM_MHZ, sm)
            reasons = np.where(comm, 0, reasons)
            capped = capped & ~comm
        return power, sm, reasons, capped

    # ---- what is reported ----------------------------------------------------------

    def averaged(self, busy: np.ndarray, *instant: np.ndarray) -> tuple[np.ndarray, ...]:
        """What NVML reports of these instants (power, utilisations): means over the last
        AVERAGED_S, so a reading just after a training job's phase changed blends both phases,
        while its clocks and clock event reasons are the instant's. Phases change at any time,
        not on the physics' steps: the first reading of compute under a cap has reason 0x4 and
        part of the communication's draw and memory traffic, as a real GPU's does.
        Each physics step, for any scrape (a 30-s scrape reads the last second only)."""
        if not self.averaging:
            return instant
        sim = self.sim
        changed = self._phase_changed[sim.gpu_job]
        if self._instant is None:
            self._instant = self._before = instant
        self._before = tuple(np.where(changed, last, kept) for last, kept in zip(self._instant, self._before))
        self._instant = instant
        share = np.clip(1.0 - (sim.t - self._changed_at[sim.gpu_job]) / AVERAGED_S, 0.0, 1.0)  # (before it)
        share = np.where(busy & self.gpu_training & (self.stalled is None or ~self.stalled), share, 0.0)
        if not share.any():
            return instant
        return tuple(share * before + (1.0 - share) * now for before, now in zip(self._before, instant))

    def gpu_ts(self, ts_ns: int) -> np.ndarray:
        return (ts_ns + self._gpu_skew_ns).astype("datetime64[ns]")

    def node_time(self, node: str, ts: datetime) -> datetime:
        return ts + timedelta(seconds=float(self.node_skew_s[self.sim._node_index[node]]))

    def gpu_power(self, reported: np.ndarray) -> np.ndarray:
        return np.round(reported) if "power_quantization" in self.on else reported  # 1 W

    def driver_column(self) -> pa.Array:
        if self._driver is None:
            versions = np.where(self.upgraded[self.sim.gpu_node], NEW_DRIVER_VERSION, DRIVER_VERSION)
            self._driver = pa.array(versions.tolist(), pa.string())
        return self._driver

    def dropped(self, missing: np.ndarray) -> np.ndarray:
        if "dropouts" not in self.on:
            return missing
        r = self.rngs["dropouts"]
        return missing | (r.random(missing.size) < GPU_DROPOUT) | (r.random(self.sim.n_nodes) < NODE_DROPOUT)[self.sim.gpu_node]

    def facility(self, ts_ns: int, supply, flow, dp, leak, pdu_power, site_power):
        """The BMS's readings: calibration offsets, sensor noise, its resolution, its clock, and a
        reading missing now and then."""
        sim, on = self.sim, self.on
        R = sim.n_racks
        ret = sim.return_temp + self.offset[1]
        supply = supply + self.offset[0]
        if "noise" in on:
            z = self.rngs["noise"]
            supply, ret = supply + z.normal(0.0, TEMP_NOISE_C, R), ret + z.normal(0.0, TEMP_NOISE_C, R)
            dp = dp + z.normal(0.0, DP_NOISE_KPA, R)
        per_rack = np.column_stack([supply, ret, flow, dp, np.ones(R), leak, pdu_power, sim.pdu_energy])
        meter = np.array([site_power, sim.meter_energy])
        if "quantization" in on:
            per_rack = np.round(per_rack / RACK_QUANTA) * RACK_QUANTA
            meter = np.round(meter / METER_QUANTA) * METER_QUANTA
        values = np.concatenate([np.round(per_rack, 3).ravel(), np.round(meter, 1)])
        ts = np.full(values.size, ts_ns + self._bms_skew_ns, "datetime64[ns]")
        kept = (self.rngs["dropouts"].random(values.size) >= POINT_DROPOUT) if "dropouts" in on else None
        return values, ts, kept

    # ---- maintenance ---------------------------------------------------------------

    def schedule(self, now: float) -> None:
        """Rolling reboots: now and then a few nodes of one rack, free of faults, are drained and
        rebooted, upgrading their driver in half the batches; each is a labelled normal event."""
        sim = self.sim
        r = self.rngs["reboots"]
        while now >= self.next_maint:
            self.next_maint += float(r.exponential(self._maint_mean()))
            busy_racks = {f.rack for f in sim.faults if f.node is None}
            busy_nodes = {f.node for f in sim.faults if f.node is not None}
            free = [n for n in range(sim.n_nodes) if n not in busy_nodes and sim.node_rack[n] not in busy_racks]
            if not free:
                continue
            rack = sim.node_rack[free[int(r.integers(len(free)))]]
            cand = [n for n in free if sim.node_rack[n] == rack]
            k = min(len(cand), int(r.integers(REBOOT_BATCH[0], REBOOT_BATCH[1] + 1)))
            upgrade = bool(r.random() < UPGRADE_SHARE)
            for n in sorted(int(x) for x in r.choice(cand, k, replace=False)):
                drain, down, hold = (round(float(r.uniform(*span)), 1)
                                     for span in (REBOOT_DRAIN_S, REBOOT_DOWN_S, REBOOT_HOLD_S))
                kind = "driver_upgrade" if upgrade and not self.upgraded[n] else "node_reboot"
                params = {"drain_s": drain, "down_s": down, "hold_s": hold}
                if kind == "driver_upgrade":
                    params.update(driver_from=DRIVER_VERSION, driver=NEW_DRIVER_VERSION)
                sim.inject(kind, node=n, duration_s=drain + down + hold, params=params)


class SimulatorSource:
    """The simulated fleet as a Source (sources/base.py): one scrape per sample interval,
    paced to `speed` x real time (0 = flat out). With a BMS publisher (sources/bms.py) the
    facility readings go out on MQTT instead of the bus, as a real site's do, and the
    publisher drains its buffer after the stop."""

    def __init__(self, sim: FleetSimulator, speed: float, bms=None, mqtt_broker: str = "", caps=None) -> None:
        self.sim, self.speed, self.bms, self.mqtt_broker = sim, speed, bms, mqtt_broker
        self.caps = caps  # the power role's caps (bus.listen), followed as agents do (sources/power_caps.py)
        self.gpu_samples = 0

    async def run(self, emit, stop) -> None:
        if self.caps is None:
            return await self._run(emit, stop)
        from pipeline.sources.power_caps import SimulatedCaps, alongside, follow_caps
        applier = SimulatedCaps(self.sim)
        await alongside(lambda source_stop: self._run(emit, source_stop),
                        lambda stop: follow_caps(self.caps, applier, emit, stop, lambda: self.sim.now), stop)

    async def _run(self, emit, stop) -> None:
        import asyncio
        if self.bms is None:
            await self._simulate(emit, stop)
        else:
            await asyncio.gather(self._simulate(emit, stop), self.bms.run(stop))

    async def _simulate(self, emit, stop) -> None:
        import asyncio
        import time

        from pipeline.bus.base import Topic
        t0 = time.monotonic()
        while not stop.is_set():
            tick = self.sim.step()
            if self.bms is not None:
                self.bms.publish(tick.facility)
            await emit(Topic.GPU, tick.gpu)
            if self.bms is None:
                await emit(Topic.FACILITY, tick.facility)
            if tick.events is not None:  # a rack's events go where its telemetry goes (keyed by rack)
                await emit(Topic.EVENTS, tick.events)
            self.gpu_samples += tick.gpu.num_rows
            if tick.labels is not None:
                await emit(Topic.LABELS, tick.labels)
            if self.speed > 0:
                delay = t0 + self.sim.t / self.speed - time.monotonic()
                if delay > 0:
                    await wait_set(stop, delay)
                    continue
            await asyncio.sleep(0)  # behind schedule or flat out: let the consumers run

    def stats(self) -> dict[str, int]:
        s = {"gpu_samples": self.gpu_samples}
        if self.bms is not None:
            s.update(facility_readings_published=self.bms.stats.readings, facility_readings_dropped=self.bms.stats.dropped)
        return s

    def describe(self) -> str:
        f = self.sim.cfg
        return (f"{f.racks} racks x {f.nodes_per_rack} nodes x {f.gpus_per_node} GPUs simulated"
                + (f" (facility data on MQTT at {self.mqtt_broker})" if self.bms is not None else ""))

    def report(self, log) -> None:
        if self.bms is not None:
            log.info("BMS simulator: %d facility readings published on MQTT, %d dropped (buffer full)",
                     self.bms.stats.readings, self.bms.stats.dropped)


def build(ctx, spec) -> SimulatorSource:
    """The simulate role: the context's simulator; with mqtt.broker set, its facility data
    goes to that broker through a BMS publisher."""
    cfg, m = ctx.cfg, ctx.cfg.mqtt
    bms = None
    if m.broker:
        from pipeline.sources.bms import BmsPublisher
        from pipeline.sources.mqtt import broker_address, connect_options
        bms = BmsPublisher(*broker_address(m), client_id=f"fleetwatch-bms-sim-{cfg.fleet.site}",
                           topic_root=m.topic_root, connect=connect_options(m, warn=False))
    from pipeline.bus.base import Topic
    return SimulatorSource(ctx.simulator(), cfg.fleet.speed, bms, m.broker, ctx.bus.listen(Topic.POWER_CAPS, []))  # every rack's
