"""The DCGM exporter, both ways (issue 13): the source that reads dcgm-exporter endpoints
(pipeline/sources/dcgm.py), the counters table both directions use (dcgm_fields.py), and the
NVML agent's exposition under dcgm-exporter's names (dcgm_exposition.py), checked on
dcgm-exporter's own text (tests/data/dcgm/) served by real HTTP servers. gpu_samples v3 (what
the GPU is) from every source. The end-to-end run is tests/e2e/test_dcgm.py."""

from __future__ import annotations

import asyncio
import json
import math
import re

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.bus import Topic
from pipeline.config import ConfigError
from pipeline.model import GPU_INFO, GPU_METRICS, GPU_SAMPLE, GPU_SETTINGS
from pipeline.sources.dcgm import (DOWN, GARBAGE, HTTP_STATUS, NO_GPUS, TIMEOUT, DcgmMetrics, DcgmSource,
                                   ExpositionError, Target, dcgm_samples, load_mapping, load_targets,
                                   gpu_index, parse_exposition, reference_samples, target_url)
from pipeline.sources.dcgm_fields import BY_COLUMN, BY_NAME, FIELDS, LABELS, MIB, XID, column_array
from pipeline.sources.dcgm_exposition import exposition_value
from tests.conftest import H100, make_config
from tests.dcgm_exporter import A100_ODD, H100_8GPU, DcgmExporter


def source(targets=(), mapping=None, **dcgm) -> DcgmSource:
    cfg = make_config(dcgm={"targets": list(targets), **dcgm}).dcgm
    return DcgmSource(cfg, load_targets(cfg), mapping or {})


def rows_of(text: str, src: DcgmSource | None = None, target: Target | None = None):
    from pipeline.sources.dcgm import TargetState
    src = src or source()
    if not src.states:  # the target's state lives on, scrape after scrape
        src.states.append(TargetState(target or Target("http://gpu-node-017:9400/metrics")))
    st_ = src.states[0]
    k = getattr(src, "scraped_in_test", 0)  # the exporter read the GPUs anew: their energy counted on
    src.scraped_in_test = k + 1
    text = _ENERGY.sub(lambda m: f"{m[1]} {int(float(m[2])) + k * 700_000}", text) if k else text
    batch, events = src.rows(st_, parse_exposition(text), 1_767_225_600 * 10**9)
    return batch, events, st_


_ENERGY = re.compile(r"^(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION\{.*\}) (\d+(?:\.\d*)?)$", re.M)


# ---- the counters table ------------------------------------------------------------------

def test_every_gpu_sample_metric_is_one_dcgm_field_and_names_are_dcgm_exporters():
    assert sorted(BY_COLUMN) == sorted(GPU_METRICS + GPU_SETTINGS)
    assert len({f.name for f in FIELDS}) == len(FIELDS)
    assert all(f.name.startswith(("DCGM_FI_DEV_", "DCGM_FI_PROF_", "DCGM_EXP_")) and f.type in ("gauge", "counter") for f in FIELDS)
    # dcgm-exporter's default-counters.csv, as its fixture shows it (HELP and TYPE lines)
    text = H100_8GPU.read_text()
    for f in FIELDS:
        if f"# HELP {f.name} " in text:
            assert f"# HELP {f.name} {f.help}\n# TYPE {f.name} {f.type}\n" in text, f.name


