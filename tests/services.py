"""Real services for tests and local development, started on free loopback ports.

Apache Kafka comes from Maven Central (scripts/kafka/pom.xml: kafka_2.13 and its
runtime dependencies, fetched once into a cache) and runs as a single KRaft
broker+controller on the machine's Java 17. `scripts/kafka-local` runs one in the
foreground for development. Mosquitto comes from Debian (`apt-get install mosquitto`).
"""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POM = REPO / "scripts" / "kafka" / "pom.xml"
KAFKA_VERSION = "4.4.0"
CACHE = Path(os.environ.get("KAFKA_LOCAL_CACHE", Path.home() / ".cache" / "fleetwatch")) / f"kafka-{KAFKA_VERSION}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kafka_libs() -> Path:
    """The jars of Kafka and its runtime dependencies, fetched with Maven once."""
    libs = CACHE / "libs"
    if (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").exists():
        return libs
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise RuntimeError("Kafka for tests needs Java 17 and Maven (mvn) on PATH")
    tmp = CACHE / "libs.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", "-DincludeScope=runtime",
                    f"-DoutputDirectory={tmp}", f"-Dkafka.version={KAFKA_VERSION}"], check=True)
    tmp.replace(libs)
    return libs


class Service:
    """A server process on a loopback port, its files in `dir`: `start()` waits until it
    listens, `stop()` (SIGTERM, then SIGKILL) keeps its data for a restart, `close()`
    removes them."""
    name = "service"
    stop_timeout_s = 30.0
    dir: Path
    port: int

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout_s: float = 60.0):
        with open(self.dir / f"{self.name}.out", "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.dir}/{self.name}.out")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not listen on 127.0.0.1:{self.port} within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class KafkaBroker(Service):
    """One KRaft broker+controller; `stop()` and `start()` again keep its data (a restart)."""
    name = "kafka"

    def __init__(self, workdir: Path | None = None) -> None:
        super().__init__()
        self.libs = kafka_libs()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="kafka-"))
        self.port, self.controller_port = free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.config = self.dir / "server.properties"
        self.config.write_text("\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={self.dir / 'data'}",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            # A crashed detect process's open transaction is aborted within ~1 s of its
            # timeout (default check: every 10 s), so the tests wait less for its readers.
            "transaction.abort.timed.out.transaction.cleanup.interval.ms=1000",
            "group.initial.rebalance.delay.ms=0",
            "num.partitions=1",
            "auto.create.topics.enable=false",
        ]) + "\n")
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.config), check=True)

    def _java(self, main: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(self._java_command(main, *args), check=check, capture_output=True)

    def _java_command(self, main: str, *args: str) -> list[str]:
        return ["java", "-Xms256m", "-Xmx768m", "-cp", f"{self.libs}/*", main, *args]

    def command(self) -> list[str]:
        return self._java_command("kafka.Kafka", str(self.config))


def main() -> None:
    """scripts/kafka-local: run a broker in the foreground until Ctrl-C."""
    broker = KafkaBroker().start()
    print(f"Kafka {KAFKA_VERSION} (KRaft) listening on {broker.bootstrap}; data in {broker.dir}; Ctrl-C stops it",
          flush=True)
    try:
        broker.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        broker.close()


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found is None:
        raise RuntimeError("the MQTT tests need Mosquitto: install it (Debian/Ubuntu: apt-get install mosquitto)")
    return found


class Mosquitto(Service):
    """A Mosquitto broker on a free loopback port, with persistence: `stop()` (SIGTERM,
    so it writes its database) and `start()` again keep retained messages, persistent
    sessions and the QoS 1 messages queued for them (a restart)."""

    name = "mosquitto"
    stop_timeout_s = 10.0

    def __init__(self, workdir: Path | None = None) -> None:
        super().__init__()
        self.binary = mosquitto_binary()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="mosquitto-"))
        self.port = free_port()
        self.host = "127.0.0.1"
        self.config = self.dir / "mosquitto.conf"
        self.config.write_text("\n".join([
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.dir}/",
            # Started as root, Mosquitto switches to user `mosquitto`, who cannot write our temp dir.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            # A persistent session keeps everything published while its client is away
            # (the default, 1000 messages, is seconds of a site's readings).
            "max_queued_messages 10000000",
            "max_inflight_messages 1000",
            # Acks go out at once, not after Nagle's wait: a QoS 1 publisher waits for them.
            "set_tcp_nodelay true",
            f"log_dest file {self.dir / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]) + "\n")

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.config)]
