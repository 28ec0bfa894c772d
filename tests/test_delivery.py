"""Alert delivery against real HTTP receivers that fail on purpose (500s, connection
refused, answers slower than the timeout, 400s), and the real daemon killed with SIGKILL:
nothing enqueued is lost, order holds per receiver, retries carry the same
Idempotency-Key, and secrets stay out of logs and files.

The end-to-end tests (processes, brokers, tmpfs) are in tests/e2e/test_delivery.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.model import Alert, parse_iso_utc
from pipeline.sinks.notify import Delivery, Notifier, RetryPolicy
from pipeline.sinks import outbox as outbox_module
from pipeline.sinks.outbox import Outbox
from pipeline.sinks.webhook import Client, Receiver, load_receivers, sign, verify_signature
from tests.conftest import make_config
from tests.services import HttpReceiver

FAST_RETRY = RetryPolicy(timeout_s=1.0, initial_s=0.02, max_s=0.1, max_age_s=3600)
T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)


def receiver_of(url: str, name: str = "hook", env: dict | None = None, **kw) -> Receiver:
    return load_receivers(make_config(alerts={"receivers": [{"name": name, "url": url, **kw}]}).alerts, env)[0]


def alert(name: str, rack: str, node: str, resolved: bool = False) -> dict:
    return Alert(labels={"alertname": name, "severity": "warning", "site": "site-a", "rack": rack, "node": node},
                 annotations={"summary": f"{name} on {node}", "description": "check it",
                              "runbook_url": f"runbooks/{name}.md"},
                 starts_at=T0, detector="test", score=7.5, evidence={"temp_c": 91.0},
                 ends_at=T0 + timedelta(minutes=5) if resolved else None).to_json()


def outbox_ids(directory: Path) -> list[str]:
    return [json.loads(line)["id"] for segment in sorted(directory.glob("*.jsonl"))
            for line in segment.read_text().splitlines()]


@contextlib.asynccontextmanager
async def delivering(delivery: Delivery):
    task = asyncio.create_task(delivery.run())
    delivery.kick()
    try:
        yield delivery
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await delivery.stop()


async def until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def make_delivery(tmp_path: Path, url: str, policy: RetryPolicy = FAST_RETRY, n: int = 0) -> tuple[Delivery, list]:
    outbox = Outbox(tmp_path / "outbox" / "hook")
    records = outbox.append([{"n": i} for i in range(n)], time.time())
    return Delivery(receiver_of(url), outbox, tmp_path / "deadletter" / "alerts-hook.jsonl", policy), records


def test_outbox_restart_resumes_after_the_cursor_and_cuts_a_torn_line(tmp_path, monkeypatch):
    """A crash: acks past the last cursor write are lost (those records are sent again, same
    id), a half-written line is cut, fully acked segments are gone, numbering goes on."""
    monkeypatch.setattr(outbox_module, "CURSOR_SYNC_S", 3600.0)  # the cursor is written only by sync() here
    outbox = Outbox(tmp_path / "o")
    records = [r for batch in range(30)
               for r in outbox.append([{"pad": "x" * 1000, "n": batch * 100 + i} for i in range(100)], time.time())]
    assert len(list(outbox.dir.glob("*.jsonl"))) == 3  # 1 MiB segments
    for r in records[:1500]:
        assert outbox.peek(1)[0] == r
        outbox.ack(r.seq)
    outbox.sync()
    for r in records[1500:1600]:  # acked in memory only: the "crash" comes before the cursor's next write
        assert outbox.peek(1)[0] == r
        outbox.ack(r.seq)
    last = sorted(outbox.dir.glob("*.jsonl"))[-1]
    with open(last, "ab") as f:
        f.write(b'{"seq":3001,"id":"torn","crea')  # the process died mid-append
    reopened = Outbox(tmp_path / "o")
    assert reopened.pending == 1500 and reopened.peek(1)[0] == records[1500]
    assert len(list(reopened.dir.glob("*.jsonl"))) == 2  # the first segment was all acked
    assert not last.read_bytes().endswith(b"crea")
    assert reopened.append([{"n": "next"}], time.time())[0].seq == 3001
    ids = []
    while head := reopened.peek(1):
        ids.append(head[0].id)
        reopened.ack(head[0].seq)
    assert ids[:-1] == [r.id for r in records[1500:]] and len(ids) == 1501
    reopened.close()
    assert not list(reopened.dir.glob("*.jsonl")) and Outbox(tmp_path / "o").append([{}], 0.0)[0].seq == 3002


@pytest.fixture
def http():
    receivers: list[HttpReceiver] = []

    def make(**kw) -> HttpReceiver:
        receivers.append(HttpReceiver(**kw))
        return receivers[-1]
    yield make
    for r in receivers:
        r.stop()


def test_500s_then_200_delivers_everything_in_order_with_the_same_key_on_retries(tmp_path, http):
    recv = http().start()
    recv.fail_first, recv.fail_status = 6, 500
    delivery, records = make_delivery(tmp_path, recv.url, n=20)

    async def go():
        async with delivering(delivery):
            await until(lambda: delivery.outbox.pending == 0)
    asyncio.run(go())
    ids = [r.id for r in records]
    assert recv.taken == ids  # in order, each once
    assert [k for k, status in recv.requests[:6]] == [ids[0]] * 6  # head of line, one key for every retry
    assert delivery.stats.retried == 6 and delivery.stats.delivered == 20
    assert not list(delivery.outbox.dir.glob("*.jsonl"))  # fully acked segments are gone


def test_connection_refused_then_up(tmp_path, http):
    recv = http()  # not listening yet
    delivery, records = make_delivery(tmp_path, recv.url, n=10)

    async def go():
        async with delivering(delivery):
            await until(lambda: delivery.stats.retried >= 3)
            assert delivery.stats.delivered == 0
            recv.start()
            await until(lambda: delivery.outbox.pending == 0)
    asyncio.run(go())
    assert recv.taken == [r.id for r in records]
    assert delivery.stats.maybe_duplicates == 0  # refused: it never got there


def test_a_receiver_slower_than_the_timeout_is_retried_and_duplicates_carry_the_same_key(tmp_path, http):
    recv = http().start()
    recv.delay_s = 1.0  # answers after the 0.3 s timeout: the request did arrive
    delivery, records = make_delivery(tmp_path, recv.url, RetryPolicy(0.3, 0.02, 0.1, 3600), n=5)

    async def go():
        async with delivering(delivery):
            await until(lambda: len(recv.requests) >= 2)
            recv.delay_s = 0.0
            await until(lambda: delivery.outbox.pending == 0)
    asyncio.run(go())
    assert recv.unique() == [r.id for r in records]  # what a receiver that drops duplicates by key keeps
    assert recv.duplicates >= 1 and delivery.stats.maybe_duplicates >= 1
    print(f"slow receiver: {len(recv.taken)} requests taken, {recv.duplicates} duplicates by Idempotency-Key, "
          f"{delivery.stats.maybe_duplicates} counted as possible duplicates by the sender")


def test_a_400_is_dead_lettered_at_once_and_delivery_goes_on(tmp_path, http):
    recv = http().start()
    recv.status = lambda body: 400 if b'"n":2' in body else 200
    delivery, records = make_delivery(tmp_path, recv.url, RetryPolicy(1.0, 5.0, 5.0, 3600), n=5)

    async def go():
        async with delivering(delivery):
            await until(lambda: delivery.outbox.pending == 0)
    asyncio.run(go())
    assert recv.taken == [r.id for r in records if r.payload["n"] != 2]
    dead = [json.loads(x) for x in delivery.dead_letters.read_text().splitlines()]
    assert len(dead) == 1 and dead[0]["id"] == records[2].id and dead[0]["payload"] == {"n": 2}
    assert dead[0]["reason"].startswith("HTTP 400") and "refused with 400 on purpose" in dead[0]["reason"]
    assert dead[0]["attempts"] == 1 and delivery.stats.retried == 0 and delivery.stats.dead_lettered == 1


def test_dead_letters_redact_the_urls_in_their_payload(tmp_path, http):
    """A payload carries externalURL and generatorURL (alerts.external_url may hold a token);
    the dead-letter file is read by people: its URLs are redacted."""
    recv = http().start()
    recv.status = lambda body: 400
    outbox = Outbox(tmp_path / "outbox" / "hook")
    token = "tok-SECRET-4242"
    [record] = outbox.append([{"externalURL": f"https://fw.example/?auth={token}",
                               "alerts": [{"generatorURL": f"https://fw.example/a?auth={token}"}]}], time.time())
    delivery = Delivery(receiver_of(recv.url), outbox, tmp_path / "deadletter" / "alerts-hook.jsonl", FAST_RETRY)

    async def go():
        async with delivering(delivery):
            await until(lambda: delivery.outbox.pending == 0)
    asyncio.run(go())
    text = delivery.dead_letters.read_text()
    assert token not in text and delivery.stats.dead_lettered == 1
    [dead] = [json.loads(x) for x in text.splitlines()]
    assert dead["id"] == record.id and dead["payload"]["externalURL"] == "https://fw.example/?auth=***"
    assert dead["payload"]["alerts"][0]["generatorURL"] == "https://fw.example/a?auth=***"


def test_past_max_age_records_are_dead_lettered_counted_and_logged_once(tmp_path, http, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.sinks.notify")
    recv = http()  # down
    delivery, records = make_delivery(tmp_path, recv.url, RetryPolicy(1.0, 0.05, 0.1, max_age_s=1.0), n=30)

    async def go():
        async with delivering(delivery):
            await until(lambda: delivery.stats.dead_lettered == 30)
            recv.start()  # back: what is enqueued now is delivered
            later = delivery.outbox.append([{"n": "later"}], time.time())
            delivery.kick()
            await until(lambda: delivery.outbox.pending == 0)
            return later
    later = asyncio.run(go())
    dead = [json.loads(x) for x in delivery.dead_letters.read_text().splitlines()]
    assert [d["id"] for d in dead] == [r.id for r in records]
    assert all("max_age_s" in d["reason"] and "connection refused" in d["reason"] for d in dead)
    assert recv.taken == [later[0].id]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("dead-lettering" in m for m in messages) == 1  # once per outage, not per record
    assert sum("delivery failed" in m for m in messages) == 1
    assert any("delivering again" in m and "30 dead-lettered" in m for m in messages)


def test_one_receiver_down_does_not_delay_another(tmp_path, http):
    """Through the Notifier: a receiver that hangs past the timeout, another that is fine."""
    slow, fine = http().start(), http().start()
    # The slow one hangs far past any wait below: were deliveries serialised, or shutdown
    # waiting for the request in flight, the waits would run out (margins of minutes, not ms).
    slow.delay_s = 300.0
    cfg = make_config(data_dir=str(tmp_path / "data"), alerts={
        "group_wait_s": 0, "group_interval_s": 0, "timeout_s": 120.0,
        "receivers": [{"name": "slow", "url": slow.url}, {"name": "fine", "url": fine.url}]})

    async def go():
        notifier = Notifier(cfg)
        await notifier.start()
        lags = []
        for rack in ("r01", "r02", "r03"):
            t0 = time.monotonic()
            await notifier.handle([alert("GpuOverTemperature", rack, f"{rack}-n1")])
            await until(lambda: len(fine.taken) == int(rack[-1]), timeout=60.0)
            lags.append(time.monotonic() - t0)
        assert notifier.deliveries["slow"].stats.delivered == 0
        t0 = time.monotonic()
        await asyncio.wait_for(notifier.close(grace_s=0.5), 60.0)  # the grace, then the request in flight is cut
        return lags, time.monotonic() - t0, notifier.stats
    lags, closing, stats = asyncio.run(go())
    print(f"healthy receiver's delivery lag with the other one hanging: "
          f"{', '.join(f'{x * 1000:.0f} ms' for x in lags)};"
          f" shutdown took {closing:.2f} s, {stats.pending} left in the slow one's outbox")
    assert len(fine.taken) == 3 and stats.pending == 3  # the slow one took none: its first try was cut off
    assert outbox_ids(tmp_path / "data" / "outbox" / "slow")  # kept for the next start


def test_tls_is_verified_by_default_against_ca_file(tmp_path, http, caplog):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    recv = http(tls=(cert, key)).start()
    untrusted = Client(receiver_of(recv.url), 2.0).post(b"{}", "k1", time.time())
    assert not untrusted.ok and not untrusted.permanent and "TLS certificate not trusted" in untrusted.reason
    assert Client(receiver_of(recv.url, ca_file=str(cert)), 2.0).post(b"{}", "k2", time.time()).ok
    with caplog.at_level(logging.WARNING, logger="pipeline.sinks.webhook"):
        unverified = receiver_of(recv.url, tls_verify=False)
    assert "TLS certificate verification is off" in caplog.text
    assert Client(unverified, 2.0).post(b"{}", "k3", time.time()).ok
    assert recv.taken == ["k2", "k3"]


def test_a_bearer_token_from_the_environment_or_a_file_read_at_every_request(tmp_path, http):
    recv = http(keep_bodies=True).start()
    from_env = receiver_of(recv.url, bearer_token_env="FW_TEST_TOKEN", env={"FW_TEST_TOKEN": "tok-env"})
    assert Client(from_env, 2.0).post(b"{}", "k1", time.time()).ok
    token = tmp_path / "token"
    token.write_text("tok-1\n")
    client = Client(receiver_of(recv.url, bearer_token_file=str(token)), 2.0)
    assert client.post(b"{}", "k2", time.time()).ok
    token.write_text("tok-2")  # rotated (a projected service-account token): taken at the next request
    assert client.post(b"{}", "k3", time.time()).ok
    assert [h["Authorization"] for h in recv.headers] == ["Bearer tok-env", "Bearer tok-1", "Bearer tok-2"]
    token.unlink()  # rotated away for a moment: this try fails, the next one reads it again
    missing = client.post(b"{}", "k4", time.time())
    assert not missing.ok and not missing.permanent and "cannot read the bearer token file" in missing.reason
    assert "tok-" not in repr(client.receiver) and len(recv.requests) == 3


def test_a_refused_credential_is_retried_and_says_what_to_check(http):
    recv = http().start()
    for status in (401, 403):
        recv.status = status
        refused = Client(receiver_of(recv.url), 2.0).post(b"{}", "k1", time.time())
        assert not refused.ok and not refused.permanent and "check the receiver's credentials" in refused.reason
    recv.status = 404
    assert Client(receiver_of(recv.url), 2.0).post(b"{}", "k2", time.time()).permanent


@pytest.mark.parametrize("settings, error", [
    ({"bearer_token_env": "FW_NOT_SET"}, "bearer_token_env = 'FW_NOT_SET': that environment variable is not set"),
    ({"bearer_token_file": "/nonexistent/token"}, "bearer_token_file = '/nonexistent/token': cannot read it"),
    ({"url": "http://fw:pw@127.0.0.1:9/hook", "bearer_token_file": "TOKEN"}, "both a bearer token and a user in the URL"),
    ({"bearer_token_file": "SPACED"}, "bearer_token_file: the token holds a space"),
    ({"cert_file": "CERT"}, "is not https://"),
    ({"url": "https://127.0.0.1:9/hook", "key_file": "CERT"}, "without cert_file"),
    ({"url": "https://127.0.0.1:9/hook", "cert_file": "TOKEN"}, "not a usable client certificate and key"),
])
def test_receiver_credentials_that_cannot_work_are_refused_at_start(tmp_path, settings, error):
    files = {"TOKEN": "tok-x", "SPACED": "tok x", "CERT": "not a certificate"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    settings = {k: str(tmp_path / v) if v in files else v for k, v in settings.items()}
    with pytest.raises(ConfigError, match=re.escape(error)):
        receiver_of(settings.pop("url", "http://127.0.0.1:9/hook"), env={}, **settings)


def test_an_encrypted_client_key_is_refused_at_start_not_prompted_for(tmp_path):
    """OpenSSL asks an encrypted key's passphrase on the terminal: a daemon's start (or a reload)
    had hung there."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=fleetwatch", "-passout", "pass:secret"], check=True, capture_output=True)
    with pytest.raises(ConfigError, match="the key is encrypted"):
        receiver_of("https://127.0.0.1:9/hook", cert_file=str(cert), key_file=str(key))