# Subnormal floats lose relative precision in any scaling (x / 1000 * 1000): no reading is one.
@given(st.sampled_from([f for f in FIELDS if f.column]), st.floats(0, 1e15, allow_nan=False, allow_subnormal=False))
def test_a_dcgm_value_converts_to_base_units_and_back(field, value):
    """mJ -> J, % -> 0-1, MiB -> bytes, and back, without drift: the agent serves what the
    source reads back."""
    typ = GPU_SAMPLE.field(field.column).type
    if pa.types.is_integer(typ) or pa.types.is_boolean(typ):
        value = float(round(value)) if not pa.types.is_boolean(typ) else float(value > 0.5)
        if pa.types.is_integer(typ):  # a reading the column holds
            value = float(min(value, np.iinfo(typ.to_pandas_dtype()).max // 2 * field.per_base // 1))
    base = field.to_column(np.array([value]))
    assert exposition_value(field.from_column(base)[0]) == pytest.approx(value, rel=1e-14, abs=0)
    got = column_array(field.column, base).to_pylist()[0]
    if pa.types.is_floating(typ):
        assert got == pytest.approx(value / field.per_base, rel=1e-15)
    else:
        assert got == (value != 0 if pa.types.is_boolean(typ) else round(value / field.per_base))


def test_units_energy_utilisation_and_framebuffer():
    assert BY_NAME["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"].to_column(np.array([4742776.0]))[0] == 4742.776
    assert BY_NAME["DCGM_FI_DEV_GPU_UTIL"].to_column(np.array([37.0]))[0] == 0.37
    assert BY_NAME["DCGM_FI_DEV_FB_USED"].to_column(np.array([61440.0]))[0] == 61440 * MIB
    assert BY_NAME["DCGM_FI_DEV_CLOCKS_EVENT_REASONS"] is BY_NAME["DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"]


def test_nan_inf_and_values_beyond_the_type_are_null_never_zero():
    got = column_array("pcie_replay_total", np.array([3.0, np.nan, np.inf, 1e30, -np.inf]))
    assert got.to_pylist() == [3, None, None, None, None]
    assert column_array("remapped_rows_failure", np.array([0.0, 1.0, np.nan])).to_pylist() == [False, True, None]
    assert column_array("power_w", np.array([np.nan, 1.5])).to_pylist() == [None, 1.5]


# ---- parsing dcgm-exporter's text ------------------------------------------------------------

def test_an_h100_node_as_dcgm_exporter_serves_it_becomes_eight_gpu_sample_rows():
    batch, events, state = rows_of(H100_8GPU.read_text())
    assert batch.schema.equals(GPU_SAMPLE) and batch.num_rows == 8 and events == []
    r = batch.to_pylist()
    assert [x["gpu"] for x in r] == list(range(8)) and {x["node"] for x in r} == {"gpu-node-017"}
    assert r[0]["gpu_uuid"] == "GPU-85a0bcc1-6a06-ce83-4dad-5d99f5e2fc57"
    assert {x["model"] for x in r} == {"NVIDIA H100 80GB HBM3"} and {x["driver_version"] for x in r} == {"580.159.04"}
    assert [x["pci_bus_id"] for x in r][:3] == ["00000000:18:00.0", "00000000:2A:00.0", "00000000:3A:00.0"]
    assert {x["serial"] for x in r} == {None}  # the default CSV does not enable DCGM_FI_DEV_SERIAL
    g0 = r[0]
    assert (g0["power_w"], g0["gpu_temp_c"], g0["mem_temp_c"], g0["sm_clock_mhz"]) == (698.512, 61.0, 53.0, 1395.0)
    assert g0["energy_j"] == 48213775.19                   # mJ -> J
    assert g0["util_gpu"] == 1.0 and g0["util_mem"] == 0.34  # % -> 0-1
    assert g0["mem_used_bytes"] == 61440 * MIB              # MiB -> bytes
    assert r[3]["pcie_replay_total"] == 12 and r[5]["remapped_rows_correctable"] == 2
    assert g0["remapped_rows_failure"] is False
    # not among dcgm-exporter's default counters: null, never 0
    for column in ("ecc_sbe_volatile_total", "pstate", "clock_event_reasons", "nvlink_crc_errors_total",
                   "slowdown_temp_c", "remapped_rows_pending"):
        assert batch.column(column).null_count == 8, column
    assert state.node == "gpu-node-017" and state.last_xid == {u: 0.0 for u in batch.column("gpu_uuid").to_pylist()}


def test_the_hpc_job_mapping_names_each_gpus_jobs():
    """dcgm-exporter with --hpc-job-mapping-dir sends a GPU's series once per job, with an
    `hpc_job` label: one row per GPU, its jobs comma-separated; a GPU without one: null."""
    lines = []
    for line in H100_8GPU.read_text().splitlines():
        if 'gpu="0"' in line:  # two jobs share GPU 0
            lines += [line.replace('{gpu="0"', '{gpu="0",hpc_job="4242"'),
                      line.replace('{gpu="0"', '{gpu="0",hpc_job="4243"')]
        elif 'gpu="1"' in line:
            lines.append(line.replace('DCGM_FI_DRIVER_VERSION=', 'hpc_job="4250",DCGM_FI_DRIVER_VERSION='))
        else:
            lines.append(line)
    batch, _, _ = rows_of("\n".join(lines) + "\n")
    assert batch.num_rows == 8
    r = {x["gpu"]: x for x in batch.to_pylist()}
    assert [r[g]["job"] for g in range(3)] == ["4242,4243", "4250", None]
    assert r[0]["power_w"] == 698.512 and r[0]["pod"] is None


def test_the_node_is_the_hostname_label_of_either_dcgm_exporter_generation():
    """dcgm-exporter renamed its `Hostname` label to `hostname` (NVIDIA/dcgm-exporter#655):
    both name the node, not the target's address."""
    text = H100_8GPU.read_text()
    new = text.replace('Hostname="gpu-node-017"', 'hostname="gpu-node-042"')
    old = text.replace('Hostname="gpu-node-017"', 'Hostname="gpu-node-043"')
    for exposition, node in ((new, "gpu-node-042"), (old, "gpu-node-043")):
        batch, _, state = rows_of(exposition, target=Target("http://10.0.3.17:9400/metrics"))
        assert set(batch.column("node").to_pylist()) == {node} and state.node == node and batch.num_rows == 8


def test_an_answer_with_the_series_of_several_hosts_is_refused_saying_what_it_looks_like():
    """A Prometheus /federate endpoint given as a target: two nodes' GPUs in one answer. Every row had been the
    first host's (a node with each GPU twice), and an XID of the second node's GPU named the first node."""
    from pipeline.sources.dcgm import ExpositionError
    text = H100_8GPU.read_text()
    other = text.replace('Hostname="gpu-node-017"', 'Hostname="gpu-node-018"').replace("GPU-", "GPU-f")
    with pytest.raises(ExpositionError, match=r"the series of 2 hosts in one answer \(gpu-node-017, gpu-node-018\): "
                                              r"a Prometheus /federate endpoint.*each node's dcgm-exporter"):
        rows_of(text + other, target=Target("http://prometheus:9090/federate"))


@pytest.mark.parametrize("says", ["localhost", "3f546054f69d", "-oProxyCommand=touch owned", "a,b"])
def test_a_hostname_label_that_names_no_node_gives_way_to_the_target_s_host(says, caplog):
    """dcgm-exporter 4 run with -r names its host engine's host, `localhost` (NVIDIA/dcgm-exporter#572);
    in Docker without NODE_NAME it names the container (#581), anew at each restart. Either made
    every such node one node, or a new node each restart: the target's host names them, said once."""
    import logging
    text = H100_8GPU.read_text().replace('Hostname="gpu-node-017"', f'Hostname="{says}"')
    src = source()
    with caplog.at_level(logging.WARNING, "pipeline.sources.dcgm"):
        for _ in range(3):
            batch, _, state = rows_of(text, src, Target("http://gpu-node-9.example.org:9400/metrics"))
    assert set(batch.column("node").to_pylist()) == {"gpu-node-9.example.org"} == {state.node}
    [said] = [r.getMessage() for r in caplog.records if "no node's name" in r.getMessage()]
    assert repr(says) in said and "gpu-node-9.example.org" in said and "target's labels" in said
    labelled = Target("http://gpu-node-9.example.org:9400/metrics", {"node": "n9"})
    assert set(rows_of(text, source(), labelled)[0].column("node").to_pylist()) == {"n9"}


def _mig(text: str, active: tuple[float, float] | None) -> str:
    """GPU 0 of the H100 fixture as a MIG GPU of two 3g.40gb instances, as dcgm-exporter serves
    one (each field once per instance; GPU_UTIL and MEM_COPY_UTIL 0 there, NVIDIA/dcgm-exporter#216)."""
    out = []
    for line in text.splitlines():
        if 'gpu="0"' not in line:
            out.append(line)
            continue
        name = line[:line.index("{")]
        for gi, fb, act in ((1, 30000, active and active[0]), (2, 5000, active and active[1])):
            labelled = line.replace('{gpu="0"', f'{{gpu="0",GPU_I_PROFILE="3g.40gb",GPU_I_ID="{gi}"')
            if name == "DCGM_FI_DEV_FB_USED":
                labelled = labelled[:labelled.rindex("}") + 1] + f" {fb}"
            elif name in ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL"):
                labelled = labelled[:labelled.rindex("}") + 1] + " 0"
            out.append(labelled)
            if name == "DCGM_FI_DEV_GPU_UTIL" and act is not None:
                out.append("DCGM_FI_PROF_GR_ENGINE_ACTIVE" + labelled[len(name):labelled.rindex("}") + 1] + f" {act}")
    return "\n".join(out) + "\n"


def test_a_mig_gpu_is_one_row_with_its_instances_memory_and_their_activity_by_compute_slices():
    """A MIG GPU's device-level utilisation reads 0 whatever runs on it: taken as it came, a fully
    busy inference GPU was idle for the capacity report and the first to cap for the power
    planner, and its memory was one instance's, whichever series came last."""
    text = H100_8GPU.read_text()
    whole = {x["gpu"]: x for x in rows_of(text)[0].to_pylist()}
    batch, _, _ = rows_of(_mig(text, (0.95, 0.4)))
    assert batch.num_rows == 8
    r = {x["gpu"]: x for x in batch.to_pylist()}
    assert r[0]["util_gpu"] == pytest.approx((0.95 * 3 + 0.4 * 3) / 7)  # 7 compute slices, 3 of them idle
    assert r[0]["mem_used_bytes"] == (30000 + 5000) * MIB and r[0]["util_mem"] is None
    assert r[0]["power_w"] == whole[0]["power_w"] and r[0]["energy_j"] == whole[0]["energy_j"]
    assert all(r[g] == whole[g] for g in range(1, 8))  # the GPUs without MIG: as before
    # Without the DCP fields (dcgm-exporter's default counters): unknown, not idle.
    r = {x["gpu"]: x for x in rows_of(_mig(text, None))[0].to_pylist()}
    assert r[0]["util_gpu"] is None and r[0]["mem_used_bytes"] == 35000 * MIB
    # Empty GPU_I_* labels on a whole GPU's series: no MIG.
    assert rows_of(text.replace('{gpu="', '{GPU_I_PROFILE="",GPU_I_ID="",gpu="'))[0].to_pylist() == list(
        whole.values())
    # A whole GPU's own graphics activity does not replace its GPU_UTIL.
    extra = "DCGM_FI_PROF_GR_ENGINE_ACTIVE" + text.splitlines()[2][len("DCGM_FI_DEV_SM_CLOCK"):].rsplit(" ", 1)[0]
    assert rows_of(text + extra + " 0.2\n")[0].to_pylist()[0]["util_gpu"] == whole[0]["util_gpu"]


def test_the_power_management_limit_stands_in_for_the_enforced_limit_where_that_is_not_sent():
    base = H100_8GPU.read_text()
    assert "ENFORCED_POWER_LIMIT" not in base  # dcgm-exporter's default counters have neither

    def limit(name: str, gpu: int, watts: float) -> str:
        head = next(line for line in base.splitlines() if line.startswith(f'DCGM_FI_DEV_GPU_TEMP{{gpu="{gpu}"'))
        return f"{name}{head[head.index('{'):head.index('}') + 1]} {watts}\n"
    mgmt = base + limit("DCGM_FI_DEV_POWER_MGMT_LIMIT", 0, 600) + limit("DCGM_FI_DEV_POWER_MGMT_LIMIT", 1, 700)
    assert rows_of(base)[0].column("power_limit_w").null_count == 8
    assert rows_of(mgmt)[0].column("power_limit_w").to_pylist() == [600.0, 700.0] + [None] * 6
    both = mgmt + limit("DCGM_FI_DEV_ENFORCED_POWER_LIMIT", 1, 450)  # another limiter is lower: the enforced one
    assert rows_of(both)[0].column("power_limit_w").to_pylist()[:3] == [600.0, 450.0, None]


def test_a_link_s_own_series_is_no_gpu_of_its_own():
    """dcgm-exporter's link entities carry `nvlink`, `gpu_uuid` and `hostname`, not `UUID`: read as
    a GPU, each made a phantom row keyed by host and index."""
    link = ('DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL{nvlink="3",gpu="0",gpu_uuid="GPU-85a0bcc1-6a06-ce83-'
            '4dad-5d99f5e2fc57",pci_bus_id="00000000:18:00.0",device="nvidia0",model_name="m",hostname="n1"} 4\n')
    batch, _, _ = rows_of(H100_8GPU.read_text() + link)
    assert batch.num_rows == 8 and batch.column("nvlink_crc_errors_total").null_count == 8


def test_dcgm_blank_values_an_older_exporter_serves_are_missing_not_readings():
    """gpu-monitoring-tools and early dcgm-exporters served DCGM's "no value" encodings
    (NVIDIA/gpu-monitoring-tools#97: an HBM temperature of 9223372036854776000)."""
    blanks = {"DCGM_FI_DEV_MEMORY_TEMP": "9223372036854775794",   # int64 NOT_SUPPORTED
              "DCGM_FI_DEV_POWER_USAGE": "140737488355328",       # fp64 BLANK
              "DCGM_FI_DEV_SM_CLOCK": "2147483634",               # int32 NOT_SUPPORTED
              "DCGM_FI_DEV_XID_ERRORS": "9223372036854775792"}    # int64 BLANK
    lines = []
    for line in H100_8GPU.read_text().splitlines():
        name = line.split("{", 1)[0]
        if 'gpu="0"' in line and name in blanks:
            line = line.rsplit(" ", 1)[0] + " " + blanks[name]
        lines.append(line)
    src = source()
    rows_of(H100_8GPU.read_text(), src)  # the last XID, 0, is the GPUs' baseline
    batch, events, _ = rows_of("\n".join(lines) + "\n", src)
    r = {x["gpu"]: x for x in batch.to_pylist()}
    assert (r[0]["mem_temp_c"], r[0]["power_w"], r[0]["sm_clock_mhz"]) == (None, None, None)
    assert None not in (r[1]["mem_temp_c"], r[1]["power_w"], r[1]["sm_clock_mhz"])
    assert r[0]["gpu_temp_c"] == 61.0 and events == []  # the rest of the row, and no XID from a blank


def test_escaped_labels_nan_missing_fields_pod_mapping_and_an_older_exporter():
    batch, _, _ = rows_of(A100_ODD.read_text())
    r = {x["gpu"]: x for x in batch.to_pylist()}
    assert batch.num_rows == 4  # two pods on GPU 0: one GPU, one row
    # Who uses the GPU: both pods, first seen first, their escaped labels unescaped; no pod: null.
    assert (r[0]["pod"], r[0]["namespace"], r[0]["container"]) == (
        "llm-train-0,llm-eval-7\\b", "ml-research", 'trainer,eval "nightly"')
    assert all(r[g][c] is None for g in (1, 2, 3) for c in ("pod", "namespace", "container"))
    assert r[1]["model"] == 'NVIDIA A100 "SXM4" 80GB \\ lab'  # \" and \\ unescaped
    assert r[0]["model"] == "NVIDIA A100-SXM4-80GB"
    assert r[0]["pci_bus_id"] is None and r[0]["driver_version"] is None  # 2.x exporters have neither label
    assert r[1]["mem_temp_c"] is None and r[2]["power_w"] is None  # NaN
    assert r[2]["ecc_sbe_volatile_total"] is None  # +Inf
    assert r[3]["gpu_temp_c"] is None and r[1]["ecc_sbe_volatile_total"] is None  # not sent
    assert r[0]["ecc_sbe_volatile_total"] == 3
    assert [r[g]["clock_event_reasons"] for g in range(4)] == [4, 1, 136, 4]  # DCGM 3.3+'s name of field 112
    assert r[0]["energy_j"] == 319159.391 and r[0]["util_gpu"] == 0.97 and r[0]["mem_used_bytes"] == 4845 * MIB
    assert r[0]["power_w"] == 409.692 and r[0]["pstate"] == 0


def test_the_fast_path_reads_what_prometheus_clients_parser_reads_on_the_fixtures():
    for path in (H100_8GPU, A100_ODD):
        text = path.read_text()
        fast, ref = dcgm_samples(text), reference_samples(text)
        assert len(fast) == len(ref) > 0
        for (n1, l1, v1), (n2, l2, v2) in zip(fast, ref):
            assert (n1, l1) == (n2, l2) and (v1 == v2 or math.isnan(v1) and math.isnan(v2))


_label_values = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**53, 2**53))


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    if isinstance(v, float) and math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(BY_NAME) + ["DCGM_FI_PROF_SM_ACTIVE", "go_goroutines"]),
                          st.dictionaries(st.sampled_from(["gpu", "UUID", "modelName", "Hostname", "pod", "x_y"]),
                                          _label_values, max_size=4),
                          _values, st.sampled_from(["", "gauge", "counter"])), max_size=12))
