"""End-to-end: webhook delivery from `fleetwatch run` processes (moved from tests/test_delivery.py)."""

from __future__ import annotations

import base64
import re
import signal

import pytest

from tests.conftest import fleetwatch
from tests.helpers import start, wait_for
from tests.test_delivery import http, outbox_ids


def test_daemon_signs_requests_and_keeps_secrets_out_of_logs_and_files(tmp_path, http):
    secrets = {"signing": "sig-Kx9-s3cr3t", "password": "pw-Jq2-s3cr3t", "token": "tok-Zr5-s3cr3t",
               "down_token": "tok-Down-s3cr3t"}
    recv = http(secret=secrets["signing"].encode(), keep_bodies=True).start()
    down = http()  # never up: its failures are logged
    url = recv.url.replace("http://", f"http://hookuser:{secrets['password']}@") + f"?token={secrets['token']}"
    (tmp_path / "fleetwatch.toml").write_text(f"""
[alerts]
group_wait_s = 0
group_interval_s = 0
[[alerts.receivers]]
name = "oncall"
url = "{url}"
secret_env = "FW_TEST_SIGNING"
[[alerts.receivers]]
name = "down"
url = "{down.url}?token={secrets['down_token']}"
""")
    p = start(tmp_path, "--config", str(tmp_path / "fleetwatch.toml"), "--duration", "7",
              env={"FW_TEST_SIGNING": secrets["signing"], "FLEETWATCH_ALERTS__RETRY_MAX_S": "0.5"})
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert recv.bodies, err[-3000:]
    assert recv.bad_signatures == 0
    assert all(h["Authorization"] == "Basic " + base64.b64encode(f"hookuser:{secrets['password']}".encode()).decode()
               for h in recv.headers)
    assert all(b["receiver"] == "oncall" and b["version"] == "4" for b in recv.bodies)
    assert "receiver down (http://127.0.0.1:" in err and "delivery failed: connection refused" in err
    files = [f for f in (tmp_path / "data").rglob("*") if f.is_file()]
    assert any(f.name == "alerts.jsonl" for f in files) and any(f.suffix == ".parquet" for f in files)
    for name, value in secrets.items():
        assert value not in out and value not in err, f"{name} in the daemon's output"
        for f in files:
            assert value.encode() not in f.read_bytes(), f"{name} in {f}"


