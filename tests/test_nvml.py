"""The NVML agent, running its real pynvml-calling code against a recorded H100
(pipeline/sources/recordings/h100, replayed by sources/nvml_replay.py): what it collects, what it
leaves null, its events, lost GPUs, GPU resets, and a host without a driver.

The end-to-end tests (processes, brokers, tmpfs) are in tests/e2e/test_nvml.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pynvml
import pytest

from pipeline.bus import Message, Topic
from pipeline.detect.engine import Engine
from pipeline.sources.nvml import FIELDS, NvmlAgent, events_batch
from pipeline.sources.nvml_replay import NvmlReplay
from tests.conftest import H100, make_config

TRACE = [json.loads(line) for line in (H100 / "h100_load_trace.jsonl").read_text().splitlines()]


def agent(**cfg) -> NvmlAgent:
    return NvmlAgent(make_config(agent=cfg).agent, "node-1")


async def run_agent(a: NvmlAgent, seconds: float, during=None) -> tuple[list[pa.RecordBatch], list[dict], list[float]]:
    """Run the agent's async face for `seconds`; collect what it publishes (with the
    time each event arrived) and the event loop's lag, probed every 5 ms."""
    samples, events, lags = [], [], []

    async def publish_samples(batch):
        samples.append(batch)

    async def publish_events(batch):
        events.extend(r | {"arrived": time.monotonic()} for r in batch.to_pylist())

    async def probe(stop):
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - t - 0.005)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(a.run(publish_samples, publish_events, stop)), asyncio.create_task(probe(stop))]
    if during is not None:
        await during()
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    return samples, events, lags


def test_unsupported_fields_are_asked_once_and_nvml_stays_off_the_event_loop():
    replay = NvmlReplay(H100, gpus=8)
    with replay.installed():
        a = agent(interval_s=0.05)
        samples, _, lags = asyncio.run(run_agent(a, 1.5))
    scrapes = a.scrapes
    assert scrapes >= 2
    nvlink = pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL
    assert replay.field_requests[nvlink] == 8  # once per GPU: NOT_SUPPORTED is remembered
    assert all(replay.field_requests[f] == 8 * scrapes for f in FIELDS if f != nvlink)
    assert all(g.unsupported == [f"field {nvlink} (nvlink_crc_errors_total)"] for g in a.gpus)
    assert threading.main_thread().name not in replay.threads  # every NVML call ran in a worker thread
    assert replay.threads == {"nvml-scrape", "nvml-events"}
    lag_p99 = float(np.percentile(lags, 99)) * 1000
    print(f"8 replayed GPUs, {scrapes} scrapes: event loop lag p99 {lag_p99:.1f} ms over {len(lags)} probes")
    assert sum(b.num_rows for b in samples) == 8 * scrapes


def test_an_xid_is_published_at_once_not_at_the_next_scrape():
    replay = NvmlReplay(H100, gpus=8)
    with replay.installed():
        a = agent(interval_s=30.0)  # one scrape at start, the next one long after the test

        async def inject():
            await asyncio.sleep(0.5)
            replay.xid(3, 79)
        _, events, _ = asyncio.run(run_agent(a, 1.5, inject))
    started, event, stopping = events  # (the agent's own: it started, reading every 30 s; it stops on request)
    assert (event["kind"], event["code"], event["gpu"]) == ("xid", 79, 3)
    assert event["gpu_uuid"] == a.gpus[3].uuid and event["node"] == "node-1"
    assert a.scrapes == 1  # the only scrape was at start: the event did not wait for the next one
    assert (started["kind"], started["code"], started["gpu"], started["node"]) == ("collector_started", 30_000, None,
                                                                                   "node-1")
    assert (stopping["kind"], stopping["gpu_uuid"]) == ("collector_stopping", None)


