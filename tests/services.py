"""Real services for tests and local development, started on free loopback ports.

Apache Kafka comes from Maven Central (scripts/kafka/pom.xml: kafka_2.13 and its
runtime dependencies, fetched once into a cache) and runs as a single KRaft
broker+controller on the machine's Java 17. `scripts/kafka-local` runs one in the
foreground for development. Mosquitto, Alertmanager and Prometheus come from Debian (`apt-get install
mosquitto prometheus-alertmanager prometheus`). HttpReceiver is a webhook receiver that fails on purpose.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from pipeline.sinks.webhook import verify_signature

REPO = Path(__file__).resolve().parents[1]
KAFKA_VERSION = "4.4.0"
S3PROXY_VERSION = "4.1.0"
CACHE = Path(os.environ.get("KAFKA_LOCAL_CACHE", Path.home() / ".cache" / "fleetwatch"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def maven_libs(project: str, version: str, jar: str) -> Path:
    """The jars of `scripts/<project>/pom.xml`'s dependency and its runtime dependencies,
    fetched from Maven Central once (into CACHE/<project>-<version>/libs; `jar` is there when done)."""
    libs = CACHE / f"{project}-{version}" / "libs"
    if (libs / jar).exists():
        return libs
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise RuntimeError(f"{project} for tests needs Java 17 and Maven (mvn) on PATH")
    tmp = libs.with_name("libs.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["mvn", "-q", "-B", "-f", str(REPO / "scripts" / project / "pom.xml"),
                    "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={tmp}",
                    f"-D{project}.version={version}"], check=True)
    tmp.replace(libs)
    return libs


def kafka_libs() -> Path:
    return maven_libs("kafka", KAFKA_VERSION, f"kafka_2.13-{KAFKA_VERSION}.jar")


def s3proxy_libs() -> Path:
    """s3proxy (an S3-compatible server, its filesystem backend built in) and its dependencies, ~60 MB."""
    return maven_libs("s3proxy", S3PROXY_VERSION, f"s3proxy-{S3PROXY_VERSION}.jar")


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
        self.spawn()
        return self.wait_listening(timeout_s)

    def spawn(self) -> None:
        """Start the process and return at once (several servers can start side by side)."""
        with open(self.dir / f"{self.name}.out", "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_listening(self, timeout_s: float = 60.0):
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

    def wait_ready(self, url: str, timeout_s: float, context=None):
        """Listening is not ready: wait until `url` answers 200 (https: with `context`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready within {timeout_s} s; see {self.dir}/{self.name}.out")
            time.sleep(0.1)

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


def _tail(proc: subprocess.CompletedProcess) -> str:
    """What a finished command said last (its exit status, the end of stderr, else stdout)."""
    said = (proc.stderr or proc.stdout or b"").decode(errors="replace").strip()
    return f"exit {proc.returncode}: {said[-1500:] or 'no output'}"


def kafka_cluster_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


class KafkaBroker(Service):
    """One KRaft broker+controller; `stop()` and `start()` again keep its data (a restart).
    KafkaCluster makes several (`node_id`, the controller ports of all `voters`, one
    `cluster_id`, internal topics with `replicas` replicas); a subclass adds listeners and
    settings with extra_properties() (later lines win) and format_args()."""
    name = "kafka"

    def __init__(self, workdir: Path | None = None, *, node_id: int = 1, voters: dict[int, int] | None = None,
                 cluster_id: str | None = None, replicas: int = 1) -> None:
        super().__init__()
        self.libs = kafka_libs()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="kafka-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.node_id = node_id
        self.port = free_port()
        self.controller_port = (voters or {}).get(node_id) or free_port()
        voters = voters or {node_id: self.controller_port}
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.config = self.dir / "server.properties"
        self.config.write_text("\n".join([
            "process.roles=broker,controller",
            f"node.id={node_id}",
            "controller.quorum.voters=" + ",".join(f"{n}@127.0.0.1:{port}" for n, port in sorted(voters.items())),
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={self.dir / 'data'}",
            f"offsets.topic.replication.factor={replicas}",
            "offsets.topic.num.partitions=4",
            f"transaction.state.log.replication.factor={replicas}",
            f"transaction.state.log.min.isr={min(2, replicas)}",
            # A crashed detect process's open transaction is aborted within ~1 s of its
            # timeout (default check: every 10 s), so the tests wait less for its readers.
            "transaction.abort.timed.out.transaction.cleanup.interval.ms=1000",
            "group.initial.rebalance.delay.ms=0",
            "num.partitions=1",
            "auto.create.topics.enable=false",
            *self.extra_properties(),
        ]) + "\n")
        # "=": an id that starts with "-" (1 in 64) would otherwise be read as an option: a flaky start.
        fmt = ("kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id or kafka_cluster_id()}", "-c",
               str(self.config), *self.format_args())
        # Once (a clean-clone CI, 2026-12-05) the format exited 1 and no one saw why: it is tried once
        # more (over what a half-done first try left), and what it said is shown either way.
        first = self._java(*fmt)
        if first.returncode != 0:
            again = self._java(*fmt, "--ignore-formatted")
            if again.returncode != 0:
                raise RuntimeError(f"kafka-storage format failed twice: {_tail(first)} / {_tail(again)}")
            print(f"kafka-storage format failed once, then worked: {_tail(first)}", file=sys.stderr)

    def extra_properties(self) -> list[str]:
        return []

    def format_args(self) -> list[str]:
        return []

    def _java(self, main: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(self._java_command(main, *args), check=check, capture_output=True)

    def _java_command(self, main: str, *args: str) -> list[str]:
        return ["java", "-Xms256m", "-Xmx768m", "-cp", f"{self.libs}/*", main, *args]

    def command(self) -> list[str]:
        return self._java_command("kafka.Kafka", str(self.config))


class KafkaCluster:
    """`size` KRaft nodes, each a broker and a controller voter, one cluster id: with three,
    one node may stop and the quorum and every topic with 3 replicas go on. The internal
    topics (offsets, transactions) get 3 replicas and min.insync 2. A stopped broker is
    fenced within a few seconds (not the default 9 s), so that writes waiting for it move on."""

    def __init__(self, size: int = 3, workdir: Path | None = None) -> None:
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="kafka-cluster-"))
        voters = {n: free_port() for n in range(1, size + 1)}
        cluster_id = kafka_cluster_id()
        self.nodes = [_ClusterNode(self.dir / f"node-{n}", node_id=n, voters=voters, cluster_id=cluster_id,
                                   replicas=min(3, size)) for n in voters]
        self.bootstrap = ",".join(node.bootstrap for node in self.nodes)

    def start(self, timeout_s: float = 120.0) -> "KafkaCluster":
        """Start every node side by side; return once all of them are brokers of the cluster."""
        for node in self.nodes:
            node.spawn()
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            node.wait_listening(max(1.0, deadline - time.monotonic()))
        while len(self.brokers()) < len(self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Kafka cluster has {self.brokers()} of {len(self.nodes)} brokers after "
                                   f"{timeout_s} s; see {self.dir}/node-*/kafka.out")
            time.sleep(0.5)
        return self

    def brokers(self) -> list[int]:
        """The node ids of the brokers the cluster's metadata lists now."""
        import asyncio

        from aiokafka.admin import AIOKafkaAdminClient

        async def ask() -> list[int]:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
            try:
                await admin.start()
                return sorted(b["node_id"] for b in (await admin.describe_cluster())["brokers"])
            except Exception:
                return []
            finally:
                await admin.close()
        return asyncio.run(ask())

    def node(self, node_id: int) -> KafkaBroker:
        return next(n for n in self.nodes if n.node_id == node_id)

    def close(self) -> None:
        """Kill every node (SIGKILL: the data goes anyway, and the last nodes of a quorum would
        wait for the others to shut down in order) and remove their files."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.kill()
        for node in self.nodes:
            if node.proc is not None:
                node.proc.wait()
            node.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class _ClusterNode(KafkaBroker):
    def extra_properties(self) -> list[str]:
        return ["broker.session.timeout.ms=4000", "broker.heartbeat.interval.ms=1000",
                "replica.lag.time.max.ms=5000", "default.replication.factor=3"]

    def _java_command(self, main: str, *args: str) -> list[str]:  # three JVMs on a small machine
        return ["java", "-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-cp", f"{self.libs}/*", main, *args]


def self_signed_tls(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> dict[str, Path]:
    """A test CA and a server certificate it signed for `hosts` (made with openssl): paths
    of ca.pem, server.pem (certificate), server.key (unencrypted PKCS#8) and
    server-keystore.pem (key and certificate: a Kafka PEM keystore)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the TLS tests need openssl (Debian/Ubuntu: apt-get install openssl)")
    folder.mkdir(parents=True, exist_ok=True)
    f = {name: folder / name for name in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem",
                                          "server-keystore.pem", "server.ext")}
    san = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hosts)
    f["server.ext"].write_text(f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
                               "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
                               "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(f["ca.key"]), "-out", str(f["ca.pem"]),
            "-days", "2", "-subj", "/CN=Fleetwatch test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(f["server.key"]), "-out", str(f["server.csr"]),
            "-subj", f"/CN={hosts[-1]}")
    openssl("x509", "-req", "-in", str(f["server.csr"]), "-CA", str(f["ca.pem"]), "-CAkey", str(f["ca.key"]),
            "-CAcreateserial", "-out", str(f["server.pem"]), "-days", "2", "-extfile", str(f["server.ext"]))
    f["server-keystore.pem"].write_text(f["server.key"].read_text() + f["server.pem"].read_text())
    return f


