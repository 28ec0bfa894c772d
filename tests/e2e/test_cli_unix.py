"""End-to-end: `fleetwatch` processes as Unix users drive them: pipes, signals, bad flags (moved from
tests/test_cli_unix.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import polars as pl

from pipeline.model import Alert
from tests.conftest import fleetwatch


QUIET_PIPE = (0, 141)  # done, or ended like a Unix tool whose reader went away (128 + SIGPIPE)


FAST = {"FLEETWATCH_FLEET__SPEED": "20", "FLEETWATCH_FLEET__RACKS": "2", "FLEETWATCH_ARCHIVE__FLUSH_INTERVAL_S": "1",
        "FLEETWATCH_ARCHIVE__UPKEEP_INTERVAL_S": "0"}  # (as tests/helpers.FAST)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")}


def start(tmp_path: Path, env: dict | None = None, **popen) -> subprocess.Popen:
    """The daemon as a service manager starts it: SIGHUP at its default, whatever the test runner inherited
    (under `nohup` it is ignored, and the daemon keeps ignoring it)."""
    popen.setdefault("preexec_fn", lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--data-dir", str(tmp_path / "data")],
                            cwd=tmp_path, env=_env() | FAST | (env or {}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def wait_for(predicate, timeout: float = 120.0) -> None:
    """Poll until predicate() holds (the timeout only keeps a broken daemon from hanging the tests)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def archived_rows(data: Path) -> int:
    return pl.scan_parquet(data / "archive" / "gpu_samples", hive_partitioning=True).select(pl.len()).collect().item()


def reported_samples(stderr: str) -> int:
    return int(re.search(r"stopped after [\d.]+ s: (\d+) GPU samples", stderr).group(1))