def test_the_fast_path_agrees_with_prometheus_clients_parser_on_any_exposition(samples):
    """Escaped quotes, backslashes and newlines in label values, NaN and Inf, TYPE lines of
    either kind, metrics Fleetwatch does not read: the same samples either way."""
    lines = []
    for name, labels, value, typ in samples:
        if typ:
            lines += [f"# HELP {name} help text", f"# TYPE {name} {typ}"]
        block = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{block}}} {_number(value)}" if labels else f"{name} {_number(value)}")
    text = "\n".join(lines) + "\n"
    try:
        ref = reference_samples(text)
    except ExpositionError:
        with pytest.raises(ExpositionError):
            dcgm_samples(text)
        return
    fast = dcgm_samples(text)
    assert [(n, lab) for n, lab, _ in fast] == [(n, lab) for n, lab, _ in ref]
    assert all(a == b or math.isnan(a) and math.isnan(b) for (_, _, a), (_, _, b) in zip(fast, ref))


@pytest.mark.parametrize("text", [
    "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>\n",
    '{"status": "error", "gpus": []}\n',
    'DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-1" 31\n',
    'DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-1"} hot\n',
    "\x00\x01\x02\x03 binary",
])
def test_what_is_not_the_text_format_is_garbage(text):
    with pytest.raises(ExpositionError, match="not the Prometheus text format"):
        parse_exposition(text)