def client_certificate(ca: dict[str, Path], folder: Path, cn: str) -> tuple[Path, Path]:
    """A client certificate for mutual TLS that `ca` (self_signed_tls's) signed: its PEM file and key."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key, csr, ext = (folder / f"{cn}.{x}" for x in ("pem", "key", "csr", "ext"))
    ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=clientAuth\n")
    for args in (("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}"),
                 ("x509", "-req", "-in", str(csr), "-CA", str(ca["ca.pem"]), "-CAkey", str(ca["ca.key"]),
                  "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    return cert, key


class SecureKafkaBroker(KafkaBroker):
    """A broker whose clients connect on `bootstrap` over SASL_SSL: TLS with a certificate of a
    self-signed test CA (`tls["ca.pem"]`), SASL PLAIN for user `admin` and SCRAM-SHA-256 for
    `agent` (and each of `users`), with the standard authorizer. `admin` is a super user; the
    others may do only what `allow()` grants them. Between the broker and its controller, and on `internal` (for
    `allow()`), plain text on loopback."""
    name = "kafka"

    def __init__(self, admin_password: str, agent_password: str, workdir: Path | None = None,
                 users: dict[str, str] | None = None) -> None:
        folder = Path(workdir or tempfile.mkdtemp(prefix="kafka-tls-"))
        self.users = {"agent": agent_password, **(users or {})}  # SCRAM users: name -> password
        self.tls = self_signed_tls(folder / "tls")
        self.secure_port = free_port()
        self.admin_password, self.agent_password = admin_password, agent_password
        super().__init__(folder)
        self.internal = self.bootstrap
        self.bootstrap = f"127.0.0.1:{self.secure_port}"

    def extra_properties(self) -> list[str]:
        listener = "listener.name.sasl_ssl."
        return [
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port},"
            f"SASL_SSL://127.0.0.1:{self.secure_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port},SASL_SSL://127.0.0.1:{self.secure_port}",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL",
            "inter.broker.listener.name=PLAINTEXT",
            "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256",
            f"{listener}sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256",
            f"{listener}plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required "
            f"user_admin=\"{self.admin_password}\";",
            f"{listener}scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule "
            "required;",
            f"{listener}ssl.keystore.type=PEM",
            f"{listener}ssl.keystore.location={self.tls['server-keystore.pem']}",
            f"{listener}ssl.client.auth=none",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users=User:admin;User:ANONYMOUS",  # ANONYMOUS: the plain-text broker-controller traffic
            "allow.everyone.if.no.acl.found=false",
        ]

    def format_args(self) -> list[str]:
        return [f"--add-scram=SCRAM-SHA-256=[name={name},password={password}]" for name, password in self.users.items()]

    def allow(self, *acl_args: str, user: str = "agent") -> None:
        """Grant `user` rights: AclCommand's arguments after --allow-principal, e.g.
        ("--operation", "Write", "--topic", "*")."""
        r = self._java("org.apache.kafka.tools.AclCommand", "--bootstrap-server", self.internal, "--add",
                       "--allow-principal", f"User:{user}", *acl_args)
        if r.returncode != 0:
            raise RuntimeError(f"AclCommand failed: {r.stderr.decode(errors='replace')[-2000:]}")


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

    def __init__(self, workdir: Path | None = None, users: dict[str, str] | None = None,
                 tls: dict[str, Path] | None = None, client_ca: Path | None = None) -> None:
        """users: name -> password, and no anonymous client; tls: self_signed_tls's files, the
        listener speaks TLS only; client_ca: and takes only clients with a certificate that CA signed."""
        super().__init__()
        self.binary = mosquitto_binary()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="mosquitto-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = "127.0.0.1"
        self.config = self.dir / "mosquitto.conf"
        access = ["allow_anonymous true"]
        if users:
            passwords = self.dir / "passwords"
            passwords.write_text("")
            for name, password in users.items():
                subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b", str(passwords),
                                name, password], check=True, capture_output=True)
            access = ["allow_anonymous false", f"password_file {passwords}"]
        if tls:
            access += [f"cafile {client_ca or tls['ca.pem']}", f"certfile {tls['server.pem']}",
                       f"keyfile {tls['server.key']}", *(["require_certificate true"] if client_ca else [])]
        self.config.write_text("\n".join([
            f"listener {self.port} 127.0.0.1",
            *access,
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


def slurm_binary(name: str) -> str:
    found = shutil.which(name) or next((f"{d}/{name}" for d in ("/usr/sbin", "/usr/bin") if Path(f"{d}/{name}").exists()),
                                       None)
    if found is None:
        raise RuntimeError(f"the Slurm tests need {name}: install it (Debian/Ubuntu: apt-get install slurmctld "
                           f"slurm-client)")
    return found


class Slurmctld(Service):
    """A private slurmctld (no slurmd, no munge: auth/none, for tests only) on a free
    loopback port, with `nodes` (name -> features) that exist only in its config (DOWN,
    never contacted). Clients find it by `env` (SLURM_CONF).

    With `slurmd_node` (one of `nodes`), a real slurmd runs that node on this machine
    (`apt-get install slurmd`; as root, since it runs the test jobs as their user): it is
    IDLE once `start()` returns, and takes jobs (`sbatch -w NODE`). With `gpus`, that node has
    as many GPUs as generic resources (gres/gpu, on character devices made for them under the
    workdir: Slurm hands a job the indices of the ones it gets), and `prolog` runs as slurmd's
    Prolog and Epilog (PrologFlags=Alloc: at allocation, as a site runs its job-map scripts)."""

    name = "slurmctld"
    stop_timeout_s = 10.0

    def __init__(self, nodes: dict[str, str], workdir: Path | None = None, slurmd_node: str | None = None,
                 gpus: int = 0, prolog: Path | None = None) -> None:
        super().__init__()
        self.binary = slurm_binary("slurmctld")
        self.slurmd_node, self.slurmd = slurmd_node, None
        if slurmd_node is not None:
            assert slurmd_node in nodes, f"slurmd_node {slurmd_node!r} is not one of the nodes"
            if shutil.which("slurmd") is None and not Path("/usr/sbin/slurmd").exists():
                raise RuntimeError("the slurmd tests need slurmd: install it (Debian/Ubuntu: apt-get install slurmd)")
            if os.geteuid() != 0:
                raise RuntimeError("the slurmd tests run slurmd, which must be root to start the test jobs")
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="slurm-"))
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        me = pwd.getpwuid(os.getuid()).pw_name
        d = self.dir
        self.config = d / "slurm.conf"
        self.config.write_text("\n".join([
            "ClusterName=fleetwatch-test",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}",  # slurmctld starts only where it names itself
            f"SlurmUser={me}", f"SlurmdUser={me}",
            f"SlurmctldPort={self.port}", f"SlurmdPort={free_port()}",
            "AuthType=auth/none", "CredType=cred/none", "MailProg=/bin/true",
            f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SchedulerType=sched/builtin", "SelectType=select/cons_tres",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none", "ReturnToService=0",
            # NodeAddr: a name that does not resolve costs slurmctld ~10 s at start, then hides the node.
            # slurmd's node: no State, so that it is IDLE once its slurmd registers (ReturnToService=0
            # keeps a DOWN one DOWN).
            *(f"NodeName={n} NodeAddr=127.0.0.1 CPUs={2 if gpus and n == slurmd_node else 1} RealMemory=1000"
              + (" State=DOWN Reason=test" if n != slurmd_node else f" Gres=gpu:{gpus}" if gpus else "")
              + (f" Features={f}" if f else "") for n, f in nodes.items()),
            "PartitionName=gpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            *(["GresTypes=gpu"] if gpus else []),
            *([f"Prolog={prolog}", f"Epilog={prolog}", "PrologFlags=Alloc"] if prolog else []),
        ]) + "\n")
        if gpus:
            assert slurmd_node is not None, "gpus are the slurmd node's"
            dev = d / "dev"
            dev.mkdir(exist_ok=True)
            for i in range(gpus):  # (NVIDIA's major number; no driver behind them: only their indices matter)
                if not (dev / f"nvidia{i}").exists():
                    os.mknod(dev / f"nvidia{i}", 0o600 | stat.S_IFCHR, os.makedev(195, i))
            (d / "gres.conf").write_text(f"NodeName={slurmd_node} Name=gpu File={dev}/nvidia[0-{gpus - 1}]\n")
        self.env = {**os.environ, "SLURM_CONF": str(self.config)}

    def command(self) -> list[str]:
        return [self.binary, "-D", "-c", "-f", str(self.config)]

    def scontrol(self, *args: str) -> None:
        subprocess.run([slurm_binary("scontrol"), *args], env=self.env, check=True, capture_output=True, timeout=30)

    def start(self, timeout_s: float = 60.0) -> "Slurmctld":
        super().start(timeout_s)
        if self.slurmd_node is not None:
            self._start_slurmd(timeout_s)
        return self

    def _start_slurmd(self, timeout_s: float) -> None:
        """slurmd once slurmctld answers (it registers once, at its start); back when its node is IDLE."""
        scontrol, deadline = slurm_binary("scontrol"), time.monotonic() + timeout_s

        def ask(*args: str) -> str:
            return subprocess.run([scontrol, *args], env=self.env, capture_output=True, text=True, timeout=30).stdout
        while "UP" not in ask("ping"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"slurmctld did not answer within {timeout_s} s; see {self.dir}/slurmctld.log")
            time.sleep(0.1)
        with open(self.dir / "slurmd.out", "ab") as log:
            self.slurmd = subprocess.Popen([slurm_binary("slurmd"), "-D", "-N", self.slurmd_node, "-f",
                                            str(self.config)], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        while " State=IDLE " not in ask("show", "node", self.slurmd_node, "--oneliner"):
            if self.slurmd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.slurmd_node} did not become IDLE under slurmd within {timeout_s} s; see "
                                   f"{self.dir}/slurmd.out")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.slurmd is not None:
            # The jobs first: their slurmstepd would outlive slurmd.
            subprocess.run([slurm_binary("scancel"), "-w", self.slurmd_node], env=self.env, capture_output=True,
                           timeout=30)
            self.slurmd.terminate()
            try:
                self.slurmd.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.slurmd.kill()
                self.slurmd.wait()
            self.slurmd = None
        super().stop()


class _ReceiverServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up waiting is expected
            super().handle_error(request, client_address)


class HttpReceiver:
    """A real HTTP receiver (keep-alive, in a thread) that fails on purpose: `status` is
    what it answers (500, 400...; a callable of the request body may decide per request),
    `delay_s` how long it sleeps first, `fail_first` how many requests get `fail_status`
    before it answers `status`; `stop()` closes the port (connection refused) and `start()`
    opens the same port again. It records each request's Idempotency-Key, in arrival order
    (taken: answered 2xx), and checks signatures when given the secret. With `tls` (a
    certificate and key file) it speaks HTTPS."""

    def __init__(self, secret: bytes | None = None, keep_bodies: bool = False, path: str = "/hook",
                 tls: tuple[Path, Path] | None = None) -> None:
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}{path}"
        self.secret, self.keep_bodies, self.tls = secret, keep_bodies, tls
        self.status: int | Callable[[bytes], int] = 200
        self.delay_s = 0.0
        self.fail_first, self.fail_status = 0, 500
        self.requests: list[tuple[str, int]] = []  # (Idempotency-Key, status answered), in arrival order
        self.taken: list[str] = []                 # keys answered 2xx, with duplicates
        self.bodies: list[dict] = []               # parsed bodies of the taken requests (keep_bodies)
        self.headers: list[dict] = []              # headers of the taken requests (keep_bodies)
        self.bad_signatures = 0
        self.lock = threading.Lock()
        self.server: _ReceiverServer | None = None
        self.connections: set[socket.socket] = set()

    def start(self) -> "HttpReceiver":
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do

            def setup(self) -> None:
                super().setup()
                # The answer's head and body are two writes: without this, Nagle holds the body for
                # the client's delayed ACK (40 ms a request).
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                outer.connections.add(self.connection)

            def finish(self) -> None:
                outer.connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = outer.answer(body, dict(self.headers))
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                self.send_response(status)
                text = b"{}" if status < 300 else f"refused with {status} on purpose".encode()
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *args) -> None:
                pass

        self.server = _ReceiverServer(("127.0.0.1", self.port), Handler)
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def answer(self, body: bytes, headers: dict) -> int:
        with self.lock:
            if len(self.requests) < self.fail_first:
                status = self.fail_status
            else:
                status = self.status(body) if callable(self.status) else self.status
            key = headers.get("Idempotency-Key", "")
            self.requests.append((key, status))
            if self.secret is not None and not verify_signature(
                    self.secret, headers.get("X-Fleetwatch-Signature", ""), body, time.time()):
                self.bad_signatures += 1
            if 200 <= status < 300:  # taken before the answer goes out, as a real receiver would
                self.taken.append(key)
                if self.keep_bodies:
                    self.bodies.append(json.loads(body))
                    self.headers.append(headers)
            return status

    def unique(self) -> list[str]:
        """Taken keys without duplicates, in first-arrival order (what a deduplicating receiver keeps)."""
        return list(dict.fromkeys(self.taken))

    @property
    def duplicates(self) -> int:
        return len(self.taken) - len(set(self.taken))

    def stop(self) -> None:
        """Down: the port refuses connections and the open ones are cut."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        for conn in list(self.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def alertmanager_binary() -> str:
    found = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if found is None:
        raise RuntimeError("the Alertmanager tests need Alertmanager: install it (Debian/Ubuntu: apt-get install "
                           "prometheus-alertmanager)")
    return found