def test_signature_verifies_and_tampering_or_an_old_timestamp_fails():
    secret, body, now = b"s3cret", b'{"alerts":[]}', time.time()
    header = sign(secret, body, int(now))
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", header)
    assert verify_signature(secret, header, body, now)
    assert not verify_signature(secret, header, body + b" ", now)           # body changed
    assert not verify_signature(b"other", header, body, now)                # wrong secret
    assert not verify_signature(secret, header, body, now + 301)            # replayed later
    old = sign(secret, body, int(now) - 3600)
    assert not verify_signature(secret, old, body, now)
    t = header.split(",")[0]
    assert not verify_signature(secret, f"t={int(now) + 1},{header.split(',')[1]}", body, now)  # t is signed
    assert verify_signature(secret, f"{t},v1={'0' * 64},{header.split(',')[1]}", body, now)  # rotation: any v1


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_20000_record_backlog_drains_in_bounded_memory(tmp_path, http):
    recv = http()  # down while the backlog builds
    outbox = Outbox(tmp_path / "outbox" / "hook")
    payload = {"version": "4", "alerts": [alert("GpuOverTemperature", "r01", f"r01-n{i}") for i in range(3)]}
    for _ in range(20):
        outbox.append([payload] * 1000, time.time())
    disk = sum(f.stat().st_size for f in outbox.dir.glob("*.jsonl"))
    ids = outbox_ids(outbox.dir)
    delivery = Delivery(receiver_of(recv.url), outbox, tmp_path / "dead.jsonl", FAST_RETRY)
    peak, base, done = [0], rss_bytes(), threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.01)
    sampler = threading.Thread(target=sample)
    sampler.start()

    async def go():
        async with delivering(delivery):
            await until(lambda: delivery.stats.retried >= 2)
            recv.start()
            t0 = time.monotonic()
            await until(lambda: outbox.pending == 0, timeout=180)
            return time.monotonic() - t0
    try:
        drain_s = asyncio.run(go())
    finally:
        done.set()
        sampler.join()
    growth = peak[0] - base
    print(f"backlog: 20000 records, {disk / 2**20:.1f} MB on disk, drained in {drain_s:.1f} s "
          f"({20000 / drain_s:,.0f}/s); peak RSS growth {growth / 2**20:.1f} MB")
    assert recv.taken == ids
    assert growth < disk / 2  # a window at a time; the backlog as Python objects would be several times `disk`
    assert not list(outbox.dir.glob("*.jsonl"))