def test_a_line_cut_short_is_named_by_what_refuses_the_text():
    """A name without a value had failed the fast path with an unpacking error the operator could do nothing
    with; the text is still refused (as Prometheus refuses it), saying which line."""
    good = 'DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-1"} 31\n'
    with pytest.raises(ExpositionError, match="Invalid value: 'go_goroutines'"):
        parse_exposition(good + "go_goroutines\n")


@pytest.mark.parametrize("fast", [True, False])
def test_counters_an_openmetrics_proxy_renamed_name_total_are_read(fast):
    """The OpenTelemetry collector appends _total to a counter: energy and every error counter had vanished,
    without a word, from a target that looked healthy."""
    text = ('# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n'
            'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION_total{gpu="0",UUID="GPU-1"} 319159391\n'
            'DCGM_FI_DEV_PCIE_REPLAY_COUNTER_total{gpu="0",UUID="GPU-1"} 12\n'
            'DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-1"} 31\n')
    e = parse_exposition(text, fast=fast)
    assert e.uuids == ["GPU-1"] and {n for n, _, _ in (dcgm_samples(text) if fast else reference_samples(text))} \
        == {"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "DCGM_FI_DEV_GPU_TEMP"}


def test_a_gpu_label_int_cannot_read_is_the_gpu_s_row():
    assert gpu_index(["0", "²", None, "7"], 0).tolist() == [0, 1, 2, 7]


def test_a_text_without_dcgm_fields_has_no_gpus():
    assert parse_exposition("").uuids == []
    assert parse_exposition("# HELP go_goroutines x\n# TYPE go_goroutines gauge\ngo_goroutines 12\n").uuids == []


# ---- targets, mapping, placement ------------------------------------------------------------------

def test_targets_are_urls_and_host_port_means_http_metrics():
    assert target_url("gpu-node-1:9400") == "http://gpu-node-1:9400/metrics"
    assert target_url("http://10.0.0.7:9400") == "http://10.0.0.7:9400/metrics"
    assert target_url("https://gpu-node-1:9400/dcgm/metrics") == "https://gpu-node-1:9400/dcgm/metrics"
    for bad in ("", "ftp://gpu:21/x", "gpu node:9400", "gpu-node-1:94oo", "http://:9400/metrics"):
        with pytest.raises(ConfigError, match="dcgm.targets"):
            target_url(bad)


def test_a_targets_file_is_lines_or_prometheus_file_sd_json(tmp_path):
    plain = tmp_path / "targets.txt"
    plain.write_text("# rack r01\ngpu-node-1:9400\n\ngpu-node-2:9400  # spare\nhttp://gpu-node-1:9400/metrics\n")
    cfg = make_config(dcgm={"targets": ["gpu-node-0:9400"], "targets_file": str(plain)}).dcgm
    assert [t.url for t in load_targets(cfg)] == [f"http://gpu-node-{i}:9400/metrics" for i in range(3)]
    sd = tmp_path / "dcgm.json"
    sd.write_text(json.dumps([{"targets": ["gpu-node-1:9400"], "labels": {"site": "site-b", "rack": "r07",
                                                                           "job": "dcgm"}},
                              {"targets": ["gpu-node-9:9400"]}]))
    got = load_targets(make_config(dcgm={"targets_file": str(sd)}).dcgm)
    assert [(t.url, t.label("site"), t.label("rack"), t.label("job")) for t in got] == [
        ("http://gpu-node-1:9400/metrics", "site-b", "r07", ""), ("http://gpu-node-9:9400/metrics", "", "", "")]
    for text, says in (("[{\"targets\": \"gpu:1\"}]", "entry 0"), ("[{", "not valid JSON"), ("gpu node:1", "targets")):
        sd.write_text(text)
        with pytest.raises(ConfigError, match=says):
            load_targets(make_config(dcgm={"targets_file": str(sd)}).dcgm)
    with pytest.raises(ConfigError, match="cannot read it"):
        load_targets(make_config(dcgm={"targets_file": str(tmp_path / "missing.json")}).dcgm)


def test_the_mapping_file_places_nodes_and_says_which_line_is_wrong(tmp_path):
    m = tmp_path / "nodes.csv"
    m.write_text("node,site,rack\n# hall 2\ngpu-node-017,site-b,r12\ngpu-node-018, site-b , r12\n")
    assert load_mapping(str(m)) == {"gpu-node-017": ("site-b", "r12"), "gpu-node-018": ("site-b", "r12")}
    assert load_mapping("") == {}
    m.write_text("host,site,rack\nx,y,z\n")
    with pytest.raises(ConfigError, match="header node,site,rack"):
        load_mapping(str(m))
    m.write_text("node,site,rack\ngpu-node-017,site-b\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_mapping(str(m))


def test_site_and_rack_come_from_the_target_then_the_mapping_then_the_defaults():
    text = H100_8GPU.read_text()
    mapping = {"gpu-node-017": ("site-m", "r-m")}
    labelled = Target("http://10.0.0.7:9400/metrics", (("node", "n-label"), ("rack", "r-label")))
    got = rows_of(text, source(mapping=mapping, site="site-d", rack="r-d"), labelled)[0].to_pylist()[0]
    assert (got["site"], got["rack"], got["node"]) == ("site-d", "r-label", "n-label")  # n-label is not mapped
    plain = Target("http://10.0.0.7:9400/metrics")
    got = rows_of(text, source(mapping=mapping), plain)[0].to_pylist()[0]
    assert (got["site"], got["rack"], got["node"]) == ("site-m", "r-m", "gpu-node-017")  # node: Hostname label
    no_host = text.replace('Hostname="gpu-node-017",', "")
    got = rows_of(no_host, source(site="site-d", rack="r-d"), plain)[0].to_pylist()[0]
    assert (got["site"], got["rack"], got["node"]) == ("site-d", "r-d", "10.0.0.7")  # node: the target's host


# ---- events ---------------------------------------------------------------------------------------

def test_an_xid_is_a_change_of_the_last_xid_and_the_first_value_is_only_a_baseline():
    src = source()
    ex = DcgmExporter(tag=1)
    try:
        ex.xid[4] = 13  # already there at the first scrape: from before Fleetwatch, not alerted
        _, events, st_ = rows_of(ex.render(), src)
        assert events == [] and src.xid_baselines == ["gpu-node-017 GPU 4 XID 13"]
        ex.xid[2] = 79
        _, events, _ = rows_of(ex.render(), src)
        assert [(e["kind"], e["gpu"], e["code"], e["gpu_uuid"]) for e in events] == [("xid", 2, 79, ex.uuids[2])]
        assert events[0]["node"] == "gpu-node-017" and "DCGM_FI_DEV_XID_ERRORS" in events[0]["text"]
        assert rows_of(ex.render(), src)[1] == []  # still 79: nothing new
        ex.xid[2], ex.xid[4] = 0, 48
        _, events, _ = rows_of(ex.render(), src)
        assert [(e["gpu"], e["code"]) for e in events] == [(4, 48)]
        ex.xid[2] = 79
        assert [(e["gpu"], e["code"]) for e in rows_of(ex.render(), src)[1]] == [(2, 79)]  # 0 then 79 again: new
    finally:
        ex.close()


def _xids(events) -> list[tuple[int, int, str]]:
    return [(e["gpu"], e["code"], e["text"]) for e in events if e["kind"] == "xid"]


def test_an_xid_that_repeats_is_seen_in_dcgm_exporters_xid_counters():
    """The last-XID gauge stays at 94 when 94 comes again; DCGM_EXP_XID_ERRORS_TOTAL counts
    it, and the gauge and the counter telling of the same XID are one event."""
    src = source()
    ex = DcgmExporter(tag=1)
    try:
        ex.xid[3], ex.xid_total[3, 13] = 13, 2  # before Fleetwatch read the GPU: a baseline, logged once
        assert rows_of(ex.render(), src)[1] == [] and src.xid_baselines == ["gpu-node-017 GPU 3 XID 13"]
        ex.xid[2], ex.xid_total[2, 94] = 94, 1  # both say it: one event
        assert _xids(rows_of(ex.render(), src)[1]) == [(2, 94, "from dcgm-exporter's DCGM_FI_DEV_XID_ERRORS")]
        ex.xid_total[2, 94] = 2  # again: the gauge still reads 94
        assert _xids(rows_of(ex.render(), src)[1]) == [(2, 94, "from dcgm-exporter's DCGM_EXP_XID_ERRORS_TOTAL")]
        ex.xid_total[2, 94] = 5
        assert _xids(rows_of(ex.render(), src)[1]) == [
            (2, 94, "3 times since the last scrape, from dcgm-exporter's DCGM_EXP_XID_ERRORS_TOTAL")]
        assert rows_of(ex.render(), src)[1] == []  # nothing new
        ex.xid[3], ex.xid_total[3, 13] = 13, 3  # the baseline's XID again
        assert _xids(rows_of(ex.render(), src)[1]) == [(3, 13, "from dcgm-exporter's DCGM_EXP_XID_ERRORS_TOTAL")]
        # The exporter starts again: its totals from zero, series only for XIDs since.
        ex.xid_total.clear()
        assert rows_of(ex.render(), src)[1] == []
        ex.xid_total[2, 94] = 1
        assert _xids(rows_of(ex.render(), src)[1]) == [(2, 94, "from dcgm-exporter's DCGM_EXP_XID_ERRORS_TOTAL")]
        ex.xid_total[2, 94] = 4
        assert rows_of(ex.render(), src)[1] != []
        ex.xid_total[2, 94] = 2  # went down without a scrape between: started again, and 2 since
        assert _xids(rows_of(ex.render(), src)[1]) == [
            (2, 94, "2 times since the last scrape, from dcgm-exporter's DCGM_EXP_XID_ERRORS_TOTAL")]
    finally:
        ex.close()


def test_an_xid_counter_that_reads_nan_for_a_scrape_counts_nothing_twice_and_odd_codes_are_no_xid():
    src = source()
    ex = DcgmExporter(tag=1)
    try:
        rows_of(ex.render(), src)
        ex.xid_total[2, 94] = 5
        assert len(_xids(rows_of(ex.render(), src)[1])) == 1
        for value in ("NaN", "-1", "9223372036854775792"):  # no count this scrape (a blank, a broken exporter)
            ex.xid_total[2, 94] = value
            assert rows_of(ex.render(), src)[1] == []
            ex.xid_total[2, 94] = 5  # the same 5 as before: nothing new (it had read as 5 more)
            assert rows_of(ex.render(), src)[1] == []
        ex.xid_total[2, 94] = 6
        assert _xids(rows_of(ex.render(), src)[1]) == [(2, 94, "from dcgm-exporter's DCGM_EXP_XID_ERRORS_TOTAL")]
        # Codes that are no XID an event can carry (int32): not read, never a crash of the target.
        ex.xid_total[3, "\u00b2"], ex.xid_total[3, 99999999999], ex.xid[4] = 1, 1, 99999999999
        assert rows_of(ex.render(), src)[1] == []
    finally:
        ex.close()


def test_the_xid_windows_count_is_read_where_the_total_is_not_served():
    src = source()
    ex = DcgmExporter(tag=1)
    try:
        rows_of(ex.render(), src)
        ex.xid[5], ex.xid_count[5, 48] = 48, 1
        assert _xids(rows_of(ex.render(), src)[1]) == [(5, 48, "from dcgm-exporter's DCGM_FI_DEV_XID_ERRORS")]
        ex.xid_count[5, 48] = 2
        assert _xids(rows_of(ex.render(), src)[1]) == [(5, 48, "from dcgm-exporter's DCGM_EXP_XID_ERRORS_COUNT")]
        ex.xid_count[5, 48] = 1  # the first left the window: nothing new
        assert rows_of(ex.render(), src)[1] == []
        del ex.xid_count[5, 48]  # the window emptied
        assert rows_of(ex.render(), src)[1] == []
        ex.xid_count[5, 48] = 1  # and one came since
        assert _xids(rows_of(ex.render(), src)[1]) == [(5, 48, "from dcgm-exporter's DCGM_EXP_XID_ERRORS_COUNT")]
    finally:
        ex.close()


def test_xid_counter_series_without_an_xid_or_on_a_mig_gpus_instances_count_once():
    base = H100_8GPU.read_text()
    head = next(line for line in base.splitlines() if line.startswith('DCGM_FI_DEV_GPU_TEMP{gpu="0"'))
    labels = head[head.index("{"):head.index("}")]

    def text(n: int) -> str:  # the count's empty series, and a MIG GPU's two instances repeating the GPU's total
        return base + "".join([f'DCGM_EXP_XID_ERRORS_COUNT{labels}}} 0\n',
                               *(f'DCGM_EXP_XID_ERRORS_TOTAL{labels},GPU_I_ID="{gi}",GPU_I_PROFILE="3g.40gb",'
                                 f'xid="31"}} {n}\n' for gi in (1, 2))])
    src = source()
    rows_of(text(1), src)
    assert _xids(rows_of(text(2), src)[1]) == [(0, 31, "from dcgm-exporter's DCGM_EXP_XID_ERRORS_TOTAL")]
    assert parse_exposition(text(2)).uuids == parse_exposition(base).uuids  # no GPU of their own


def test_energy_going_backwards_is_a_gpu_reset_event():
    src = source()
    text = H100_8GPU.read_text()
    rows_of(text, src)
    reset = text.replace("48213775190", "1200")
    _, events, _ = rows_of(reset, src)
    assert [(e["kind"], e["gpu"]) for e in events] == [("gpu_reset", 0)] and "GPU reset" in events[0]["text"]


# ---- scraping real HTTP servers ----------------------------------------------------------------------

def scrape_rounds(src: DcgmSource, n: int = 1) -> list:
    """n rounds of the source's scrape, one HTTP session: each round's (batch, events)."""
    async def rounds():
        import aiohttp
        async with aiohttp.ClientSession() as session:
            return [await src.round(session, asyncio.Semaphore(4)) for _ in range(n)]
    return asyncio.run(rounds())


def test_a_round_reads_the_good_targets_and_counts_each_bad_one_by_reason():
    good = [DcgmExporter(hostname=f"gpu-node-{i}", tag=i) for i in range(3)]
    slow = DcgmExporter(hostname="slow", tag=10, mode="slow", delay_s=2.0)
    garbage = DcgmExporter(hostname="garbage", tag=11, mode="garbage")
    error = DcgmExporter(hostname="error", tag=12, mode="error")
    empty = DcgmExporter(hostname="empty", tag=13)
    empty.hidden = set(range(8))
    down = DcgmExporter(hostname="down", tag=14)
    down.close()
    servers = [*good, slow, garbage, error, empty]
    src = source([s.url for s in [*good, slow, garbage, error, empty, down]], timeout_s=0.5)

    try:
        (batch, events), (batch2, _) = scrape_rounds(src, 2)
    finally:
        for s in servers:
            s.close()
    assert batch.schema.equals(GPU_SAMPLE) and events == []
    assert sorted(set(batch.column("node").to_pylist())) == ["gpu-node-0", "gpu-node-1", "gpu-node-2"]
    assert batch.num_rows == 24 and len(set(batch.column("gpu_uuid").to_pylist())) == 24
    assert batch2.num_rows == 24
    energy = [np.asarray(b.column("energy_j")) for b in (batch, batch2)]
    assert (energy[1] > energy[0]).all()  # the exporters count on
    s = src.stats()
    assert s["gpu_samples"] == 48 and s["batches"] == 2 and s["scrapes"] == 16 and s["targets"] == 8
    assert {r: s[f"failed_{r}"] for r in (DOWN, TIMEOUT, GARBAGE, HTTP_STATUS, NO_GPUS)} == {
        DOWN: 2, TIMEOUT: 2, GARBAGE: 2, HTTP_STATUS: 2, NO_GPUS: 2}
    assert s["targets_failing"] == 5 and "(5 failing)" in src.describe()
    failing = {st_.target.url: (st_.failing, st_.detail) for st_ in src.states if st_.failing}
    assert failing[error.url] == (HTTP_STATUS, "HTTP 500 Internal Server Error")
    assert failing[slow.url][0] == TIMEOUT and "dcgm.timeout_s = 0.5" in failing[slow.url][1]
    from prometheus_client import CollectorRegistry, generate_latest
    registry = CollectorRegistry()
    registry.register(DcgmMetrics(src))
    text = generate_latest(registry).decode()
    assert 'fleetwatch_dcgm_scrape_failures_total{reason="timeout"} 2.0' in text
    assert 'fleetwatch_dcgm_targets{state="failing"} 5.0' in text and "fleetwatch_dcgm_scrapes_total 16.0" in text


def test_an_exporter_with_its_1x_names_is_told_how_to_fix_it(tmp_path):
    """dcgm-exporter --use-old-namespace serves dcgm_gpu_temp and the like: no field Fleetwatch
    reads, which said only "no DCGM field with a GPU"."""
    old = tmp_path / "old-namespace.txt"
    old.write_text(H100_8GPU.read_text().replace("DCGM_FI_DEV_", "dcgm_").replace("UUID=", "uuid="))
    ex = DcgmExporter(fixture=old)
    src = source([ex.url])
    try:
        [(batch, _)] = scrape_rounds(src)
    finally:
        ex.close()
    [state] = src.states
    assert batch is None or batch.num_rows == 0
    assert state.failing == NO_GPUS and "run the exporter without --use-old-namespace" in state.detail


def test_one_exporter_under_two_names_is_read_once(caplog):
    ex = DcgmExporter()
    src = source([ex.url, ex.url.replace("127.0.0.1", "localhost")])
    try:
        [(batch, _)] = scrape_rounds(src)
    finally:
        ex.close()
    assert batch.num_rows == 8 and sorted(batch.column("gpu_uuid").to_pylist()) == sorted(ex.uuids)
    assert "list the same GPUs" in caplog.text


def test_a_gpu_two_targets_list_is_read_from_one_of_them_scrape_after_scrape(caplog):
    """Two targets' answers in different batches (one slower, or more targets than dcgm.concurrency): the
    GPU had been read from both by turns, moving between two nodes at every scrape (each move resolves its
    alerts and starts its series afresh). One target reads it until that one fails; said once."""
    ex = DcgmExporter()
    src = source([ex.url, ex.url.replace("127.0.0.1", "localhost")])
    first, second = src.states

    async def scrape(st_):
        import aiohttp
        async with aiohttp.ClientSession() as session:
            return await src.scrape(session, st_, asyncio.Semaphore(1))
    try:
        published = []
        for st_ in (first, second, first, second):
            published += [b for b, _ in src.batches([asyncio.run(scrape(st_))]) if b is not None]
        assert [b.num_rows for b in published] == [8, 8]  # the first target's two scrapes
        from pipeline.sources.dcgm import Scraped
        src.batches([Scraped(first, reason=DOWN, detail="refused")])  # it fails: the other reads the GPUs
        [(batch, _)] = src.batches([asyncio.run(scrape(second))])
        assert batch.num_rows == 8
    finally:
        ex.close()
    assert caplog.text.count("list the same GPUs") == 1


def test_readings_an_exporter_serves_again_unchanged_are_left_out(caplog):
    """dcgm-exporter reads the GPUs every 30 s and serves that reading until the next: scraped every
    10 s, two scrapes in three had been new samples of the same reading, a counter's rate 0, 0, then
    three times the rate (a PCIe replay storm never held three scrapes in a row to alert)."""
    ex = DcgmExporter(reads_every=3)
    src = source([ex.url])
    try:
        rounds = scrape_rounds(src, 6)
    finally:
        ex.close()
    assert [b.num_rows if b is not None else 0 for b, _ in rounds] == [8, 0, 0, 8, 0, 0]
    assert src.stats()["unrefreshed"] == 32 and src.stats()["gpu_samples"] == 16
    assert caplog.text.count("served a GPU's readings unchanged") == 1 and "dcgm.interval_s" in caplog.text
    from prometheus_client import CollectorRegistry, generate_latest
    registry = CollectorRegistry()
    registry.register(DcgmMetrics(src))
    assert "fleetwatch_dcgm_unrefreshed_readings_total 32.0" in generate_latest(registry).decode()


def test_a_gpu_whose_energy_counter_is_stuck_keeps_its_readings():
    """The reading anew is told by the energy counter and the power together: a counter stuck alone (a
    firmware's, an exporter that serves 0) had dropped every reading of the GPU after its first."""
    from pipeline.sources.dcgm import TargetState
    src = source()
    st_ = TargetState(Target("http://gpu-node-017:9400/metrics"))
    text = H100_8GPU.read_text()
    moved = re.sub(r"^(DCGM_FI_DEV_POWER_USAGE\{.*\}) (\S+)$", lambda m: f"{m[1]} {float(m[2]) + 3.5}", text, flags=re.M)
    counts = [src.rows(st_, parse_exposition(t), 10**18 + k)[0].num_rows for k, t in enumerate((text, moved, moved))]
    assert counts == [8, 8, 0]  # the same energy, power moved: anew; then both as before: served again


def test_an_exemplar_is_not_the_samples_value():
    """An OpenMetrics proxy's exemplar after a sample (`# {trace_id=...} 7`): the fast path had read the
    exemplar's value (energy 319,159 J read as 0.007 J: a false GPU reset)."""
    line = 'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0",UUID="GPU-1"} 319159391 # {trace_id="abc"} 7\n'
    assert [v for _, _, v in dcgm_samples(line)] == [319159391.0]


def test_an_exporter_behind_https_of_an_internal_ca_and_basic_auth_is_read_with_the_settings(tmp_path, caplog):
    """An exporter behind a proxy with an internal CA's certificate and basic auth (kube-rbac-proxy, nginx):
    it had been `down` (CERTIFICATE_VERIFY_FAILED) with no setting but SSL_CERT_FILE, which replaces the
    system's CAs. dcgm.ca_file, dcgm.username and dcgm.password_file; the password shows nowhere."""
    import base64
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pipeline.redact import redact_text
    from pipeline.sources.dcgm import DOWN, HTTP_STATUS
    from tests.services import self_signed_tls
    tls = self_signed_tls(tmp_path / "tls")
    body = H100_8GPU.read_text().encode()
    secret = "s3cret-of-the-exporters"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            ok = self.headers.get("Authorization") == "Basic " + base64.b64encode(f"prom:{secret}".encode()).decode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body) if ok else 0))
            self.end_headers()
            if ok:
                self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls["server.pem"], tls["server.key"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}/metrics"
    (tmp_path / "password").write_text(secret + "\n")
    try:
        plain = source([url])
        (batch, _), = scrape_rounds(plain)
        assert batch is None and plain.states[0].failing == DOWN and "CERTIFICATE_VERIFY_FAILED" in plain.states[0].detail
        no_user = source([url], ca_file=str(tls["ca.pem"]))
        scrape_rounds(no_user)
        assert no_user.states[0].failing == HTTP_STATUS and "401" in no_user.states[0].detail
        good = source([url], ca_file=str(tls["ca.pem"]), username="prom", password_file=str(tmp_path / "password"))
        (batch, _), = scrape_rounds(good)
        assert batch.num_rows == 8 and not good.states[0].failing
    finally:
        server.shutdown()
    assert secret not in caplog.text
    header = base64.b64encode(f"prom:{secret}".encode()).decode()
    assert redact_text(f"401: bad password {secret} in Basic {header}") == "401: bad password *** in Basic ***"
    with pytest.raises(ConfigError, match="dcgm.ca_file"):
        source([url], ca_file=str(tmp_path / "none.pem"))
    with pytest.raises(ConfigError, match="without dcgm.username"):
        source([url], password_file=str(tmp_path / "password"))