def test_a_lost_gpu_becomes_an_event_and_its_samples_stop():
    cfg = make_config(agent={"interval_s": 0.05})
    replay = NvmlReplay(H100, gpus=8, latency=False)
    with replay.installed():
        a = NvmlAgent(cfg.agent, "node-1")
        a.open()
        first = a.scrape()
        replay.lose(2)   # NVML_ERROR_GPU_IS_LOST
        replay.vanish(5)  # drops out of the device count
        second, third = a.scrape(), a.scrape()
    assert first.samples.num_rows == 8 and not first.events
    lost = sorted((e["gpu"], e["kind"], e["text"]) for e in second.events)
    assert lost == [(2, "gpu_lost", "NVML: GPU is lost (NVML_ERROR_GPU_IS_LOST)"),
                    (5, "gpu_lost", "NVML: GPU is lost (no longer in the device count)")]
    assert sorted(second.samples.column("gpu").to_pylist()) == [0, 1, 3, 4, 6, 7]
    assert third.samples.num_rows == 6 and not third.events  # reported once, then silent

    engine = Engine(cfg)
    out = engine.process(Message(Topic.EVENTS, events_batch(second.events)))
    assert sorted((a.alertname, a.labels["gpu"]) for _, a in out.alerts) == [("GpuFellOffBus", "2"),
                                                                            ("GpuFellOffBus", "5")]


def test_nvml_s_no_value_answers_are_no_readings_and_unknown_reason_bits_cost_no_known_one():
    """A board without a slowdown threshold answers 0xFFFFFFFF, an unknown P-state 32, a counter NVML cannot read
    ULLONG_MAX, a newer driver a reason bit this code does not know: they had been served as a 4294967295 C
    threshold, read as P32, and the counter's past int64 (or a reason bit past 2**53) had ended the agent, every
    GPU's telemetry with it."""
    replay = NvmlReplay(H100, gpus=3, latency=False)
    # GPU 1 answers as such a board and driver do
    answers = {"nvmlDeviceGetTemperatureThreshold": 2 ** 32 - 1, "nvmlDeviceGetPerformanceState": 32,
               "nvmlDeviceGetCurrentClocksEventReasons": 0x8 | 1 << 60}
    field_values = replay.nvmlDeviceGetFieldValues

    def odd_fields(handle, ids):
        out = field_values(handle, ids)
        if replay._find(handle).index == 1:
            for fv in out:
                if fv.fieldId == pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL and fv.nvmlReturn == pynvml.NVML_SUCCESS:
                    fv.value.ullVal = 2 ** 64 - 1
        return out
    replay.nvmlDeviceGetFieldValues = odd_fields
    for name, value in answers.items():
        real = getattr(replay, name)
        setattr(replay, name, lambda handle, *a, real=real, value=value:
                value if replay._find(handle).index == 1 else real(handle, *a))
    with replay.installed():
        a = NvmlAgent(make_config().agent, "node-1")
        a.open()
        a.scrape()
        rows = {r["gpu"]: r for r in a.scrape().samples.to_pylist()}
    odd, sane = rows[1], rows[0]
    assert (odd["slowdown_temp_c"], odd["pstate"], odd["ecc_sbe_volatile_total"]) == (None, None, None)
    assert odd["clock_event_reasons"] == 0x8  # HW slowdown kept, the unknown bit left out
    assert sane["slowdown_temp_c"] == 89.0 and sane["pstate"] is not None


def test_a_gpu_reset_is_an_event_and_not_a_negative_rate():
    """A reset zeroes the energy and error counters: the agent says so, the counters
    restart in the archive, and no rate detector fires on the drop."""
    cfg = make_config(agent={"interval_s": 0.05})
    replay = NvmlReplay(H100, gpus=8, latency=False)
    engine = Engine(cfg)
    batches, events = [], []
    with replay.installed():
        a = NvmlAgent(cfg.agent, "node-1")
        a.open()
        for i in range(40):
            if i == 20:
                replay.reset(4)
            s = a.scrape()
            batches.append(s.samples)
            events += s.events
            assert engine.process(Message(Topic.GPU, s.samples)).alerts == []
            if s.events:
                assert engine.process(Message(Topic.EVENTS, events_batch(s.events))).alerts == []
    [reset] = events
    assert (reset["kind"], reset["gpu"]) == ("gpu_reset", 4) and "went back" in reset["text"]
    energy = pa.Table.from_batches(batches).filter(pa.compute.equal(pa.Table.from_batches(batches)["gpu"], 4))
    e = energy["energy_j"].to_numpy()
    assert (np.diff(e) < 0).sum() == 1 and e[20] < 100  # one drop, to (near) zero