def test_a_stop_after_the_outbox_disk_failed_leaves_no_unread_error_to_log(tmp_path, http, caplog, monkeypatch):
    """The outbox's disk fills while a record is acked: run() logs it and waits to try again. A stop
    then (the daemon drained on SIGTERM) read the failed try's error nowhere, and asyncio logged it
    with a traceback when the future was collected (a full-disk e2e run once ended so)."""
    import gc
    recv = http().start()
    delivery, _ = make_delivery(tmp_path, recv.url, policy=RetryPolicy(5.0, 0.01, 60.0, 3600.0), n=3)

    def full(seq):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(delivery.outbox, "ack", full)

    async def go():
        task = asyncio.create_task(delivery.run())
        delivery.kick()
        await until(lambda: "No space left" in caplog.text)
        await delivery.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gc.collect()
    with caplog.at_level(logging.ERROR):
        asyncio.run(go())
        gc.collect()
    assert "never retrieved" not in caplog.text and "Traceback" not in caplog.text, caplog.text


def test_records_written_again_after_the_outbox_disk_failed_go_out_without_sitting_out_the_wait(tmp_path, http,
                                                                                                   monkeypatch):
    """The outbox's disk filled while a record was acked: the delivery slept retry_max_s (60 s)
    whatever came meanwhile, so the alerts held through a disk-full episode were still in the
    outbox when the daemon stopped seconds later (a full-disk e2e run ended so)."""
    recv = http().start()
    delivery, _ = make_delivery(tmp_path, recv.url, policy=RetryPolicy(5.0, 0.01, 60.0, 3600.0), n=3)
    ack = delivery.outbox.ack
    full = [True]

    def ack_on_a_full_disk(seq):
        if full[0]:
            raise OSError(28, "No space left on device")
        return ack(seq)
    monkeypatch.setattr(delivery.outbox, "ack", ack_on_a_full_disk)

    async def go():
        task = asyncio.create_task(delivery.run())
        delivery.kick()
        await until(lambda: full[0] and delivery.stats.delivered == 0 and len(recv.requests) >= 1)
        await asyncio.sleep(0.1)  # (its try failed: it waits)
        full[0] = False  # the disk has room again, and notify writes its held changes: a kick
        delivery.outbox.append([{"n": 3}], time.time())
        delivery.kick()
        await until(lambda: delivery.outbox.pending == 0, timeout=10)  # not 60 s later
        await delivery.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    asyncio.run(go())
    assert len(recv.unique()) == 4  # the three held and the one written since, each once