@pytest.mark.parametrize("receivers, env, expected", [
    ('[[alerts.receivers]]\nname = "a"\nurl = "ftp://hooks.example/x?token=t0ken"\n', {},
     "alerts.receivers[0].url = 'ftp://hooks.example/x?token=***': must be an http:// or https:// URL"),
    ('[[alerts.receivers]]\nname = "a"\nurl = "https:///no-host"\n', {},
     "alerts.receivers[0].url = 'https:///no-host': must be an http:// or https:// URL with a host"),
    ('[[alerts.receivers]]\nname = "a"\nurl = "http://x/1"\n[[alerts.receivers]]\nname = "a"\nurl = "http://x/2"\n',
     {}, "alerts.receivers[1].name = 'a': alerts.receivers[0] has that name already"),
    ('[[alerts.receivers]]\nname = "On Call"\nurl = "http://x/1"\n', {},
     "alerts.receivers[0].name = 'On Call': must match [a-z0-9_-]+"),
    ('[[alerts.receivers]]\nname = "a"\nurl = "http://x/1"\nsecret_env = "FW_NOT_SET"\n', {},
     "alerts.receivers[0].secret_env = 'FW_NOT_SET': that environment variable is not set or empty"),
    ('[[alerts.receivers]]\nname = "a"\nurl = "http://x/1"\nsecret_file = "/nonexistent/secret"\n', {},
     "alerts.receivers[0].secret_file = '/nonexistent/secret': cannot read it"),
    ('[[alerts.receivers]]\nname = "a"\nurl = "https://x/1"\nca_file = "/nonexistent/ca.pem"\n', {},
     "alerts.receivers[0].ca_file = '/nonexistent/ca.pem': no such file"),
    ('[[alerts.receivers]]\nname = "webhook-1"\nurl = "http://x/1"\n', {"FLEETWATCH_ALERTS__WEBHOOKS": "http://y/"},
     "alerts.webhooks[0].name = 'webhook-1': alerts.receivers[0] has that name already"),
], ids=["scheme", "no-host", "duplicate", "bad-name", "secret-env", "secret-file", "ca-file", "shorthand-clash"])
def test_bad_receiver_config_exits_2_and_says_what_to_fix(tmp_path, receivers, env, expected):
    (tmp_path / "f.toml").write_text(receivers)
    r = fleetwatch("run", "--config", str(tmp_path / "f.toml"), "--duration", "1", "--data-dir", "data",
                   cwd=tmp_path, env=env, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert expected in r.stderr
    assert "t0ken" not in r.stderr


def notify_summary(stderr: str) -> str:
    return re.search(r"notify: (\d+ alert state changes.*)", stderr).group(1)


def test_sigkill_with_a_failing_receiver_then_restart_delivers_every_notification(tmp_path, http):
    recv = http().start()
    recv.status = 500
    env = {"FLEETWATCH_ALERTS__WEBHOOKS": recv.url, "FLEETWATCH_ALERTS__GROUP_WAIT_S": "0",
           "FLEETWATCH_ALERTS__GROUP_INTERVAL_S": "0", "FLEETWATCH_ALERTS__RETRY_INITIAL_S": "0.05",
           "FLEETWATCH_ALERTS__RETRY_MAX_S": "0.2"}
    outbox = tmp_path / "data" / "outbox" / "webhook-1"
    first = start(tmp_path, "--speed", "0", env=env)
    try:
        wait_for(lambda: len(outbox_ids(outbox)) >= 5, timeout=90)
    finally:
        first.send_signal(signal.SIGKILL)
        _, first_err = first.communicate(timeout=30)
    enqueued = outbox_ids(outbox)
    assert recv.taken == [] and len(recv.requests) >= 1  # tried, refused with 500s, nothing taken
    recv.status = 200
    second = start(tmp_path, "--speed", "0", "--duration", "5", env=env)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err[-3000:]
    kept = recv.unique()
    assert kept[:len(enqueued)] == enqueued  # what the killed run enqueued goes first, in order
    summary = notify_summary(err)
    print(f"SIGKILL: {len(enqueued)} notifications in the outbox at the kill ({len(recv.requests)} requests "
          f"answered 500 before it); after the restart the receiver took {len(recv.taken)} requests, "
          f"{len(kept)} distinct, {recv.duplicates} duplicates by Idempotency-Key; restart's notify summary: {summary}")
    assert "left in its outbox by the last run go out first" in err
    assert re.search(r", 0 pending in outboxes", summary)
    assert recv.duplicates == 0


def test_an_outbox_that_cannot_start_its_next_segment_takes_records_again_once_it_can(tmp_path):
    """A segment roll (every 1 MiB) on a disk out of inodes had left a closed writer and a segment listed but
    not on disk: every append and read after it failed until a restart, and notify ended. The append fails,
    the outbox stays as it was, and once the disk has room every record goes out, in order."""
    import time

    from pipeline.sinks.outbox import SEGMENT_BYTES, Outbox
    from tests.e2e.test_archive_failure import tmpfs
    with tmpfs(tmp_path / "disk", "16m", inodes=40) as disk:
        box = Outbox(disk / "outbox" / "hook")
        n = 0
        while box._path(1).stat().st_size < SEGMENT_BYTES if n else True:  # the first segment, full
            box.append([{"n": n, "pad": "x" * 4000}], time.time())
            n += 1
        fillers = []
        with pytest.raises(OSError):
            while True:  # every inode left
                fillers.append(disk / f"filler{len(fillers)}")
                fillers[-1].touch()
        with pytest.raises(OSError):
            box.append([{"n": n}], time.time())  # the roll cannot make its segment
        for f in fillers:
            f.unlink(missing_ok=True)
        box.append([{"n": n}], time.time())
        got = []
        while head := box.peek(100):
            for r in head:
                got.append(r.payload["n"])
                box.ack(r.seq)
        assert got == list(range(n + 1))
        box.close()


def test_an_atomic_write_the_disk_cannot_hold_leaves_no_part_of_it(tmp_path):
    """A state file too large for what is free had left its temporary part, holding the last free bytes that
    the outboxes and alerts.jsonl needed."""
    from pipeline.sinks.files import write_atomically
    from tests.e2e.test_archive_failure import fill, tmpfs
    with tmpfs(tmp_path / "disk", "4m") as disk:
        fill(disk, leave=100_000)
        with pytest.raises(OSError):
            write_atomically(disk / "router.json", "x" * 500_000)
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_a_full_disk_under_a_due_group_is_tried_every_second_said_once_and_the_group_goes_out_after(tmp_path, http,
                                                                                                      caplog):
    """The timer had tried a full disk every 10 ms, an error line each (392 in 5 s)."""
    import asyncio
    import logging

    from pipeline.sinks.notify import Notifier
    from tests.conftest import make_config
    from tests.e2e.test_archive_failure import fill, tmpfs
    from tests.test_delivery import alert, until
    recv = http(keep_bodies=True).start()
    with tmpfs(tmp_path / "disk", "8m") as disk:
        n = Notifier(make_config(data_dir=str(disk / "data"), alerts={
            "group_wait_s": 2, "receivers": [{"name": "r", "url": recv.url}]}))

        async def go() -> None:
            await n.start()
            try:
                await n.handle([alert("GpuXid", "r01", "a")])  # its group is due in 2 s: the disk fills first
                filler = fill(disk, leave=0)
                await asyncio.sleep(4)
                filler.unlink()
                await until(lambda: recv.bodies)
            finally:
                await n.close()
        with caplog.at_level(logging.INFO, logger="pipeline.sinks.notify"):
            asyncio.run(go())
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("notify: cannot enqueue",
                                                                                 "notify: enqueuing"))]
    assert len(said) == 2 and said[0].startswith("notify: cannot enqueue due notifications") \
        and said[1] == "notify: enqueuing due notifications again", said