def test_eight_replayed_gpus_out_of_step_raise_no_alert():
    """Real dynamics as peers: each replayed H100 is at its own point of the recorded
    load (idle, ramp, 700 W, cooldown) while its siblings are at others, for the whole
    trace. Loads starting and stopping on single GPUs are normal: no alert."""
    cfg = make_config()
    replay = NvmlReplay(H100, gpus=8, latency=False)
    engine = Engine(cfg)
    with replay.installed():
        a = NvmlAgent(cfg.agent, "node-1")
        a.open()
        t0 = 1.8e9
        for i in range(len(TRACE)):
            s = a.scrape()
            ts = pa.array(np.full(s.samples.num_rows, int((t0 + 0.1 * i) * 1e9)), pa.int64())  # the trace's 10 Hz
            batch = s.samples.set_column(0, "ts", ts.cast(s.samples.schema.field("ts").type))
            fired = [x.annotations["summary"] for _, x in engine.process(Message(Topic.GPU, batch)).alerts]
            assert fired == [], f"scrape {i}: {fired}"
    assert engine.stats.gpu_samples == 8 * len(TRACE)


def test_the_job_mapping_directory_names_each_gpus_jobs_as_the_scheduler_writes_them(tmp_path, caplog):
    """agent.job_mapping_dir is dcgm-exporter's --hpc-job-mapping-dir: a file per GPU index
    that the scheduler's prolog writes (one job per line) and its epilog removes. Each sample
    carries its GPU's jobs; a missing directory is said once and costs no sample."""
    jobs = tmp_path / "dcgm-job-map"
    jobs.mkdir()
    (jobs / "0").write_text("4242\n")
    (jobs / "1").write_text("4242\n4250\n\n")  # two jobs share GPU 1
    (jobs / "notes.txt").write_text("not a GPU\n")
    replay = NvmlReplay(H100, gpus=4, latency=False)
    with replay.installed():
        a = agent(job_mapping_dir=str(jobs))
        a.open()
        first = a.scrape().samples.column("job").to_pylist()
        (jobs / "0").unlink()                 # the epilog: job 4242 ended on GPU 0
        (jobs / "3").write_text("4300\n")     # the prolog: job 4300 got GPU 3
        second = a.scrape().samples.column("job").to_pylist()
        jobs.rename(tmp_path / "gone")
        with caplog.at_level("WARNING", logger="pipeline.sources.job_mapping"):
            third, fourth = a.scrape().samples, a.scrape().samples
    assert first == ["4242", "4242,4250", None, None]
    assert second == [None, "4242,4250", None, "4300"]
    assert third.num_rows == fourth.num_rows == 4 and third.column("job").null_count == 4
    said = [r.getMessage() for r in caplog.records if "job mapping" in r.getMessage()]
    assert len(said) == 1 and "agent.job_mapping_dir" in said[0] and str(jobs) in said[0]


def test_without_a_job_mapping_the_agents_samples_name_no_job():
    replay = NvmlReplay(H100, gpus=2, latency=False)
    with replay.installed():
        a = agent()
        a.open()
        assert a.scrape().samples.column("job").to_pylist() == [None, None]


def test_the_slurm_prolog_and_epilog_shipped_name_each_gpus_jobs_for_the_agent(tmp_path):
    """deploy/slurm/fleetwatch-job-map, run by slurmd as Prolog and Epilog with the job's
    environment, keeps the directory the agent reads (agent.job_mapping_dir)."""
    script = Path(__file__).resolve().parent.parent / "deploy" / "slurm" / "fleetwatch-job-map"
    jobs = tmp_path / "dcgm-job-map"

    def job_env(context: str, job: str, gpus: str) -> dict[str, str]:
        """What slurmd gives a Prolog or Epilog (and where the map is)."""
        return {"PATH": os.environ["PATH"], "FLEETWATCH_JOB_MAP_DIR": str(jobs), "SLURM_SCRIPT_CONTEXT": context,
                "SLURM_JOB_ID": job} | ({"SLURM_JOB_GPUS": gpus} if gpus else {})

    def slurmd(context: str, job: str, gpus: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(script)], env=job_env(context, job, gpus), capture_output=True, text=True,
                              timeout=30)

    replay = NvmlReplay(H100, gpus=4, latency=False)
    with replay.installed():
        a = agent(job_mapping_dir=str(jobs))
        a.open()
        seen = []
        for context, job, gpus in (("prolog_slurmd", "4242", "0,1"), ("prolog_slurmd", "4243", "1"),
                                   ("prolog_slurmd", "4243", "1"),  # a prolog run twice: one line
                                   ("epilog_slurmd", "4242", "0,1"),
                                   ("epilog_slurmd", "4243", ""),  # an Epilog Slurm gives no SLURM_JOB_GPUS
                                   ("epilog_slurmd", "4243", "1")):
            assert slurmd(context, job, gpus).returncode == 0
            seen.append(a.scrape().samples.column("job").to_pylist())
    assert seen == [["4242", "4242", None, None], ["4242", "4242,4243", None, None],
                    ["4242", "4242,4243", None, None], [None, "4243", None, None],
                    [None, None, None, None], [None, None, None, None]]
    assert [p.name for p in jobs.iterdir()] == [".lock"]  # nothing left behind but the lock
    alone = slurmd("", "1", "0")  # not run by slurmd: says so, and never fails a job
    assert alone.returncode == 0 and "Prolog or Epilog" in alone.stderr

    # Jobs that share a GPU start and end together: every prolog's line lands, every epilog's goes.
    def together(context: str) -> None:
        runs = [subprocess.Popen([str(script)], env=job_env(context, str(j), "0,1")) for j in range(100, 112)]
        assert [r.wait(timeout=60) for r in runs] == [0] * len(runs)
    for _ in range(3):
        together("prolog_slurmd")
        assert [sorted((jobs / g).read_text().split()) for g in ("0", "1")] == [[str(j) for j in range(100, 112)]] * 2
        together("epilog_slurmd")
        assert not (jobs / "0").exists() and not (jobs / "1").exists()