@pytest.mark.parametrize("kind, rotated", [("alertmanager", False), ("webhook", False), ("webhook", True)])
def test_a_receiver_configured_again_hears_what_changed_while_none_of_its_kind_was(tmp_path, http, kind, rotated):
    """A receiver kind's state (the alerts Alertmanager is re-sent, the webhook groups) was kept
    only while a receiver of that kind was configured. Removed, then configured again: an alert
    that resolved meanwhile went on being sent as firing, for ever, and one that fired meanwhile
    never went out. alerts.jsonl, written first, is what the kind takes them from; rotated since
    (it starts with the alerts still firing), an alert it does not name resolved too."""
    recv = http(keep_bodies=True).start()

    def notifier(receivers: bool) -> Notifier:
        return Notifier(make_config(data_dir=str(tmp_path / "data"), alerts={
            "resend_interval_s": 1, "group_wait_s": 0, "group_interval_s": 0,
            "receivers": [{"name": "r", "url": recv.url, "kind": kind}] if receivers else []}))

    def firing_names(body) -> set[str]:
        if kind == "alertmanager":  # (a firing alert's endsAt is its lease, ahead; a resolved one's is past)
            return {a["labels"]["node"] for a in body if parse_iso_utc(a["endsAt"]) > time.time()}
        return {a["labels"]["node"] for a in body["alerts"] if a["status"] == "firing"}

    async def run(n: Notifier, changes: list[dict], until_seen=None) -> None:
        await n.start()
        try:
            if changes:
                await n.handle(changes)
            if until_seen is not None:
                await until(until_seen)
        finally:
            await n.close()
    asyncio.run(run(notifier(True), [alert("GpuXid", "r01", "a"), alert("GpuXid", "r01", "b")],
                    lambda: any(firing_names(b) == {"a", "b"} for b in recv.bodies)))
    asyncio.run(run(notifier(False), [alert("GpuXid", "r01", "a", resolved=True), alert("GpuXid", "r01", "c")]))
    if rotated:  # (a new day's file: the latest line of each alert still firing)
        from pipeline.sinks.alerts import firing_lines
        log = tmp_path / "data" / "alerts.jsonl"
        log.write_text(firing_lines(log))
    seen = len(recv.bodies)
    asyncio.run(run(notifier(True), [], lambda: any(firing_names(b) == {"b", "c"} for b in recv.bodies[seen:])))
    told_after = recv.bodies[seen:]
    assert not any("a" in firing_names(b) for b in told_after)
    if kind == "webhook":  # its firing went out there: so does its resolution
        assert any(a["labels"]["node"] == "a" and a["status"] == "resolved" for b in told_after for a in b["alerts"])