def test_the_role_needs_targets_and_the_command_line_gives_them(tmp_path):
    from pipeline.cli import _overrides, _parser
    from pipeline.daemon import check_roles
    from pipeline.preflight import validate
    from pipeline.roles import ROLE_SPECS, run_roles
    args = _parser().parse_args(["run", "--dcgm-targets", "gpu-node-1:9400, http://gpu-node-2:9400/metrics"])
    o = _overrides(args)
    assert o["dcgm"]["targets"] == ["gpu-node-1:9400", "http://gpu-node-2:9400/metrics"]
    assert o["daemon"]["source"] == "dcgm"  # the targets imply the source
    cfg = make_config(data_dir=str(tmp_path), **o)
    assert run_roles(cfg) == {"dcgm", "detect", "power", "remediate", "archive", "notify"}
    assert ROLE_SPECS["dcgm"].outputs == (Topic.GPU, Topic.EVENTS)  # the agent's, less the caps it applies
    with pytest.raises(ConfigError, match="--dcgm-targets"):
        check_roles(make_config(daemon={"source": "dcgm"}), frozenset({"dcgm", "detect", "archive", "notify"}))
    with pytest.raises(ConfigError, match="dcgm.targets_file"):
        validate(make_config(data_dir=str(tmp_path), daemon={"source": "dcgm"},
                             dcgm={"targets_file": str(tmp_path / "nope.txt")}),
                 frozenset({"dcgm", "detect", "power", "remediate", "archive", "notify"}))


