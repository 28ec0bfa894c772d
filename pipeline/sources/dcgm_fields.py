"""The one counters table between DCGM and Fleetwatch: each dcgm-exporter field and the
`gpu_samples` column it is, with the unit conversion (dcgm-exporter's model: one table
drives every collector).

Read both ways:
  - the DCGM exporter source (sources/dcgm.py) reads an exporter's `/metrics` into
    gpu_samples rows: column = DCGM value / per_base (mJ -> J, % -> 0-1, MiB -> bytes);
  - the NVML agent's exposition (sources/dcgm_exposition.py) serves its samples under
    dcgm-exporter's names, units and labels: DCGM value = column * per_base;
  - docs/collectors.md's counters table is generated from it (pipeline/docgen.py).

Names, types and help texts are dcgm-exporter's (etc/default-counters.csv, and the DCGM
field names for the fields that file leaves commented out). A field whose `column` is ""
has no gpu_samples column: the source skips it, the exposition does not serve it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.model import GPU_SAMPLE

MIB = 2 ** 20


@dataclass(frozen=True)
class DcgmField:
    name: str                  # dcgm-exporter's metric name (the DCGM field name)
    type: str                  # dcgm-exporter's Prometheus type: gauge or counter
    unit: str                  # unit of the DCGM value
    help: str                  # dcgm-exporter's help text
    column: str = ""           # the gpu_samples column; "" = not stored
    per_base: float = 1.0      # DCGM units per base unit of the column: column = value / per_base
    base: str = ""             # the column's unit, where it is not the DCGM unit
    default: bool = False      # in dcgm-exporter's default-counters.csv (not commented out)
    aliases: tuple[str, ...] = ()  # the same field under another DCGM version's name (read, never served)
    stands_in: str = ""        # a column this field fills where the column's own field is not sent (never served)
    note: str = ""             # for the docs

    def to_column(self, values: np.ndarray) -> np.ndarray:
        """DCGM values (float64, NaN = missing) in the column's base unit."""
        return values / self.per_base if self.per_base != 1.0 else values

    def from_column(self, values: np.ndarray) -> np.ndarray:
        """Column values (float64, NaN = missing) in DCGM's unit."""
        return values * self.per_base if self.per_base != 1.0 else values