def test_a_webhook_receiver_down_past_max_age_hears_where_each_group_stands_when_it_returns(tmp_path, http):
    """Its notifications dead-lettered for age had been lost for good: a resolution sent during the outage
    never reached it (the incident stayed open), an alert that fired then reached it only at the next
    repeat_interval (4 h by default). Each group says again what the lost notifications said, as it stands."""
    recv = http(keep_bodies=True).start()
    n = Notifier(make_config(data_dir=str(tmp_path / "data"), alerts={
        "group_wait_s": 0, "group_interval_s": 0.5, "repeat_interval_s": 3600, "max_age_s": 1,
        "retry_initial_s": 0.1, "retry_max_s": 0.2, "receivers": [{"name": "r", "url": recv.url}]}))

    def told(node: str, status: str) -> bool:
        return any(a["labels"]["node"] == node and a["status"] == status for b in recv.bodies for a in b["alerts"])

    async def go() -> None:
        await n.start()
        try:
            await n.handle([alert("GpuXid", "r01", "a")])
            await until(lambda: told("a", "firing"))
            recv.stop()
            await n.handle([alert("GpuXid", "r01", "a", resolved=True), alert("GpuXid", "r01", "b")])
            letters = tmp_path / "data" / "deadletter" / "alerts-r.jsonl"
            await until(letters.exists)
            recv.start()
            await until(lambda: told("a", "resolved") and told("b", "firing"))
        finally:
            await n.close()
    asyncio.run(go())