def test_the_replay_plays_at_the_recorded_speed_at_an_interval_of_part_rows():
    """0.25-s scrapes of the 10 Hz trace: 2.5 rows a scrape, played as 2, 3, 2, 3 (it had rounded
    to 2, and the trace ran 20% slow); 1-s scrapes: 10 rows each."""
    for interval_s, want in ((0.25, [1, 4, 6, 9, 11, 14]), (1.0, [9, 19, 29])):
        replay = NvmlReplay(H100, gpus=1, latency=False, interval_s=interval_s)
        with replay.installed():
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            got = []
            for _ in want:
                pynvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_POWER_AVERAGE])
                got.append(pynvml.nvmlDeviceGetPowerUsage(handle))
            pynvml.nvmlShutdown()
        assert got == [TRACE[row]["power_mw"] for row in want], interval_s


# ---- what real NVML answers that the recording does not ------------------------------------------

def clocked_agent(**cfg) -> tuple[NvmlAgent, list[float]]:
    """An agent on a clock the test moves (`clock[0] += seconds`): when it looks for lost GPUs again,
    and asks again what was not supported."""
    clock = [1000.0]
    a = agent(**cfg)
    a.clock = lambda: clock[0]
    return a, clock


def _scrapes(a: NvmlAgent, n: int) -> list:
    return [a.scrape() for _ in range(n)]


def test_an_unexpected_nvml_error_is_one_gpus_never_the_agents(caplog):
    """NVML_ERROR_UNKNOWN from one call of one GPU nulls that value; a GPU whose reads fail
    (RESET_REQUIRED from its batched field call) gives no row; the others go on, each error
    said once, and the GPU is read again when it answers."""
    replay = NvmlReplay(H100, gpus=8, latency=False)
    with replay.installed(), caplog.at_level("INFO", logger="pipeline.sources.nvml"):
        a = agent()
        a.open()
        replay.fail(1, "nvmlDeviceGetTemperature", pynvml.NVML_ERROR_UNKNOWN)
        replay.fail(5, "nvmlDeviceGetFieldValues", pynvml.NVML_ERROR_RESET_REQUIRED)
        failing = _scrapes(a, 3)
        replay.fail(1, "nvmlDeviceGetTemperature", None)
        replay.fail(5, "nvmlDeviceGetFieldValues", None)
        back = a.scrape()
    for s in failing:
        rows = {r["gpu"]: r for r in s.samples.to_pylist()}
        assert sorted(rows) == [0, 1, 2, 3, 4, 6, 7] and not s.events
        assert rows[1]["gpu_temp_c"] is None and rows[1]["power_w"] > 0 and rows[0]["gpu_temp_c"] > 0
    assert back.samples.num_rows == 8 and back.samples.to_pylist()[1]["gpu_temp_c"] > 0
    said = caplog.text
    assert said.count("nvmlDeviceGetTemperature") == 0  # (the call's name in the agent is "temperature")
    assert said.count("temperature answers NVMLError_Unknown (999)") == 1
    assert said.count("NVML answers NVMLError_ResetRequired (16): no samples from it") == 1
    assert "GPU 5 (" in said and "answers again (after NVMLError_ResetRequired (16))" in said
    assert "temperature answers again" in said