class Alertmanager(Service):
    """A Prometheus Alertmanager on a free loopback port, clustering off, routing every
    alert (grouped by alertname and rack, 1 s group_wait and group_interval) to one
    webhook receiver with send_resolved; or run with `config`, a file of its own."""

    name = "alertmanager"
    stop_timeout_s = 10.0

    def __init__(self, webhook_url: str = "", workdir: Path | None = None, config: Path | None = None,
                 client_tls: tuple[dict[str, Path], tuple[Path, Path]] | None = None) -> None:
        """client_tls: (self_signed_tls's files, a client certificate and key it signed): Alertmanager
        speaks HTTPS and takes only clients with a certificate that CA signed (its web config)."""
        super().__init__()
        self.binary = alertmanager_binary()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="alertmanager-"))
        self.port = free_port()
        self.url = f"{'https' if client_tls else 'http'}://127.0.0.1:{self.port}"
        self.web_config, self.client_context = None, None
        if client_tls is not None:
            ca, (cert, key) = client_tls
            self.dir.mkdir(parents=True, exist_ok=True)
            self.web_config = self.dir / "web.yml"
            self.web_config.write_text(f"tls_server_config:\n  cert_file: {ca['server.pem']}\n  key_file: "
                                       f"{ca['server.key']}\n  client_auth_type: RequireAndVerifyClientCert\n"
                                       f"  client_ca_file: {ca['ca.pem']}\n")
            self.client_context = ssl.create_default_context(cafile=str(ca["ca.pem"]))
            self.client_context.load_cert_chain(cert, key)
        self.config = config or self.dir / "alertmanager.yml"
        if config is None:
            self._write_config(webhook_url)

    def _write_config(self, webhook_url: str) -> None:
        self.config.write_text("\n".join([
            "route:",
            "  receiver: test",
            "  group_by: [alertname, rack]",
            "  group_wait: 1s",
            "  group_interval: 1s",
            "  repeat_interval: 1h",
            "receivers:",
            "  - name: test",
            "    webhook_configs:",
            f"      - url: {webhook_url}",
            "        send_resolved: true",
        ]) + "\n")

    def command(self) -> list[str]:
        return [self.binary, f"--config.file={self.config}", f"--storage.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=",
                *([f"--web.config.file={self.web_config}"] if self.web_config else [])]

    def start(self, timeout_s: float = 60.0) -> "Alertmanager":
        super().start(timeout_s)
        return self.wait_ready(f"{self.url}/-/ready", timeout_s, self.client_context)


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise RuntimeError("the Prometheus tests need Prometheus: install it (Debian/Ubuntu: apt-get install "
                           "prometheus)")
    return found