def test_what_a_webhook_receiver_lost_is_told_to_it_after_a_restart_of_notify(tmp_path, http):
    """What a receiver down past max_age lost had lived in memory while newer notifications waited for it (to be
    told when it delivers again): notify restarted during the outage (a deploy), and the resolution sent then
    never reached it (the incident stayed open for good). It is kept on disk until it is in the receiver's
    outbox again."""
    recv = http(keep_bodies=True).start()
    cfg = make_config(data_dir=str(tmp_path / "data"), alerts={
        "group_wait_s": 0, "group_interval_s": 0.5, "repeat_interval_s": 3600, "max_age_s": 2,
        "retry_initial_s": 0.1, "retry_max_s": 0.2, "receivers": [{"name": "r", "url": recv.url}]})

    def told(node: str, status: str) -> bool:
        return any(a["labels"]["node"] == node and a["status"] == status for b in recv.bodies for a in b["alerts"])

    async def before() -> None:
        n = Notifier(cfg)
        await n.start()
        try:
            await n.handle([alert("GpuXid", "r01", "a")])
            await until(lambda: told("a", "firing"))
            recv.stop()
            await n.handle([alert("GpuXid", "r01", "a", resolved=True)])
            await asyncio.sleep(1.0)
            await n.handle([alert("GpuXid", "r02", "c")])  # (younger: it still waits when a's resolution expires)
            await until(lambda: n.stats.dead_lettered >= 1)
        finally:
            await n.close()

    async def after() -> None:
        n = Notifier(cfg)
        await n.start()
        try:
            await until(lambda: told("a", "resolved") and told("c", "firing"))
        finally:
            await n.close()
    asyncio.run(before())
    recv.start()
    asyncio.run(after())
    assert sorted((a["labels"]["node"], a["status"]) for b in recv.bodies for a in b["alerts"]) == [
        ("a", "firing"), ("a", "resolved"), ("c", "firing")]