def test_an_a100_or_a_driver_before_r535_reads_power_and_clock_reasons_the_older_way():
    """GA100 has no NVML_FI_DEV_POWER_AVERAGE (power was null on every A100): the power comes from
    nvmlDeviceGetPowerUsage; a driver before R535 lacks nvmlDeviceGetCurrentClocksEventReasons
    (every scrape had failed): the clocks throttle reasons say the same bits."""
    replay = NvmlReplay(H100, gpus=2, latency=False)
    replay.field_errors[pynvml.NVML_FI_DEV_POWER_AVERAGE] = pynvml.NVML_ERROR_NOT_SUPPORTED
    replay.missing.add("nvmlDeviceGetCurrentClocksEventReasons")
    with replay.installed():
        a = agent()
        a.open()
        rows = [r for s in _scrapes(a, 3) for r in s.samples.to_pylist()]
    assert all(r["power_w"] is not None and r["power_w"] > 0 for r in rows)
    assert all(r["clock_event_reasons"] is not None for r in rows)
    assert replay.calls["nvmlDeviceGetPowerUsage"] == 6
    assert replay.field_requests[pynvml.NVML_FI_DEV_POWER_AVERAGE] == 2  # asked once per GPU, then the call


def test_the_event_thread_does_not_spin_on_a_lost_gpu_nor_die_on_an_error():
    """A real driver answers a wait with GPU_IS_LOST at once while a lost GPU is in the set (it had
    spun: 533,000 waits in 0.5 s); any other error had ended the thread, and XIDs with it."""
    replay = NvmlReplay(H100, gpus=4, latency=False)
    with replay.installed():
        a = agent(interval_s=0.2)

        async def script():
            await asyncio.sleep(0.3)
            replay.lose(2)
            await asyncio.sleep(1.0)  # the scrape names it: a set without it
            replay.xid(1, 31)
            await asyncio.sleep(0.5)
            replay.failures[(None, "nvmlEventSetWait_v2")] = pynvml.NVML_ERROR_UNKNOWN  # (any set)
            await asyncio.sleep(0.3)
            del replay.failures[(None, "nvmlEventSetWait_v2")]
            replay.xid(3, 43)
        _, events, _ = asyncio.run(run_agent(a, 2.5, script))
    got = [(e["kind"], e["gpu"], e["code"]) for e in events]
    assert ("gpu_lost", 2, None) in got and ("xid", 1, 31) in got and ("xid", 3, 43) in got
    assert replay.calls["nvmlEventSetWait_v2"] < 60  # 500-ms waits, a second apart while lost: no spin


def test_a_gpu_nvml_cannot_open_at_start_is_left_out_then_read_once_it_opens(caplog):
    replay = NvmlReplay(H100, gpus=4, latency=False)
    with replay.installed(), caplog.at_level("INFO", logger="pipeline.sources.nvml"):
        a, clock = clocked_agent()
        replay.fail(2, "nvmlDeviceGetHandleByIndex", pynvml.NVML_ERROR_UNKNOWN)
        a.open()
        first = a.scrape()
        replay.fail(2, "nvmlDeviceGetHandleByIndex", None)
        clock[0] += 61.0
        later = a.scrape()
    assert sorted(first.samples.column("gpu").to_pylist()) == [0, 1, 3] and a.unopened == {}
    assert sorted(later.samples.column("gpu").to_pylist()) == [0, 1, 2, 3]
    assert "GPU 2: NVML cannot open it (NVMLError_Unknown (999))" in caplog.text and "opens now" in caplog.text


def test_a_lost_gpu_that_answers_again_is_read_again_under_its_new_handle():
    replay = NvmlReplay(H100, gpus=4, latency=False)
    with replay.installed():
        a, clock = clocked_agent()
        a.open()
        a.scrape()
        replay.lose(1)
        lost = a.scrape()
        replay.recover(1)  # reset: it answers again, under a new handle
        clock[0] += 30.0
        still = a.scrape()  # not looked for yet
        clock[0] += 31.0
        back = a.scrape()
    assert [e["kind"] for e in lost.events] == ["gpu_lost"] and lost.samples.num_rows == 3
    assert still.samples.num_rows == 3
    assert back.samples.num_rows == 4 and not back.events and a.lost == set()