class Prometheus(Service):
    """A Prometheus server on a free loopback port that scrapes `targets` (HOST:PORT, job
    `fleetwatch`) every `interval` and evaluates the alerting rules of `rule_files`; `query(expr)`
    asks its HTTP API, as Grafana does."""

    name = "prometheus"
    stop_timeout_s = 10.0

    def __init__(self, targets: list[str], interval: str = "1s", workdir: Path | None = None,
                 rule_files: tuple[Path, ...] = ()) -> None:
        super().__init__()
        self.binary = prometheus_binary()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="prometheus-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = self.dir / "prometheus.yml"
        self.config.write_text("\n".join([
            "global:",
            f"  scrape_interval: {interval}",
            f"  evaluation_interval: {interval}",
            f"rule_files: [{', '.join(json.dumps(str(f)) for f in rule_files)}]",
            "scrape_configs:",
            "  - job_name: fleetwatch",
            f"    scrape_timeout: {interval}",
            f"    static_configs: [{{targets: [{', '.join(json.dumps(t) for t in targets)}]}}]",
        ]) + "\n")

    def command(self) -> list[str]:
        return [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]

    def start(self, timeout_s: float = 60.0) -> "Prometheus":
        super().start(timeout_s)
        return self.wait_ready(f"{self.url}/-/ready", timeout_s)

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's result: [{"metric": {labels}, "value": [time, "value"]}, ...]."""
        return self.api("query", query=expr)["result"]