def test_a_silences_file_whose_read_hangs_does_not_stop_the_event_loop(tmp_path, http):
    """Notify re-read the silences file on the event loop every second: on a hung disk the whole process
    stopped, its /healthz unanswered and a SIGTERM ignored. It reads in a thread; the silence it then
    reads holds."""
    from pipeline.sinks.silences import SilenceStore
    from tests.helpers import HungFile
    recv = http(keep_bodies=True).start()
    data = tmp_path / "data"
    n = Notifier(make_config(data_dir=str(data), alerts={
        "group_wait_s": 0, "group_interval_s": 0.5, "receivers": [{"name": "r", "url": recv.url}]}))
    planned = SilenceStore(tmp_path / "planned.json")
    planned.add(["node=b"], 3600, "ops", "planned work", now=time.time())

    async def go() -> HungFile:
        await n.start()
        try:
            hung = HungFile(data / "silences.json", planned.file.path.read_text())
            ticking = asyncio.create_task(hung.ticking())
            while hung.turned is None:
                await asyncio.sleep(0.05)
            ticking.cancel()
            await until(lambda: n.silences.active(time.time()) != [])
            await n.handle([alert("GpuXid", "r01", "a"), alert("GpuXid", "r02", "b")])
            await until(lambda: recv.bodies)
        finally:
            await n.close()
        return hung
    hung = asyncio.run(go())
    assert hung.released() and hung.turned
    assert [a["labels"]["node"] for b in recv.bodies for a in b["alerts"]] == ["a"]  # b is silenced


@pytest.mark.parametrize("close", [False, True])
def test_a_receiver_that_trickles_its_answer_is_cut_at_the_timeout(tmp_path, close):
    """alerts.timeout_s bounds the whole request: a proxy that sent its answer a byte every 0.3 s had held the
    receiver's queue for as long as it liked (the socket's timeout bounds each read only). An answer with
    `Connection: close` takes the socket from the connection: it is cut all the same."""
    import socket
    import threading
    server = socket.create_server(("127.0.0.1", 0))
    sent = []

    def trickle() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            body = b"accepted, thank you"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n"
                         % (len(body), b"Connection: close\r\n" if close else b""))
            for byte in body:
                time.sleep(0.3)
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                sent.append(byte)
    threading.Thread(target=trickle, daemon=True).start()
    client = Client(receiver_of(f"http://127.0.0.1:{server.getsockname()[1]}/hook"), timeout_s=1.0)
    outcome = client.post(b"{}", "key-1", time.time())
    server.close()
    assert not outcome.ok and outcome.maybe_delivered
    assert outcome.reason == "no whole response within 1 s (alerts.timeout_s)"
    assert len(sent) < len(b"accepted, thank you")  # cut before the answer was whole


def test_a_notification_made_again_after_its_state_was_not_written_carries_the_same_key(tmp_path, http,
                                                                                        monkeypatch):
    """Its outbox record durable, the group's state not (a crash, a full disk): the group is notified again.
    Under a random key the receiver could not tell it from a new page; under the key its content and its
    group's history give, it drops it. (A later notification of the group has another key.)"""
    from pipeline.sinks import notify as notify_module
    recv = http(keep_bodies=True).start()
    real, failed = notify_module.write_atomically, []

    def state_write_fails_once(path, text, *args, **kw):
        if path.name == "router.json" and not failed and '"notified": []' not in text:
            failed.append(path)
            raise OSError(28, "No space left on device")
        return real(path, text, *args, **kw)
    monkeypatch.setattr(notify_module, "write_atomically", state_write_fails_once)
    n = Notifier(make_config(data_dir=str(tmp_path / "data"), alerts={
        "group_wait_s": 0.3, "group_interval_s": 0, "repeat_interval_s": 3600,
        "receivers": [{"name": "r", "url": recv.url}]}))

    async def go() -> None:
        await n.start()
        try:
            await n.handle([alert("GpuXid", "r01", "a")])  # (its group notifies on the timer: it tries again)
            await until(lambda: failed and len(recv.taken) >= 2)
            await n.handle([alert("GpuXid", "r01", "b")])
            await until(lambda: len(recv.taken) >= 3)
        finally:
            await n.close()
    asyncio.run(go())
    first, again, later = recv.taken[:3]
    assert first == again and later != first
    assert [{a["labels"]["node"] for a in b["alerts"]} for b in recv.bodies[:3]] == [{"a"}, {"a"}, {"a", "b"}]