_ = DcgmField
FIELDS: tuple[DcgmField, ...] = (
    _("DCGM_FI_DEV_SM_CLOCK", "gauge", "MHz", "SM clock frequency (in MHz).", "sm_clock_mhz", default=True),
    _("DCGM_FI_DEV_MEM_CLOCK", "gauge", "MHz", "Memory clock frequency (in MHz).", "mem_clock_mhz", default=True),
    _("DCGM_FI_DEV_MEMORY_TEMP", "gauge", "C", "Memory temperature (in C).", "mem_temp_c", default=True),
    _("DCGM_FI_DEV_GPU_TEMP", "gauge", "C", "GPU temperature (in C).", "gpu_temp_c", default=True),
    _("DCGM_FI_DEV_POWER_USAGE", "gauge", "W", "Power draw (in W).", "power_w", default=True),
    _("DCGM_FI_DEV_ENFORCED_POWER_LIMIT", "gauge", "W",
      "Effective power limit that the driver enforces after taking into account all limiters (in W).",
      "power_limit_w", note="not in dcgm-exporter's default counters: add it to its counters file for power caps"),
    _("DCGM_FI_DEV_POWER_MGMT_LIMIT", "gauge", "W", "Power management limit (in W).", stands_in="power_limit_w",
      note="`power_limit_w` where the exporter sends no DCGM_FI_DEV_ENFORCED_POWER_LIMIT: the limit set (`nvidia-smi "
           "-pl`, a cap), which is the enforced one unless another limiter is lower"),
    _("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter", "mJ", "Total energy consumption since boot (in mJ).",
      "energy_j", per_base=1000.0, base="J", default=True),
    _("DCGM_FI_DEV_PCIE_TX_THROUGHPUT", "counter", "KB",
      "Total number of bytes transmitted through PCIe TX (in KB) via NVML.", default=True),
    _("DCGM_FI_DEV_PCIE_RX_THROUGHPUT", "counter", "KB",
      "Total number of bytes received through PCIe RX (in KB) via NVML.", default=True),
    _("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter", "", "Total number of PCIe retries.", "pcie_replay_total",
      default=True),
    _("DCGM_FI_DEV_GPU_UTIL", "gauge", "%", "GPU utilization (in %).", "util_gpu", per_base=100.0, base="0-1",
      default=True),
    _("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "%", "Memory utilization (in %).", "util_mem", per_base=100.0, base="0-1",
      default=True),
    _("DCGM_FI_DEV_ENC_UTIL", "gauge", "%", "Encoder utilization (in %).", default=True),
    _("DCGM_FI_DEV_DEC_UTIL", "gauge", "%", "Decoder utilization (in %).", default=True),
    _("DCGM_FI_DEV_XID_ERRORS", "gauge", "", "Value of the last XID error encountered.", default=True,
      note="not a column: a change to a non-zero value is an `xid` event (the value present at the first "
           "scrape is the baseline; the gauge cannot say when it happened)"),
    _("DCGM_EXP_XID_ERRORS_TOTAL", "counter", "", "Total XID errors observed since exporter start.",
      note="dcgm-exporter's own, one series per `xid` label (not in its default counters: add it to see an XID "
           "that repeats): every increase is an `xid` event, which the last-XID gauge cannot show"),
    _("DCGM_EXP_XID_ERRORS_COUNT", "gauge", "", "XID errors observed during the configured time window.",
      note="dcgm-exporter's own, one series per `xid` label: an increase is an `xid` event (a lower bound where "
           "older ones leave the window as new ones come)"),
    _("DCGM_FI_DEV_FB_FREE", "gauge", "MiB", "Framebuffer memory free (in MiB).", default=True,
      note="not stored; the agent serves it from the memory total NVML reports at start"),
    _("DCGM_FI_DEV_FB_USED", "gauge", "MiB", "Framebuffer memory used (in MiB).", "mem_used_bytes",
      per_base=1.0 / MIB, base="bytes", default=True),
    _("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "counter", "", "Total number of single-bit volatile ECC errors.",
      "ecc_sbe_volatile_total"),
    _("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter", "", "Total number of double-bit volatile ECC errors.",
      "ecc_dbe_volatile_total"),
    _("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", "counter", "",
      "Total number of NVLink flow-control CRC errors.", "nvlink_crc_errors_total"),
    _("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "counter", "",
      "Total number of NVLink bandwidth counters for all lanes", default=True),
    _("DCGM_FI_DEV_VGPU_LICENSE_STATUS", "gauge", "", "vGPU License status", default=True),
    _("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter", "", "Number of remapped rows for uncorrectable errors",
      "remapped_rows_uncorrectable", default=True),
    _("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter", "", "Number of remapped rows for correctable errors",
      "remapped_rows_correctable", default=True),
    _("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "0/1", "Whether remapping of rows has failed",
      "remapped_rows_failure", default=True),
    _("DCGM_FI_DEV_ROW_REMAP_PENDING", "gauge", "0/1", "Whether remapping of rows is pending",
      "remapped_rows_pending"),
    _("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "gauge", "bitmask", "Current clock throttle reasons.",
      "clock_event_reasons", aliases=("DCGM_FI_DEV_CLOCKS_EVENT_REASONS",),
      note="NVML's clocks event reasons bits; DCGM 3.3+ also calls it DCGM_FI_DEV_CLOCKS_EVENT_REASONS"),
    _("DCGM_FI_DEV_PSTATE", "gauge", "", "Performance state (P-State) 0-15. 0=highest", "pstate"),
    _("DCGM_FI_DEV_SLOWDOWN_TEMP", "gauge", "C", "Slowdown temperature for the device.", "slowdown_temp_c"),
    _("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge", "ratio", "Ratio of time the graphics engine is active.",
      note="read for MIG instances only (dcgm-exporter's dcp-metrics-included.csv): a MIG GPU's `util_gpu` is its "
           "instances' activity weighted by their compute slices (GPU_UTIL reads 0 there)"),
)
del _
XID = "DCGM_FI_DEV_XID_ERRORS"
XID_TOTAL = "DCGM_EXP_XID_ERRORS_TOTAL"
XID_COUNT = "DCGM_EXP_XID_ERRORS_COUNT"
GR_ENGINE_ACTIVE = "DCGM_FI_PROF_GR_ENGINE_ACTIVE"
FB_FREE = "DCGM_FI_DEV_FB_FREE"
BY_NAME: dict[str, DcgmField] = {n: f for f in FIELDS for n in (f.name, *f.aliases)}
BY_COLUMN: dict[str, DcgmField] = {f.column: f for f in FIELDS if f.column}
STANDS_IN: tuple[DcgmField, ...] = tuple(f for f in FIELDS if f.stands_in)