class S3Proxy(Service):
    """s3proxy, an S3-compatible server, on a free loopback port: plain HTTP, AWS SigV2/V4
    auth for `access_key`/`secret_key`, objects kept as files under `dir`/data (its filesystem
    backend), so `stop()` and `start()` again keep them. `storage_options` are what deltalake
    and polars need to reach it."""

    name = "s3proxy"
    stop_timeout_s = 10.0

    def __init__(self, workdir: Path | None = None, access_key: str = "fleetwatch",
                 secret_key: str = "fleetwatch-secret") -> None:
        super().__init__()
        self.libs = s3proxy_libs()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="s3proxy-"))
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key, self.secret_key = access_key, secret_key
        self.config = self.dir / "s3proxy.properties"
        self.config.write_text("\n".join([
            f"s3proxy.endpoint={self.endpoint}",
            "s3proxy.authorization=aws-v2-or-v4",
            f"s3proxy.identity={access_key}",
            f"s3proxy.credential={secret_key}",
            "jclouds.provider=filesystem",
            # The backend's own identity: unused by the filesystem, but s3proxy requires one.
            "jclouds.identity=local",
            "jclouds.credential=local",
            f"jclouds.filesystem.basedir={self.dir / 'data'}",
        ]) + "\n")
        # Without a config logback logs at DEBUG: a line per Jetty event and request.
        self.logback = self.dir / "logback.xml"
        self.logback.write_text('<configuration><appender name="out" class="ch.qos.logback.core.ConsoleAppender">'
                                '<encoder><pattern>%d %-5level %logger{36} - %msg%n</pattern></encoder></appender>'
                                '<root level="WARN"><appender-ref ref="out"/></root></configuration>\n')

    def command(self) -> list[str]:
        return ["java", "-Xms64m", "-Xmx512m", "-XX:+UseSerialGC", f"-Dlogback.configurationFile={self.logback}",
                "-cp", f"{self.libs}/*", "org.gaul.s3proxy.Main", "--properties", str(self.config)]

    # Jetty opens its connector only after its handlers have started: listening is ready.

    @property
    def storage_options(self) -> dict[str, str]:
        """deltalake/polars (object_store) options. Commits are safe for concurrent writers with
        no more: object_store PUTs each commit file with If-None-Match: *, which s3proxy honours."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}

    def create_bucket(self, name: str) -> None:
        from pyarrow.fs import S3FileSystem  # pyarrow signs the request; no boto3 needed
        S3FileSystem(access_key=self.access_key, secret_key=self.secret_key, endpoint_override=self.endpoint,
                     scheme="http", region="us-east-1", allow_bucket_creation=True).create_dir(name)