def test_what_one_receiver_lost_is_said_to_it_alone_and_once_more_after_a_failed_write(tmp_path, http):
    """A broken receiver's lost notifications had been said again to every receiver of the kind: while one
    answered 401, the healthy one heard the same resolution again at every max_age_s, for ever. And what was
    to be said again had been dropped when the write that carried it failed (a full disk)."""
    pager, chat = http(keep_bodies=True).start(), http(keep_bodies=True).start()
    chat.status = 401  # bad credentials: retried until max_age_s, then dead-lettered
    n = Notifier(make_config(data_dir=str(tmp_path / "data"), alerts={
        "group_wait_s": 0, "group_interval_s": 0.5, "repeat_interval_s": 3600, "max_age_s": 1,
        "retry_initial_s": 0.1, "retry_max_s": 0.2,
        "receivers": [{"name": "pager", "url": pager.url}, {"name": "chat", "url": chat.url}]}))
    real_write, failed = n._write, []

    def write_fails_once_after_a_loss(changes, work, states, now, keys):
        if work.get("chat") and n.deliveries["chat"].stats.dead_lettered >= 2 and not failed:
            failed.append(now)
            raise OSError(28, "No space left on device")
        return real_write(changes, work, states, now, keys)
    n._write = write_fails_once_after_a_loss

    def heard(recv, status: str) -> int:
        return sum(a["labels"]["node"] == "a" and a["status"] == status for b in recv.bodies for a in b["alerts"])

    async def go() -> None:
        await n.start()
        try:
            await n.handle([alert("GpuXid", "r01", "a")])
            await until(lambda: heard(pager, "firing"))
            await n.handle([alert("GpuXid", "r01", "a", resolved=True)])
            await until(lambda: heard(pager, "resolved") and failed and n.deliveries["chat"].stats.dead_lettered >= 3)
            chat.status = 200  # its credentials fixed
            await until(lambda: heard(chat, "resolved"))
        finally:
            await n.close()
    asyncio.run(go())
    assert (heard(pager, "firing"), heard(pager, "resolved")) == (1, 1)


def test_a_request_cut_at_its_deadline_on_a_kept_alive_connection_is_sent_once(http):
    """The cut had read as the receiver closing a stale kept-alive connection: the request went again at once
    on a new one (each try twice, 2x timeout_s)."""
    recv = http().start()
    client = Client(receiver_of(recv.url), timeout_s=1.0)
    assert client.post(b"{}", "warm", time.time()).ok  # (the connection is kept alive)
    recv.delay_s = 2.0
    outcome = client.post(b"{}", "slow", time.time())
    time.sleep(2.5)  # (what the receiver would still take)
    assert not outcome.ok and outcome.reason == "no whole response within 1 s (alerts.timeout_s)"
    assert [k for k, _ in recv.requests].count("slow") == 1


def test_an_answer_on_a_new_connection_after_a_stale_one_stands(tmp_path):
    """A kept-alive connection the receiver closed unanswered, then a 200 on a new one: the first try's
    deadline, firing during the second, had thrown the 200 away (a duplicate on the retry)."""
    import socket
    import threading
    server = socket.create_server(("127.0.0.1", 0))
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    def serve() -> None:
        conn, _ = server.accept()  # the kept-alive connection
        conn.recv(65536)
        conn.sendall(ok)
        conn.recv(65536)
        time.sleep(0.7)
        conn.close()  # its idle close, racing the request
        again, _ = server.accept()
        again.recv(65536)
        time.sleep(0.5)
        again.sendall(ok)
        time.sleep(1)
        again.close()
    threading.Thread(target=serve, daemon=True).start()
    client = Client(receiver_of(f"http://127.0.0.1:{server.getsockname()[1]}/hook"), timeout_s=1.0)
    assert client.post(b"{}", "warm", time.time()).ok
    assert client.post(b"{}", "k1", time.time()).ok
    server.close()