def closed_reader(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the command with its stdout a pipe whose reader has already gone."""
    r, w = os.pipe()
    p = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=_env(), stdout=w,
                         stderr=subprocess.PIPE, text=True)
    os.close(w)
    os.close(r)
    _, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, "", err)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data_dir with alerts and a silence, as a daemon and an operator leave it."""
    now = datetime.now(timezone.utc)
    lines = []
    for i in range(40):
        a = Alert({"alertname": "GpuXid", "severity": "critical", "site": "site-a", "rack": "r01",
                   "node": f"r01-n{i:02d}", "gpu": "0"}, {"summary": f"XID on r01-n{i:02d}"},
                  now - timedelta(minutes=i), "xid", 1.0, {})
        lines.append(json.dumps(a.to_json(), sort_keys=True) + "\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "alerts.jsonl").write_text("".join(lines))
    r = fleetwatch("silence", "add", "--data-dir", str(data), "-m", "alertname=GpuXid", "--comment", "INC-1",
                   timeout=60)
    assert r.returncode == 0, r.stderr
    return data


def test_output_to_a_reader_that_went_away_is_quiet(tmp_path, data_dir):
    for args in (["config", "--reference"], ["config"], ["alerts", "--data-dir", str(data_dir)],
                 ["alerts", "--json", "--data-dir", str(data_dir)], ["silence", "list", "--data-dir", str(data_dir)]):
        r = closed_reader(*args, cwd=tmp_path)
        assert r.returncode in QUIET_PIPE, (args, r.stderr)
        assert r.stderr == "", (args, r.stderr)


def test_piped_to_head_like_a_user_does(tmp_path, data_dir):
    fw = f"{sys.executable} -m pipeline"
    for command in (f"{fw} config --reference", f"{fw} alerts --data-dir {data_dir}",
                    f"{fw} silence list --data-dir {data_dir}"):
        r = subprocess.run(["bash", "-c", f'{command} | head -1; echo "status ${{PIPESTATUS[0]}}" >&2'],
                           cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
        assert len(r.stdout.splitlines()) == 1, (command, r.stdout)
        assert "Traceback" not in r.stderr and "Error" not in r.stderr, (command, r.stderr)
        assert int(r.stderr.split("status ")[-1]) in QUIET_PIPE, (command, r.stderr)


@pytest.mark.slow
def test_sigterm_to_the_process_and_its_group_drains_everything(tmp_path):
    """What `timeout N fleetwatch run` does: SIGTERM to the daemon, then at once to its
    process group (the second arrives while the daemon drains: the case that lost data)."""
    p = start(tmp_path, start_new_session=True)
    data = tmp_path / "data"
    try:
        wait_for(lambda: list((data / "archive" / "gpu_samples").rglob("*.parquet")))
        os.kill(p.pid, signal.SIGTERM)
        os.killpg(p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 0, err[-3000:]
    assert "exiting without draining" not in err
    assert archived_rows(data) == reported_samples(err)  # nothing lost
    assert not list((data / "archive" / ".staging").iterdir())


@pytest.mark.slow
def test_sighup_drains_like_sigterm_and_alerts_jsonl_is_there_from_the_start(tmp_path):
    p = start(tmp_path, env={"FLEETWATCH_FLEET__FAULT_INTERVAL_S": "0", "FLEETWATCH_FLEET__GPU_RESET_INTERVAL_S": "0"})
    data = tmp_path / "data"
    try:
        wait_for(lambda: list((data / "archive" / "gpu_samples").rglob("*.parquet")))
        assert (data / "alerts.jsonl").is_file()  # before any alert: `tail -F` and `fleetwatch alerts` find it
        # No alert of the fleet's (the daemon's own FleetwatchWatchdog, severity none, may fire already: pipeline/ops)
        r = fleetwatch("alerts", "--data-dir", str(data), "--severity", "critical", timeout=60)
        assert r.returncode == 0 and "no alerts" in r.stdout, r.stdout + r.stderr
        p.send_signal(signal.SIGHUP)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 0, err[-3000:]
    assert "SIGHUP: stopping" in err
    assert archived_rows(data) == reported_samples(err)


def test_outputs_in_a_missing_directory_fail_before_the_work(tmp_path):
    (tmp_path / "s.csv").write_text("timestamp,value\n1,1\n2,2\n")
    r = fleetwatch("replay", str(tmp_path / "s.csv"), "--out", str(tmp_path / "nodir" / "o.csv"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"--out {tmp_path / 'nodir' / 'o.csv'}: the directory" in r.stderr and "does not exist" in r.stderr
    assert "scored" not in r.stdout
    # A day of the fleet would take a while: the check comes first, so nothing is simulated.
    r = fleetwatch("eval", "--duration", "86400", "--json", str(tmp_path / "nodir" / "scores.json"), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--json" in r.stderr and "does not exist" in r.stderr and "simulated" not in r.stdout
    r = fleetwatch("replay", str(tmp_path / "s.csv"), "--out", str(tmp_path))
    assert r.returncode == 2 and "is a directory" in r.stderr


def test_replay_says_how_many_values_were_not_numbers(tmp_path):
    (tmp_path / "s.csv").write_text("timestamp,value\n1,1.5\n2,\n3,n/a\n4,nan\n5,2.5\n6,oops\n")
    r = fleetwatch("replay", str(tmp_path / "s.csv"), "--out", str(tmp_path / "o.csv"))
    assert r.returncode == 0, r.stderr
    assert "scored 6 rows" in r.stdout
    assert "4 of 6 values were not numbers (1 empty, 2 text such as 'n/a', 1 NaN or infinite)" in r.stdout
    clean = tmp_path / "clean.csv"
    clean.write_text("timestamp,value\n1,1\n2,2\n")
    r = fleetwatch("replay", str(clean), "--out", str(tmp_path / "o3.csv"))
    assert r.returncode == 0 and "not numbers" not in r.stdout


BAD_CONFIGS = {
    "inhibit-regex": ('[[alerts.inhibit_rules]]\nsource = "Coolant(Leak"\ntarget = "GpuXid"\n', {},
                      "alerts.inhibit_rules[0].source = 'Coolant(Leak': not a valid regular expression"),
    "empty-data-dir": ('data_dir = ""\n', {}, "data_dir = '': must not be empty"),
    "secret-not-set": ('[[alerts.receivers]]\nname = "a"\nurl = "http://x/1"\nsecret_env = "FW_UNSET_SECRET"\n', {},
                       "alerts.receivers[0].secret_env = 'FW_UNSET_SECRET': that environment variable is not set"),
    "url-space": ("", {"FLEETWATCH_ALERTS__WEBHOOKS": "http://x/a b"},
                  "alerts.webhooks[0] = 'http://x/a b': has a space"),
    "mqtt-broker": ('[mqtt]\nbroker = "bms.example:notaport"\n', {}, "mqtt.broker = 'bms.example:notaport'"),
    "external-url": ('[alerts]\nexternal_url = "fleetwatch.example"\n', {},
                     "alerts.external_url = 'fleetwatch.example'"),
    # (a mistyped section had been ignored: the webhooks never set, alerts going nowhere)
    "env-section": ("", {"FLEETWATCH_ALERT__WEBHOOKS": "http://x/a"},
                    "environment variable FLEETWATCH_ALERT__WEBHOOKS: unknown section 'alert'; did you mean "
                    "FLEETWATCH_ALERTS__WEBHOOKS?"),
    # (`config` had passed it, `run` refused it)
    "http-token": ('[daemon]\nhttp = "127.0.0.1:9599"\nhttp_token_env = "FW_UNSET_TOKEN"\n', {},
                   "daemon.http_token_env = 'FW_UNSET_TOKEN': that environment variable is not set"),
    # (a traceback and status 1, which systemd restarts for ever)
    "not-a-file": ("", {}, "cannot be read (Is a directory)"),
}


@pytest.mark.parametrize("toml, env, expected", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_config_refuses_what_run_refuses(tmp_path, toml, env, expected):
    (tmp_path / "fw.toml").mkdir() if "Is a directory" in expected else (tmp_path / "fw.toml").write_text(toml)
    run = fleetwatch("run", "--config", "fw.toml", "--duration", "30", cwd=tmp_path, env=env, timeout=60)
    config = fleetwatch("config", "--config", "fw.toml", cwd=tmp_path, env=env, timeout=60)
    for r in (run, config):
        assert r.returncode == 2, r.stderr[-2000:]
        assert expected in r.stderr and "Traceback" not in r.stderr
    assert config.stderr == run.stderr  # one validation, one message
    assert not (tmp_path / "fleetwatch-data").exists()


def test_flags_that_contradict_or_name_nothing_are_errors(tmp_path):
    """`--source simulate --replay h100` had run the simulator and dropped --replay without a word, and
    `power report` on a mistyped data dir had printed [] with status 0 (every other reader says so)."""
    r = fleetwatch("run", "--source", "simulate", "--replay", "h100", "--duration", "30", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "--replay is read by --source nvml only" in r.stderr
    r = fleetwatch("power", "report", "--json", "--data-dir", str(tmp_path / "nope"), cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr and r.stdout == ""


def test_with_json_logs_a_failed_start_says_why_in_json(tmp_path):
    """docs/operations.md: every stderr line one JSON object; a config error at start had been text."""
    for args, env in ((["--log-format", "json"], {}), ([], {"FLEETWATCH_DAEMON__LOG_FORMAT": "json"})):
        r = fleetwatch("run", *args, "--seed", "-1", "--duration", "30", cwd=tmp_path, env=env, timeout=60)
        [line] = r.stderr.splitlines()
        said = json.loads(line)
        assert r.returncode == 2 and said["level"] == "ERROR" and "fleet.seed = -1: must be >= 0" in said["message"]


def test_a_daemon_started_with_sighup_ignored_keeps_ignoring_it(tmp_path):
    """Under `nohup` a habitual `kill -HUP` "reload" had stopped the daemon (and exit 0 is never restarted)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")} | FAST
    log = tmp_path / "stderr"
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--data-dir", str(tmp_path / "data")],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
        try:
            wait_for(lambda: (tmp_path / "data" / "alerts.jsonl").exists())  # running
            p.send_signal(signal.SIGHUP)
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=120)
        finally:
            p.kill()
    assert p.returncode == 0 and "SIGTERM: stopping" in log.read_text() and "SIGHUP" not in log.read_text()


def test_an_empty_data_dir_flag_is_an_error_not_the_current_directory(tmp_path):
    r = fleetwatch("run", "--data-dir", "", "--duration", "30", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "data_dir = '': must not be empty" in r.stderr
    r = fleetwatch("alerts", "--data-dir", "", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "data_dir = '': must not be empty" in r.stderr


@pytest.mark.slow
def test_run_piped_to_head_goes_on_without_its_reader(tmp_path):
    """`fleetwatch run | head -1`: once head has its line the console is gone, and the
    daemon goes on (alerts to alerts.jsonl), drains and exits 0; no disk error, no traceback."""
    env = _env() | FAST | {"FLEETWATCH_FLEET__SPEED": "0", "FLEETWATCH_FLEET__FAULT_INTERVAL_S": "30"}  # many alerts
    r = subprocess.run(["bash", "-c", f"'{sys.executable}' -m pipeline run --data-dir data --duration 10 | head -1; "
                        "echo \"status ${PIPESTATUS[0]}\" >&2"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=180)
    assert len(r.stdout.splitlines()) == 1 and "FIRING" in r.stdout, r.stdout
    assert r.stderr.rstrip().endswith("status 0"), r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "cannot write" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("console: its reader went away") == 1
    fired = [json.loads(x) for x in (tmp_path / "data" / "alerts.jsonl").read_text().splitlines()]
    assert len(fired) > 1  # more than the one line head took


@pytest.mark.slow
def test_sigterm_while_waiting_for_kafka_at_start_exits_0_at_once(tmp_path):
    """Kafka out of reach at start (here for up to 10 minutes): a SIGTERM meanwhile had waited the whole
    kafka.connect_timeout_s and exited 75 (a pod killed at its grace period, a failed systemd stop)."""
    from tests.services import free_port
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")} | FAST | {
        "FLEETWATCH_KAFKA__CONNECT_TIMEOUT_S": "600"}
    log = tmp_path / "stderr"
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--data-dir", str(tmp_path / "data"),
                              "--kafka", f"127.0.0.1:{free_port()}"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            wait_for(lambda: "not reachable yet" in log.read_text(), timeout=120)
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=120)
        finally:
            p.kill()
    assert p.returncode == 0, log.read_text()[-3000:]
    assert "stopped while reaching Kafka" in log.read_text()


@pytest.mark.slow
def test_sigterm_while_waiting_for_the_mqtt_broker_stops_at_once(tmp_path):
    """At start the daemon waits for its MQTT subscription (up to kafka.connect_timeout_s,
    here 10 minutes) before the simulator starts: a SIGTERM meanwhile is heeded, not queued."""
    from tests.services import free_port
    p = start(tmp_path, env={"FLEETWATCH_MQTT__BROKER": f"127.0.0.1:{free_port()}",  # nothing listens there
                             "FLEETWATCH_KAFKA__CONNECT_TIMEOUT_S": "600"})
    try:
        wait_for(lambda: (tmp_path / "data" / "alerts.jsonl").exists())  # up, and waiting for the broker
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 0, err[-3000:]
    assert "not subscribed after" not in err and "exiting without draining" not in err
