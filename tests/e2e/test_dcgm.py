"""End-to-end: the DCGM exporter both ways (issue 13). `fleetwatch run --source dcgm` scrapes
real HTTP servers that serve dcgm-exporter's text (tests/dcgm_exporter.py) while one node goes
down, one is slow, one answers garbage and one reports an XID: the samples land in Parquet, the
run goes on, and the usual alerts fire. And the NVML agent's /metrics, under dcgm-exporter's
names, read by the DCGM source of another Fleetwatch."""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path

import pytest

from pipeline.sources.dcgm import parse_exposition
from pipeline.sources.dcgm_fields import LABELS, MIB
from pipeline.model import GPU_SAMPLE, schema_version
from tests.dcgm_exporter import DcgmExporter
from tests.helpers import archived, start, wait_for
from tests.services import free_port

FAST_DCGM = {"FLEETWATCH_DCGM__INTERVAL_S": "0.2", "FLEETWATCH_DCGM__TIMEOUT_S": "0.5"}


def alerts(data: Path) -> list[dict]:
    path = data / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def firing(data: Path, name: str, **labels: str) -> list[dict]:
    return [a for a in alerts(data) if a["status"] == "firing" and a["labels"]["alertname"] == name
            and all(a["labels"].get(k) == v for k, v in labels.items())]


def test_dcgm_exporters_are_ingested_and_alerted_on_and_bad_targets_only_counted(tmp_path):
    nodes = [DcgmExporter(hostname=f"gpu-node-{i}", tag=i) for i in range(3)]
    slow = DcgmExporter(hostname="slow-node", tag=10, mode="slow", delay_s=3.0)
    garbage = DcgmExporter(hostname="garbage-node", tag=11, mode="garbage")
    (tmp_path / "nodes.csv").write_text("node,site,rack\ngpu-node-0,site-b,r01\ngpu-node-1,site-b,r02\n")
    (tmp_path / "dcgm.json").write_text(json.dumps([
        {"targets": [nodes[2].url], "labels": {"site": "site-b", "rack": "r03"}},
        {"targets": [slow.url, garbage.url]}]))
    data = tmp_path / "data"
    proc = start(tmp_path, "--source", "dcgm", "--dcgm-targets", f"{nodes[0].url},{nodes[1].url}",
                 env={**FAST_DCGM, "FLEETWATCH_DCGM__TARGETS_FILE": str(tmp_path / "dcgm.json"),
                      "FLEETWATCH_DCGM__MAPPING_FILE": str(tmp_path / "nodes.csv")})
    try:
        wait_for(lambda: min(n.requests for n in nodes) >= 15, timeout=120)
        nodes[1].close()        # the node goes down
        nodes[2].xid[3] = 48    # a double-bit ECC error on GPU 3 of node 2
        nodes[2].hidden = {6}   # GPU 6 of node 2 drops out of its exporter
        wait_for(lambda: firing(data, "NodeNotReporting", node="gpu-node-1")
                 and firing(data, "GpuUncorrectableEcc", node="gpu-node-2", gpu="3")
                 and firing(data, "GpuNotReporting", node="gpu-node-2", gpu="6"), timeout=120)
        served = nodes[0].requests
        wait_for(lambda: nodes[0].requests > served + 5)  # the run goes on
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        for s in (*nodes, slow, garbage):
            s.close()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err

    rows = archived(data, "gpu_samples")
    assert set(rows["node"]) == {"gpu-node-0", "gpu-node-1", "gpu-node-2"}
    per_node = {n: g for (n,), g in rows.group_by("node")}
    for i in range(3):
        assert set(per_node[f"gpu-node-{i}"]["gpu_uuid"]) == set(nodes[i].uuids)
    places = {(r["node"], r["site"], r["rack"]) for r in rows.select("node", "site", "rack").unique().to_dicts()}
    assert places == {("gpu-node-0", "site-b", "r01"), ("gpu-node-1", "site-b", "r02"), ("gpu-node-2", "site-b", "r03")}
    first = rows.filter(rows["gpu_uuid"] == nodes[0].uuids[0]).sort("ts")
    assert set(first["model"]) == {"NVIDIA H100 80GB HBM3"} and set(first["pci_bus_id"]) == {"00000000:18:00.0"}
    assert set(first["driver_version"]) == {"580.159.04"} and set(first["mem_used_bytes"]) == {61440 * MIB}
    assert set(first["util_mem"]) == {0.34} and first["energy_j"].is_sorted() and first["energy_j"][0] > 48e6
    assert first["ecc_sbe_volatile_total"].null_count() == first.height  # not among the default counters
    assert per_node["gpu-node-2"].filter(per_node["gpu-node-2"]["gpu"] == 6).height < \
        per_node["gpu-node-2"].filter(per_node["gpu-node-2"]["gpu"] == 5).height

    events = archived(data, "events")
    xid = events.filter(events["kind"] == "xid").to_dicts()
    assert [(e["node"], e["gpu"], e["code"], e["gpu_uuid"]) for e in xid] == [("gpu-node-2", 3, 48, nodes[2].uuids[3])]
    # it said once per node it read that it reads it every dcgm.interval_s, and that it stops on request
    said = lambda kind: sorted((e["node"], e["code"]) for e in events.filter(events["kind"] == kind).to_dicts())  # noqa: E731
    read = sorted(set(rows["node"]))
    assert said("collector_started") == [(n, 200) for n in read] and said("collector_stopping") == [(n, None) for n in read]

    ecc = firing(data, "GpuUncorrectableEcc", node="gpu-node-2", gpu="3")[0]
    assert ecc["labels"]["UUID"] == nodes[2].uuids[3]  # GPU alerts carry dcgm-exporter's UUID label
    assert firing(data, "GpuNotReporting", node="gpu-node-2", gpu="6")[0]["labels"]["UUID"] == nodes[2].uuids[6]
    assert not firing(data, "NodeNotReporting", node="gpu-node-0")

    # every bad target counted by reason and named, once each, the run never stopped for them
    summary = next(line for line in err.splitlines() if "pipeline.sources.dcgm: dcgm:" in line and "failed scrapes" in line)
    for reason in ("down", "timeout", "garbage"):
        assert f" {reason} " in summary, summary
    assert f"{nodes[1].url} (down)" in summary and f"{slow.url} (timeout)" in summary
    assert err.count(f"target {slow.url} fails: timeout") == 1
    assert err.count(f"target {garbage.url} fails: garbage") == 1
    assert err.count("(gpu-node-1) fails: down") == 1