# dcgm-exporter's labels on every series, in its order, and the gpu_samples column each is.
LABELS: tuple[str, ...] = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION")
# Each column's labels, the first one present wins: dcgm-exporter renamed `Hostname` to `hostname`
# in 2026 (NVIDIA/dcgm-exporter#655); the serial is there where the exporter's CSV enables it.
COLUMN_LABELS: dict[str, tuple[str, ...]] = {"gpu": ("gpu",), "gpu_uuid": ("UUID",), "pci_bus_id": ("pci_bus_id",),
                                             "model": ("modelName",), "node": ("hostname", "Hostname"),
                                             "driver_version": ("DCGM_FI_DRIVER_VERSION",),
                                             "serial": ("DCGM_FI_DEV_SERIAL",)}
# Who uses the GPU: the pod mapping's labels (Kubernetes) and the HPC job mapping's (a scheduler's
# prolog writes a file per GPU under --hpc-job-mapping-dir), and the gpu_samples column each fills.
WORKLOAD_LABELS: dict[str, str] = {"pod": "pod", "namespace": "namespace", "container": "container",
                                   "hpc_job": "job"}


# DCGM's "no value" encodings (dcgm_structs.h: BLANK, NOT_FOUND, NOT_SUPPORTED, NOT_PERMISSIONED,
# BLANK + 0..3). dcgm-exporter skips them since 2.x, but older exporters (and gpu-monitoring-tools)
# served them as readings: a memory temperature of 9223372036854775794 on GPUs that have none.
DCGM_INT32_BLANK = 0x7FFFFFF0
DCGM_INT64_BLANK = 0x7FFFFFFFFFFFFFF0
DCGM_FP64_BLANK = 140737488355328.0


def dcgm_blank(values: np.ndarray) -> np.ndarray:
    """Where raw DCGM values (float64, in DCGM's unit) are one of DCGM's blanks, not readings."""
    with np.errstate(invalid="ignore"):
        return (((values >= DCGM_INT32_BLANK) & (values <= DCGM_INT32_BLANK + 3))
                | ((values >= DCGM_FP64_BLANK) & (values <= DCGM_FP64_BLANK + 3))
                | (values >= float(DCGM_INT64_BLANK)))


def column_array(column: str, values: np.ndarray) -> pa.Array:
    """Float64 values (NaN or Inf = missing: null, never 0) as the column's Arrow type:
    integers rounded, booleans non-zero."""
    typ = GPU_SAMPLE.field(column).type
    missing = ~np.isfinite(values)
    if pa.types.is_boolean(typ):
        return pa.array(values != 0, mask=missing)
    if pa.types.is_integer(typ):
        limit = float(np.iinfo(typ.to_pandas_dtype()).max) + 1.0
        with np.errstate(invalid="ignore"):
            missing |= np.abs(values) >= limit  # beyond the type: not a reading
        return pa.array(np.rint(np.where(missing, 0.0, values)).astype(np.int64), mask=missing).cast(typ)
    return pa.array(values, mask=missing)


def counters_table() -> str:
    """The Markdown table of docs/collectors.md (scripts/update-docs)."""
    rows = ["| DCGM field (dcgm-exporter metric) | type | unit | `gpu_samples` column | conversion | default |",
            "| --- | --- | --- | --- | --- | --- |"]
    for f in FIELDS:
        if not f.column:
            conversion = f.note or "not stored (no column)"
        elif f.per_base == 1.0:
            conversion = "as is" + (" (non-zero = true)" if pa.types.is_boolean(GPU_SAMPLE.field(f.column).type)
                                    else "")
        elif f.per_base > 1:
            conversion = f"/ {f.per_base:g} ({f.unit} -> {f.base})"
        else:
            conversion = f"x {round(1 / f.per_base)} ({f.unit} -> {f.base})"
        if f.column and f.note:
            conversion += f"; {f.note}"
        names = " ".join(f"`{n}`" for n in (f.name, *f.aliases))
        rows.append(f"| {names} | {f.type} | {f.unit or '-'} | {f'`{f.column}`' if f.column else '-'} | "
                    f"{conversion} | {'yes' if f.default else 'no'} |")
    return "\n".join(rows)