# ---- gpu_samples v3: what the GPU is, from every source ---------------------------------------------

def test_the_agent_and_the_simulator_say_what_each_gpu_is():
    from pipeline.sources.nvml import NvmlAgent
    from pipeline.sources.nvml_replay import NvmlReplay
    from pipeline.sources.simulate import FleetSimulator
    with NvmlReplay(H100, gpus=8, latency=False).installed():
        agent = NvmlAgent(make_config().agent, "gpu-node-7")
        agent.open()
        batch = agent.scrape().samples
    r = batch.to_pylist()
    assert {x["model"] for x in r} == {"NVIDIA H100 80GB HBM3"} and {x["driver_version"] for x in r} == {"580.159.04"}
    assert [x["pci_bus_id"] for x in r][:2] == ["00000000:00:06.0", "00000000:00:07.0"]  # the recorded bus id, on
    assert len({x["serial"] for x in r}) == 8 and r[0]["serial"] == "0000000000001"
    assert agent.gpus[0].mem_total_bytes == 85520809984
    sim = FleetSimulator(make_config(fleet={"racks": 1, "nodes_per_rack": 2}).fleet).step().gpu
    assert sim.schema.equals(GPU_SAMPLE)
    assert all(sim.column(c).null_count == 0 for c in GPU_INFO)
    assert sim.column("pci_bus_id").to_pylist()[:8] == ["00000000:18:00.0", "00000000:2A:00.0", "00000000:3A:00.0",
                                                         "00000000:5D:00.0", "00000000:9A:00.0", "00000000:AB:00.0",
                                                         "00000000:BA:00.0", "00000000:DB:00.0"]
    assert len(set(sim.column("serial").to_pylist())) == 16