def test_the_agents_metrics_are_dcgm_exporters_and_another_fleetwatch_ingests_them(tmp_path):
    """`fleetwatch run --source nvml --replay h100 --http`: /metrics carries DCGM_FI_DEV_GPU_TEMP
    and the rest, with dcgm-exporter's labels; a second Fleetwatch's DCGM source reads the
    replayed GPUs from it, UUIDs, models and all."""
    port = free_port()
    agent_dir, dcgm_dir = tmp_path / "agent", tmp_path / "dcgm"
    agent_dir.mkdir(), dcgm_dir.mkdir()
    agent = start(agent_dir, "--replay", "h100", "--http", f"127.0.0.1:{port}",
                  env={"FLEETWATCH_AGENT__INTERVAL_S": "0.2", "FLEETWATCH_AGENT__NODE": "gpu-node-7"})
    url = f"http://127.0.0.1:{port}/metrics"
    reader = None
    try:
        def metrics() -> str:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    return r.read().decode()
            except OSError:
                return ""
        wait_for(lambda: "DCGM_FI_DEV_GPU_TEMP{" in metrics(), timeout=120)
        text = metrics()
        got = parse_exposition(text)
        assert len(got.uuids) == 8 and set(got.info["node"]) == {"gpu-node-7"}
        assert set(got.info["model"]) == {"NVIDIA H100 80GB HBM3"}
        line = next(ln for ln in text.splitlines() if ln.startswith("DCGM_FI_DEV_POWER_USAGE{"))
        assert all(f'{label}="' in line for label in LABELS)
        for name in ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE",
                     "DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_SM_CLOCK", "fleetwatch_gpu_info"):
            assert f"\n{name}{{" in text, name

        reader = start(dcgm_dir, "--dcgm-targets", f"127.0.0.1:{port}", env=FAST_DCGM)
        wait_for(lambda: not archived(dcgm_dir / "data", "gpu_samples").is_empty(), timeout=120)
    finally:
        for p in filter(None, (reader, agent)):
            p.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120) for p in filter(None, (reader, agent))]
    assert all(p.returncode == 0 for p in filter(None, (reader, agent))), [e[-2000:] for _, e in outs]
    rows = archived(dcgm_dir / "data", "gpu_samples")
    assert set(rows["gpu_uuid"]) == set(got.uuids) and set(rows["node"]) == {"gpu-node-7"}
    assert set(rows["pci_bus_id"]) == set(got.info["pci_bus_id"]) and set(rows["driver_version"]) == {"580.159.04"}
    assert rows["power_w"].null_count() == 0 and rows["nvlink_crc_errors_total"].null_count() == rows.height
    agent_rows = archived(agent_dir / "data", "gpu_samples")
    # every reading the reader took is one the agent took (the exposition serves the latest scrape)
    key = ["gpu_uuid", "power_w", "energy_j", "gpu_temp_c", "mem_used_bytes", "util_gpu", "clock_event_reasons"]
    assert rows.select(key).unique().join(agent_rows.select(key).unique(), on=key, how="anti").is_empty()


