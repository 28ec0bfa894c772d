"""`fleetwatch eval --kafka HOST:PORT --detect-processes K`: the eval's scenario through a
real broker, detected by K `fleetwatch detect` processes, scored as the in-process run is.

The simulator's ticks are produced as its sources would (keyed by rack, bus/keys.py) on
topics of a prefix of this run's own, so runs never mix. The detect processes join first
(each tier's partitions spread over them), then the whole scenario is produced, then
this process waits until both tiers have committed everything, reads every alert change
back from the alerts topic, and stops them.

`chaos` tests what scale-out must survive, half-way through the scenario (once the first
half is committed, so every partition has a checkpoint; the second half then lands on the
struck process's partitions too):
"kill" kills one detect process with SIGKILL (the survivors take its partitions over
from its last checkpoint); "freeze" stops one with SIGSTOP past the group's session
timeout and lets it go on (SIGCONT) once the others took its partitions: it wakes up
fenced and commits nothing of them. The scores must not change.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.analytics.evaluate import EVAL_EPOCH, EvalRun
from pipeline.bus import Topic, keys
from pipeline.bus.base import HEARTBEAT
from pipeline.bus.kafka import KafkaBus
from pipeline.config import Config, ConfigError
from pipeline.detect.catalog import DETECTOR_ALERTS
from pipeline.sources.simulate import FleetSimulator

log = logging.getLogger("fleetwatch")

RACK_INPUTS = [Topic.GPU, Topic.FACILITY, Topic.EVENTS]
JOIN_TIMEOUT_S = 180.0
FREEZE_S = 25.0  # past the consumer group's session timeout (aiokafka: 10 s): its partitions move
CHAOS = ("kill", "freeze")


def simulate_kafka(cfg: Config, duration_s: float, processes: int, config_file: str | None = None,
                   chaos: str | None = None) -> tuple[EvalRun, dict[str, Any]]:
    """The eval over Kafka; returns the run and what happened to the processes."""
    if processes < 1:
        raise ConfigError(f"--detect-processes {processes}: must be at least 1")
    if chaos is not None and (chaos not in CHAOS or processes < 2):
        raise ConfigError(f"--chaos {chaos}: one of {', '.join(CHAOS)}, with --detect-processes 2 or more "
                          f"(the others take its partitions over)")
    prefix = f"{cfg.kafka.topic_prefix}eval-{uuid.uuid4().hex[:8]}."
    cfg = replace(cfg, kafka=replace(cfg.kafka, topic_prefix=prefix))
    return asyncio.run(_run(cfg, duration_s, processes, config_file, chaos))


async def _run(cfg: Config, duration_s: float, processes: int, config_file: str | None,
               chaos: str | None) -> tuple[EvalRun, dict[str, Any]]:
    bus = KafkaBus.from_config(cfg.kafka, client_id="fleetwatch-eval")
    await bus.start()  # creates this run's topics
    workdir = Path(tempfile.mkdtemp(prefix="fleetwatch-eval-"))
    procs = [_start_detect(cfg, workdir, i, config_file) for i in range(processes)]
    try:
        await _joined(procs, workdir)
        victim = procs[-1] if chaos else None
        frozen_at: float | None = None

        async def strike() -> None:
            nonlocal frozen_at
            frozen_at = await _strike(bus, victim, chaos)
        labels, produced, gpu_samples, nodes = await _produce(bus, cfg, duration_s, strike if chaos else None)
        await _consumed(bus, produced, victim, frozen_at)
        alerts = await _alerts(bus)
    except BaseException:
        log.error("eval: the detect processes' logs are kept in %s", workdir)
        raise
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        await bus.close()
    n_nodes = cfg.fleet.racks * cfg.fleet.nodes_per_rack
    run = EvalRun(labels, alerts, EVAL_EPOCH + timedelta(seconds=duration_s), n_nodes * duration_s / 3600.0,
                  gpu_samples, normal=cfg.fleet.normal, nodes=nodes)
    logs = [Path(p.log_path).read_text(errors="replace") for p in procs]
    shutil.rmtree(workdir, ignore_errors=True)
    return run, {"detect_processes": processes, "chaos": chaos, "victim": victim.pid if victim else None,
                 "fenced": sum(text.count("was taken over by another process") for text in logs),
                 "restored": sum(len(re.findall(r"restored the detector state of \[\d", text)) for text in logs)}


def _start_detect(cfg: Config, workdir: Path, i: int, config_file: str | None) -> subprocess.Popen:
    env = dict(os.environ) | {
        "FLEETWATCH_KAFKA__TOPIC_PREFIX": cfg.kafka.topic_prefix,
        "FLEETWATCH_KAFKA__PARTITIONS": str(cfg.kafka.partitions),
        "FLEETWATCH_INTAKE__MAX_AGE_S": "0",   # the scenario is stamped at the eval's epoch, not now
        "FLEETWATCH_INTAKE__MAX_AHEAD_S": "0"}
    cmd = [sys.executable, "-m", "pipeline", "detect", "--kafka", cfg.kafka.bootstrap,
           "--data-dir", str(workdir / f"detect-{i}")]
    if config_file:
        cmd += ["--config", config_file]
    log_path = workdir / f"detect-{i}.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=out)
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


async def _joined(procs: list[subprocess.Popen], workdir: Path) -> None:
    """Until every detect process holds partitions of both tiers (the last to join
    rebalanced the others): the scenario then starts on a settled group."""
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while True:
        texts = [Path(p.log_path).read_text(errors="replace") for p in procs]
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"a detect process exited ({dead[0].returncode}): {texts[procs.index(dead[0])][-2000:]}")
        if all("(rack tier): assigned" in t and "(site tier): assigned" in t for t in texts):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the detect processes did not all join within {JOIN_TIMEOUT_S:.0f} s (logs in {workdir})")
        await asyncio.sleep(0.5)


async def _produce(bus: KafkaBus, cfg: Config, duration_s: float,
                   halfway=None) -> tuple[list[dict], dict, int, dict[str, str]]:
    """The scenario, produced as its sources would; the labels (ground truth) and the fleet's
    nodes stay here. `halfway` (a coroutine function) runs once half of it is produced."""
    sim = FleetSimulator(cfg.fleet, start=EVAL_EPOCH)
    labels: list[dict[str, Any]] = []
    gpu_samples = 0
    ticks = int(round(duration_s / cfg.fleet.sample_interval_s))
    for i in range(ticks):
        if halfway is not None and i == ticks // 2:
            await bus.flush()
            await halfway()
        tick = sim.step()
        if tick.labels is not None:
            labels.extend(tick.labels.to_pylist())
        for topic, batch in ((Topic.GPU, tick.gpu), (Topic.FACILITY, tick.facility), (Topic.EVENTS, tick.events)):
            if batch is not None and batch.num_rows:
                for m in keys.messages(topic, batch, keyed=True):
                    await bus.publish(m)
        gpu_samples += tick.gpu.num_rows
    await bus.flush()
    return labels, await bus.ends(RACK_INPUTS), gpu_samples, sim.node_racks()


async def _committed(bus: KafkaBus, group: str) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(**bus.client_settings)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(bus.wire_group(group))
        return {tp: meta.offset for tp, meta in offsets.items() if meta is not None and meta.offset >= 0}
    finally:
        await admin.close()


async def _nothing_after(bus: KafkaBus, committed: dict[TopicPartition, int], topic: Topic) -> bool:
    """No committed record of `topic` lies at or after the group's committed offsets
    (transaction markers do not count: they are not records)."""
    probe = AIOKafkaConsumer(isolation_level="read_committed", enable_auto_commit=False, **bus.client_settings)
    await probe.start()
    try:
        tps = sorted(await bus.partitions([topic]))
        if not tps:
            return True
        probe.assign(tps)
        for tp in tps:
            probe.seek(tp, committed.get(tp, 0))
        ends = await probe.end_offsets(tps)
        while any([await probe.position(tp) < ends[tp] for tp in tps]):
            if any((await probe.getmany(timeout_ms=500)).values()):
                return False
        return True
    finally:
        await probe.stop()


async def _strike(bus: KafkaBus, victim: subprocess.Popen, chaos: str) -> float | None:
    """Half-way through the scenario: once the rack tier has committed all of its first half
    (so every partition with input has a checkpoint), kill or freeze `victim`. The second
    half lands on its partitions too, so the others must take them over from its checkpoints
    (struck once it had finished its own input, it would leave them nothing to take). Returns
    when it was frozen (time.monotonic), for a freeze."""
    so_far = await bus.ends(RACK_INPUTS)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while True:
        rack = await _committed(bus, "detect")
        if all(rack.get(tp, 0) >= end for tp, end in so_far.items() if end > 0):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the detect processes did not take the first half of the scenario within "
                               f"{JOIN_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.5)
    victim.send_signal(signal.SIGKILL if chaos == "kill" else signal.SIGSTOP)
    log.info("eval: %s detect process %d half-way through the scenario", "killed" if chaos == "kill" else "froze",
             victim.pid)
    return time.monotonic() if chaos == "freeze" else None


async def _consumed(bus: KafkaBus, produced: dict[TopicPartition, int], victim: subprocess.Popen | None,
                    frozen_at: float | None) -> None:
    """Until both tiers have committed everything (the rack tier all that was produced, the
    site tier every summary); a frozen `victim` goes on (SIGCONT) FREEZE_S after it froze."""
    total = sum(produced.values())
    while True:
        await asyncio.sleep(1.0)
        rack = await _committed(bus, "detect")
        done = sum(min(rack.get(tp, 0), end) for tp, end in produced.items())
        if frozen_at is not None and time.monotonic() - frozen_at >= FREEZE_S:
            victim.send_signal(signal.SIGCONT)
            frozen_at = None
            log.info("eval: detect process %d goes on (SIGCONT) after %.0f s frozen", victim.pid, FREEZE_S)
        if done < total or frozen_at is not None:
            continue
        site = await _committed(bus, "detect-site")
        if await _nothing_after(bus, site, Topic.RACKS) and await _nothing_after(bus, rack, Topic.EVENTS):
            return


async def _alerts(bus: KafkaBus) -> list[dict[str, Any]]:
    """Every alert change on the alerts topic, as the in-process run records them."""
    reader = AIOKafkaConsumer(isolation_level="read_committed", enable_auto_commit=False, **bus.client_settings)
    await reader.start()
    names = {spec.name for spec in DETECTOR_ALERTS}
    alerts: list[dict[str, Any]] = []
    firing: dict[str, dict[str, Any]] = {}
    try:
        tps = sorted(await bus.partitions([Topic.ALERTS]))
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        ends = await reader.end_offsets(tps)
        rows: list[dict[str, Any]] = []
        while any([await reader.position(tp) < ends[tp] for tp in tps]):
            for tp, records in (await reader.getmany(timeout_ms=1000)).items():
                for rec in records:
                    if any(k == HEARTBEAT for k, _ in rec.headers or ()):
                        continue
                    batch = bus.decoder.decode(rec.value, rec.headers)
                    batch = pa.RecordBatch.from_arrays(
                        [c.cast(pa.timestamp("us", tz="UTC")) if pa.types.is_timestamp(c.type) else c
                         for c in batch.columns], names=batch.schema.names)
                    rows.extend(batch.to_pylist())
        rows.sort(key=lambda r: r["ts"])  # an alert's changes are in order (one key); across alerts by time
        for r in rows:
            labels = json.loads(r["labels_json"])
            if labels.get("alertname") not in names:
                continue
            if r["status"] == "firing":
                firing[r["fingerprint"]] = {"labels": labels, "starts_at": r["starts_at"], "ends_at": None,
                                            "remediation": r["remediation"]}
                alerts.append(firing[r["fingerprint"]])
            elif r["fingerprint"] in firing:
                firing.pop(r["fingerprint"])["ends_at"] = r["ends_at"]
    finally:
        await reader.stop()
    return alerts