# ---- the agent's exposition under dcgm-exporter's names ------------------------------------------------

def _replayed_agent_exposition(scrapes: int = 60, job_mapping_dir: str = ""):
    from prometheus_client import CollectorRegistry, generate_latest

    from pipeline.sources.nvml import NvmlAgent, NvmlSource
    from pipeline.sources.nvml_replay import NvmlReplay
    with NvmlReplay(H100, gpus=8, latency=False).installed():
        agent = NvmlAgent(make_config(agent={"job_mapping_dir": job_mapping_dir}).agent, "gpu-node-7")
        agent.open()
        src = NvmlSource(agent)
        src.exposition.fb_total_bytes.update((g.uuid, g.mem_total_bytes) for g in agent.gpus)
        for _ in range(scrapes):
            batch = agent.scrape().samples
    src.exposition.update(batch)
    registry = CollectorRegistry()
    registry.register(src.exposition)
    return src, batch, lambda: generate_latest(registry).decode()


@pytest.mark.parametrize("scrapes", [1, 60, 250])  # idle, under load, cooling down
def test_the_agents_exposition_read_back_by_the_dcgm_source_is_the_same_gpu_samples(scrapes):
    """The round trip: the replayed H100s served under dcgm-exporter's names and units, parsed
    back by the DCGM source's own parser, give the agent's gpu_samples values exactly."""
    src, batch, render = _replayed_agent_exposition(scrapes)
    text = render()
    state_ = DcgmSource(make_config().dcgm, [], {})
    from pipeline.sources.dcgm import TargetState
    back, _ = state_.rows(TargetState(Target("http://gpu-node-7:9400/metrics")), parse_exposition(text), 0)
    assert back.column("gpu_uuid").equals(batch.column("gpu_uuid")) and back.column("gpu").equals(batch.column("gpu"))
    for column in (*GPU_METRICS, "model", "pci_bus_id", "driver_version", "node"):
        assert back.column(column).equals(batch.column(column)), column
    # the serial is no DCGM label by default (dcgm-exporter's CSV leaves DCGM_FI_DEV_SERIAL out): fleetwatch_gpu_info
    assert back.column("serial").null_count == 8 and 'serial="0000000000001"' in text
    assert batch.column("nvlink_crc_errors_total").null_count == 8  # not supported: no series, not 0
    assert "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL{" not in text