@pytest.mark.kafka
def test_the_dcgm_role_alone_publishes_each_scrape_to_kafka_keyed_by_rack(tmp_path):
    """`fleetwatch dcgm --kafka`: the role as its own process, on the agent-only install (no
    numba, no polars), sends gpu_sample messages of the current version keyed by rack (a node without one: by
    its site), each node's 8 GPUs of every scrape in them."""
    import asyncio
    import subprocess
    import sys
    import uuid

    from pipeline.bus import EndOfStream, Topic
    from pipeline.bus.kafka import KafkaBus
    from tests.e2e.test_deploy_runtime import agent_only_env
    from tests.services import KafkaBroker
    nodes = [DcgmExporter(hostname=f"gpu-node-{i}", tag=i) for i in range(3)]
    broker = KafkaBroker().start()
    prefix = f"t{uuid.uuid4().hex[:6]}."

    async def read() -> list:
        bus = KafkaBus(broker.bootstrap, prefix=prefix, client_id="dcgm-test")
        sub = bus.subscribe([Topic.GPU], f"check-{uuid.uuid4().hex[:6]}")
        await bus.end([Topic.GPU])
        got = []
        try:
            while True:
                got += await sub.get_batch(timeout_s=1.0)
        except EndOfStream:
            pass
        finally:
            await bus.close()
        return got
    try:
        env = agent_only_env(tmp_path, FLEETWATCH_KAFKA__TOPIC_PREFIX=prefix, **FAST_DCGM)
        run = subprocess.run([sys.executable, "-m", "pipeline", "dcgm", "--kafka", broker.bootstrap, "--dcgm-targets",
                              ",".join(n.url for n in nodes), "--duration", "4", "--data-dir", str(tmp_path / "data")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr
        messages = asyncio.run(read())
    finally:
        broker.close()
        for n in nodes:
            n.close()
    assert not (tmp_path / "blocked.log").exists()
    assert len(messages) >= 5
    for m in messages:
        racks, sites = set(m.value.column("rack").to_pylist()), set(m.value.column("site").to_pylist())
        assert racks == {m.key} or (racks == {""} and sites == {m.key})
        assert m.value.num_rows % 8 == 0
        assert m.headers["fw-schema"] == "gpu_sample" and m.headers["fw-version"] == str(schema_version(GPU_SAMPLE))
    assert {n for m in messages for n in m.value.column("node").to_pylist()} == {"gpu-node-0", "gpu-node-1",
                                                                                  "gpu-node-2"}