@pytest.mark.parametrize("energy", [None, pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_NO_PERMISSION])
def test_a_reset_gpu_gets_its_cap_again(energy):
    """A reset puts a GPU's power limit back to its default: the agent's cap had silently gone,
    while the agent and the power role held it as set. A reset is seen by the energy counter going
    back; a GPU without a readable one (an older, a consumer or a virtual GPU) had run uncapped while
    its cap was reported held: its limit read back at its own limit from before the cap is the reset."""
    replay = NvmlReplay(H100, gpus=2, latency=False, settle_s=0.0, enforce_lag_s=0.0)
    if energy is not None:
        replay.field_errors[pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION] = energy
    with replay.installed():
        a = agent()
        a.open()
        a.scrape()
        assert a.power.apply(0, 500.0).status == "ok"
        a.scrape()
        replay.reset(0)
        assert pynvml.nvmlDeviceGetEnforcedPowerLimit(a.gpus[0].handle) == replay.powercap["default_mw"]
        s = a.scrape()
        enforced = pynvml.nvmlDeviceGetEnforcedPowerLimit(a.gpus[0].handle)
        untouched = pynvml.nvmlDeviceGetEnforcedPowerLimit(a.gpus[1].handle)  # (never capped: nothing set)
    assert [e["kind"] for e in s.events] == (["gpu_reset"] if energy is None else [])
    assert enforced == 500_000 and a.power.capped == {0: 500.0}
    assert [(r.gpu, r.status) for r in a.recapped] == [(0, "ok")] and untouched == replay.powercap["default_mw"]