def test_the_exposition_has_dcgm_exporters_labels_units_and_fleetwatchs_extras():
    from prometheus_client.parser import text_string_to_metric_families
    src, batch, render = _replayed_agent_exposition(60)
    families = {f.name: f for f in text_string_to_metric_families(render())}
    temp = families["DCGM_FI_DEV_GPU_TEMP"]
    assert temp.type == "gauge" and temp.documentation == "GPU temperature (in C)."
    s0 = temp.samples[0]
    assert s0.labels == {"gpu": "0", "UUID": "GPU-00000000-0000-4000-8000-000000000001", "pci_bus_id": "00000000:00:06.0",
                         "device": "nvidia0", "modelName": "NVIDIA H100 80GB HBM3", "Hostname": "gpu-node-7",
                         "DCGM_FI_DRIVER_VERSION": "580.159.04"}
    assert set(s0.labels) == set(LABELS)
    row = batch.to_pylist()[0]
    value = {name: {s.labels["gpu"]: s.value for s in f.samples} for name, f in families.items()}
    assert value["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"]["0"] == round(row["energy_j"] * 1000)  # J -> mJ
    assert value["DCGM_FI_DEV_GPU_UTIL"]["1"] == batch.to_pylist()[1]["util_gpu"] * 100  # 0-1 -> %
    assert value["DCGM_FI_DEV_FB_USED"]["0"] == row["mem_used_bytes"] / MIB  # bytes -> MiB
    assert value["DCGM_FI_DEV_FB_FREE"]["0"] == (85520809984 - row["mem_used_bytes"]) / MIB
    assert value[XID] == {str(g): 0 for g in range(8)}
    info = families["fleetwatch_gpu_info"].samples[0].labels
    assert info["site"] == "site-a" and info["rack"] == "rack-0" and info["serial"] == "0000000000001"
    assert info["hpc_job"] == ""  # no job mapping: no job
    assert families["fleetwatch_gpu_sample_timestamp_seconds"].samples[0].value == pytest.approx(
        row["ts"].timestamp(), abs=1e-6)
    # an XID sets the last-XID gauge and counts in the total (the same XID twice: twice), a lost GPU's series go;
    # the DCGM source reading the agent sees each of them
    reader = source()
    rows_of(render(), reader, Target("http://gpu-node-7:9400/metrics"))
    src.exposition.xid(row["gpu_uuid"], 79)
    assert _xids(rows_of(render(), reader)[1]) == [(0, 79, "from dcgm-exporter's DCGM_FI_DEV_XID_ERRORS")]
    src.exposition.xid(row["gpu_uuid"], 79)
    src.exposition.forget(batch.to_pylist()[7]["gpu_uuid"])
    text = render()
    assert _xids(rows_of(text, reader)[1]) == [(0, 79, "from dcgm-exporter's DCGM_EXP_XID_ERRORS_TOTAL")]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {s.labels["gpu"]: s.value for s in families[XID].samples} == {**{str(g): 0 for g in range(1, 7)}, "0": 79}
    assert [(s.labels["gpu"], s.labels["xid"], s.value) for s in families["DCGM_EXP_XID_ERRORS_TOTAL"].samples] == [
        ("0", "79", 2)]
    assert len(families["DCGM_FI_DEV_POWER_USAGE"].samples) == 7


def test_the_agents_series_carry_hpc_job_as_dcgm_exporters_do_and_read_back_as_the_job(tmp_path):
    """With a job map, each GPU's series carry `hpc_job`, one series per job (dcgm-exporter's
    --hpc-job-mapping-dir): per-job PromQL works on the agent, and the DCGM source reading it
    fills the job column as the agent's own samples have it."""
    from prometheus_client.parser import text_string_to_metric_families
    (tmp_path / "0").write_text("4242\n4243\n")
    (tmp_path / "3").write_text("77\n")
    src, batch, render = _replayed_agent_exposition(5, str(tmp_path))
    text = render()
    power = {f.name: f for f in text_string_to_metric_families(text)}["DCGM_FI_DEV_POWER_USAGE"]
    by_gpu: dict[str, list[str]] = {}
    for s in power.samples:
        by_gpu.setdefault(s.labels["gpu"], []).append(s.labels.get("hpc_job", ""))
    assert by_gpu == {"0": ["4242", "4243"], "3": ["77"], **{g: [""] for g in "124567"}}
    from pipeline.sources.dcgm import TargetState
    back, _ = DcgmSource(make_config().dcgm, [], {}).rows(TargetState(Target("http://gpu-node-7:9400/metrics")),
                                                         parse_exposition(text), 0)
    assert back.column("job").to_pylist() == batch.column("job").to_pylist() == \
        ["4242,4243", None, None, "77", None, None, None, None]
    assert back.column("power_w").equals(batch.column("power_w"))  # a series per job, one reading per GPU
    # without a job map no series has the label: the agent serves exactly dcgm-exporter's label set
    _, _, plain = _replayed_agent_exposition(5)
    dcgm = [f for f in text_string_to_metric_families(plain()) if f.name.startswith("DCGM_")]
    assert dcgm and all(set(s.labels) == set(LABELS) for f in dcgm for s in f.samples)


def test_the_exposition_is_valid_openmetrics_too():
    """Prometheus asks for OpenMetrics first, and /metrics answers it when asked: every DCGM name
    a gauge keeps it valid (an OpenMetrics counter must end in _total, dcgm-exporter's do not)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.openmetrics.exposition import generate_latest
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
    src, _, _ = _replayed_agent_exposition(60)
    registry = CollectorRegistry()
    registry.register(src.exposition)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert families["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"].type == "gauge"
    assert len(families["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"].samples) == 8


def test_the_agent_role_registers_its_exposition_for_metrics(tmp_path):
    from pipeline.bus import MemoryBus
    from pipeline.roles import ROLE_SPECS, builder
    from pipeline.roles.context import Context
    from pipeline.sinks.console import Console
    cfg = make_config(data_dir=str(tmp_path), agent={"replay": "h100"})
    ctx = Context(cfg, frozenset({"agent"}), MemoryBus(), asyncio.Event(), Console())
    src = builder(ROLE_SPECS["agent"])(ctx, ROLE_SPECS["agent"])
    assert src.exposition in ctx.collectors
    # scraped before the agent's first read (a real H200's daemon answered 500 then): no GPU series yet
    from prometheus_client import CollectorRegistry, generate_latest
    registry = CollectorRegistry()
    registry.register(src.exposition)
    assert not [x for x in generate_latest(registry).decode().splitlines() if x.startswith("DCGM_")]
    targets = tmp_path / "t.txt"
    targets.write_text("gpu-node-1:9400\n")
    ctx = Context(make_config(data_dir=str(tmp_path), dcgm={"targets_file": str(targets)}), frozenset({"dcgm"}),
                  MemoryBus(), asyncio.Event(), Console())
    src = builder(ROLE_SPECS["dcgm"])(ctx, ROLE_SPECS["dcgm"])
    assert [type(c).__name__ for c in ctx.collectors] == ["DcgmMetrics"] and len(src.states) == 1


def test_the_agent_s_exposition_serves_no_reading_older_than_its_bound():
    """When no GPU answers at all no scrape replaces the exposition: the last readings had been served for ever
    (34 C, 698 W of a node whose driver hung). A GPU read longer ago than the bound is served no more."""
    from pipeline.sources.dcgm_exposition import GpuExposition
    from pipeline.sources.nvml import NvmlAgent
    from pipeline.sources.nvml_replay import NvmlReplay
    from tests.conftest import H100
    replay = NvmlReplay(H100, gpus=2, latency=False)
    with replay.installed():
        a = NvmlAgent(make_config().agent, "node-1")
        a.open()
        batch = a.scrape().samples
    read_at = batch.column("ts").cast(pa.int64()).to_numpy().max() / 1e9
    now = [read_at + 30.0]
    exposition = GpuExposition(stale_after_s=60.0, clock=lambda: now[0])
    exposition.update(batch)

    def temperatures() -> int:
        return sum(len(f.samples) for f in exposition.collect() if f.name == "DCGM_FI_DEV_GPU_TEMP")
    served = temperatures()
    now[0] = read_at + 61.0
    assert (served, temperatures()) == (2, 0)