def test_a_gpu_still_lost_stays_lost_whose_fields_say_so_in_their_return_codes(caplog):
    """A lost GPU whose batched field call succeeds with GPU_IS_LOST in each field: the look for it again had
    taken it for back every minute (11 gpu_lost events in 10 minutes, its cap set again each time)."""
    replay = NvmlReplay(H100, gpus=2, latency=False, settle_s=0.0, enforce_lag_s=0.0)
    fields, lost = replay.nvmlDeviceGetFieldValues, [False]

    def field_values(handle, ids):
        out = fields(handle, ids)
        if lost[0] and replay._find(handle).index == 1:
            for fv in out:
                fv.nvmlReturn = pynvml.NVML_ERROR_GPU_IS_LOST
        return out
    replay.nvmlDeviceGetFieldValues = field_values
    with replay.installed(), caplog.at_level("WARNING", logger="pipeline.sources.nvml"):
        a, clock = clocked_agent()
        a.open()
        a.scrape()
        lost[0] = True
        events = []
        for _ in range(40):
            clock[0] += 15
            events += [e["kind"] for e in a.scrape().events]
    assert events == ["gpu_lost"] and not any("answers again" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("gone", [pynvml.NVML_ERROR_UNINITIALIZED, pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
def test_a_driver_that_goes_away_ends_the_agent_to_be_started_again(gone):
    """A driver reloaded under a running agent (an upgrade): its NVML session never answers again, and every
    scrape had been empty, for good, until someone restarted it. It ends with NvmlDriverNotLoaded (exit 75:
    systemd or Kubernetes start it again, and it opens NVML afresh)."""
    from pipeline.sources.nvml import NvmlDriverNotLoaded
    replay = NvmlReplay(H100, gpus=2, latency=False)
    with replay.installed():
        a = agent()
        a.open()
        assert a.scrape().samples.num_rows == 2

        def driver_gone(*args):
            raise pynvml.NVMLError(gone)
        pynvml.nvmlDeviceGetCount = driver_gone
        with pytest.raises(NvmlDriverNotLoaded, match="the driver went away"):
            a.scrape()


def test_a_cap_whose_request_ended_while_its_gpu_was_lost_is_not_set_again_when_it_comes_back():
    """The restore its lease asked for answered gpu_lost; the GPU came back, and the agent set the ended
    request's cap again (a cap had outlived its request until the next retry)."""
    replay = NvmlReplay(H100, gpus=2, latency=False, settle_s=0.0, enforce_lag_s=0.0)
    with replay.installed():
        a, clock = clocked_agent()
        a.open()
        a.scrape()
        assert a.power.apply(0, 500.0).status == "ok"
        replay.lose(0)
        a.scrape()
        assert [r.status for r in a.power.set_many([(0, None)])] == ["gpu_lost"]  # the request is over
        replay.reset(0)
        replay.recover(0)
        clock[0] += 61.0  # (when the agent looks for lost GPUs again)
        a.scrape()
        enforced = pynvml.nvmlDeviceGetEnforcedPowerLimit(a.gpus[0].handle)
    assert enforced == replay.powercap["default_mw"] and a.power.capped == {}
    assert [(r.gpu, r.status) for r in a.recapped] == [(0, "restored")]


def test_a_gpu_that_comes_to_the_count_after_the_start_is_read_and_capped_as_itself():
    """A board back under a new UUID (an RMA's hot replace), or one absent from the device count at start and
    back after a reset: never read until a restart. And a GPU found later at an index the indices moved onto
    one the agent had: a cap asked for it by its UUID had set the other's limit."""
    from pipeline.sources.nvml_power import NvmlCaps
    replay = NvmlReplay(H100, gpus=4, latency=False, settle_s=0.0, enforce_lag_s=0.0)
    replay.vanish(3)  # absent at start
    with replay.installed():
        a, clock = clocked_agent()
        a.open()
        assert a.scrape().samples.num_rows == 3
        replay.lose(0)  # GPU ...01 falls off the bus: the indices move, ...04 comes to the count at index 2
        replay.vanish(0)
        replay.recover(3)
        a.scrape()
        clock[0] += 61.0
        rows = a.scrape().samples.to_pylist()
        assert sorted(r["gpu_uuid"][-2:] for r in rows) == ["02", "03", "04"]
        assert len({g.index for g in a.gpus}) == len(a.gpus)  # one index per GPU
        new = next(g for g in replay.gpus if g.uuid.endswith("04"))
        other = next(g for g in replay.gpus if g.uuid.endswith("03"))
        (result,) = NvmlCaps(a, "site-a", "rack-0")._apply([new.uuid], [450.0])
    assert result.gpu_uuid == new.uuid and result.status == "ok"
    assert (new.limit_mw, other.limit_mw) == (450_000, replay.powercap["default_mw"])


def test_a_gpu_held_at_its_own_limit_and_reset_is_not_taken_for_one_whose_request_ended():
    """A cap at the GPU's own limit holds it there, no lower: reset, it had been taken for a GPU whose request
    ended while it was lost (a restore reported, the GPU forgotten while its request went on)."""
    replay = NvmlReplay(H100, gpus=1, latency=False, settle_s=0.0, enforce_lag_s=0.0)
    with replay.installed():
        a = agent()
        a.open()
        a.scrape()
        assert a.power.apply(0, 700.0).status == "ok"
        replay.reset(0)
        a.scrape()
    assert a.recapped == [] and not a.power.owed(0)


def test_what_was_not_supported_is_asked_again_later(caplog):
    """A GPU in MIG mode answers utilisation NOT_SUPPORTED; taken out of it, it answers again,
    which the agent had never asked again."""
    replay = NvmlReplay(H100, gpus=1, latency=False)
    with replay.installed(), caplog.at_level("INFO", logger="pipeline.sources.nvml"):
        a, clock = clocked_agent()
        a.open()
        replay.fail(0, "nvmlDeviceGetUtilizationRates", pynvml.NVML_ERROR_NOT_SUPPORTED)
        before = [s.samples.to_pylist()[0]["util_gpu"] for s in _scrapes(a, 3)]
        replay.fail(0, "nvmlDeviceGetUtilizationRates", None)
        asked = replay.failed["nvmlDeviceGetUtilizationRates"]
        clock[0] += 601.0
        after = a.scrape().samples.to_pylist()[0]["util_gpu"]
    assert before == [None] * 3 and asked == 1 and after is not None
    assert caplog.text.count("utilization is not supported") == 1 and "utilization answers now" in caplog.text


def test_a_capped_gpu_lost_then_back_enforces_its_cap_and_its_restore_reaches_it():
    """Lost, reset and back: its cap had silently gone (the agent still believed it held). Lost,
    a restore answered gpu_lost, and back without a reset: it kept the cap for good, held by no one;
    now it is restored as it comes back (its request is over)."""
    replay = NvmlReplay(H100, gpus=2, latency=False, settle_s=0.0, enforce_lag_s=0.0)
    with replay.installed():
        a, clock = clocked_agent()
        a.open()
        a.scrape()
        assert a.power.apply(0, 500.0).status == "ok" and a.power.apply(1, 500.0).status == "ok"
        a.scrape()
        replay.lose(0), replay.lose(1)
        a.scrape()
        assert a.power.restore(1).status == "gpu_lost"  # (the request ended while it was lost)
        replay.reset(0)  # GPU 0 comes back reset (its limit the default), GPU 1 as it was (still 500 W)
        replay.recover(0), replay.recover(1)
        clock[0] += 61.0
        a.scrape()
        enforced = [pynvml.nvmlDeviceGetEnforcedPowerLimit(g.handle) for g in a.gpus]
        back = a.power.restore(1)
        after = pynvml.nvmlDeviceGetEnforcedPowerLimit(a.gpus[1].handle)
    assert enforced == [500_000, 700_000] and a.power.capped == {0: 500.0}
    assert back.status == "restored" and after == replay.powercap["default_mw"]


def test_a_gpu_unopened_at_start_is_found_when_the_indices_move():
    """Looked for by its index: another GPU dropping out moved it to another index, and it was
    never looked for again."""
    replay = NvmlReplay(H100, gpus=4, latency=False)
    with replay.installed():
        a, clock = clocked_agent()
        replay.fail(2, "nvmlDeviceGetHandleByIndex", pynvml.NVML_ERROR_UNKNOWN)
        a.open()
        replay.fail(2, "nvmlDeviceGetHandleByIndex", None)
        replay.vanish(0)  # GPU 2 is index 1 now
        a.scrape()
        clock[0] += 61.0
        a.scrape()
    assert sorted(g.uuid[-2:] for g in a.gpus) == ["01", "02", "03", "04"] and a.unopened == {}


def test_an_nvml_call_that_hangs_is_named_and_ends_the_agent_leaving_its_caps_to_the_ledger(tmp_path, caplog):
    """A GPU falling off the bus can hang an NVML call in the driver. The agent had waited on it for
    ever (its supervisor killed it on /healthz with nothing said), and a stop then waited on it too (the
    caps' restore queued behind it). Now the call is named (which GPU, what) and the agent ends with
    NvmlHung (status 75: started again); close() does not wait on the call, and says that the caps it
    holds stay until the next agent restores them from the ledger, which still names them."""
    from pipeline.sources.nvml import NvmlHung
    replay = NvmlReplay(H100, gpus=2, latency=False, settle_s=0.0, enforce_lag_s=0.0)
    entered, release = threading.Event(), threading.Event()
    with replay.installed():
        a = NvmlAgent(make_config(agent={"interval_s": 0.05}).agent, "node-1", tmp_path)
        clock = [1000.0]
        a.clock = lambda: clock[0]
        answering = pynvml.nvmlDeviceGetTemperature

        async def scenario():
            published = asyncio.Event()

            async def publish_samples(batch):
                published.set()

            async def publish_events(batch):
                pass
            run = asyncio.create_task(a.run(publish_samples, publish_events, asyncio.Event()))
            await published.wait()
            assert (await a.on_nvml_thread(a.power.apply, 0, 500.0)).status == "ok"

            def hangs_on_gpu_1(handle, sensor):
                if handle is a.gpus[1].handle:
                    entered.set()
                    release.wait()
                return answering(handle, sensor)
            pynvml.nvmlDeviceGetTemperature = hangs_on_gpu_1
            await asyncio.to_thread(entered.wait)
            clock[0] += 31.0  # (the call has not answered for 31 s)
            with pytest.raises(NvmlHung) as hung:
                await asyncio.wait_for(run, 60)  # (a guard: it ends at the next look, a second away)
            return str(hung.value)
        try:
            said = asyncio.run(scenario())
            ledger = json.loads((tmp_path / "power-limits.json").read_text())
        finally:
            release.set()
    assert f"NVML has not answered for 31 s (reading GPU 1 ({a.gpus[1].uuid}))" in said
    assert "status 75" in said and "dmesg" in said
    assert list(ledger["own_w"]) == [a.gpus[0].uuid]  # the next agent restores GPU 0 from it
    stays = [r.getMessage() for r in caplog.records if "not restored at shutdown" in r.getMessage()]
    assert len(stays) == 1 and "GPUs [0]" in stays[0] and "power-limits.json" in stays[0]
