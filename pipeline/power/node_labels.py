"""What the scheduler says about nodes, read from where a fleet already says it: labels
that set flexibility classes (power/classes.py: a `[[power.classes]]` rule's `feature`),
and which job runs on each node (the site's firm capacity: Controller.firm).

A source is one `fetch()`. Slurm's labels are the node features an administrator gives in
slurm.conf or with `scontrol update NodeName=... Features=...` (`sinfo -a -N -h -o "%N|%f"`),
its jobs the running ones (`squeue -a -h -t R -O ...`: on a node jobs share, the one asking for
the most GPUs there); the cluster is the one
`SLURM_CONF` names, as for any Slurm client. Kubernetes' labels are each node's labels as
`key=value` (`kubectl label node NODE fleetwatch.io/flex=3`), its jobs the controllers of the
running pods (a Job, a PyTorchJob, a ReplicaSet...; a pod without one is its own job): on a
node, the one whose pods hold the most GPUs (`nvidia.com/gpu` limits; a node whose pods ask
for none counts as a job of its own); DaemonSet and mirror pods never count. The cluster is
the one `power.kubeconfig` names (pipeline/kube.py); the identity needs list on nodes and
pods. A `Poller` runs a fetch in the background
every `power.node_labels_interval_s` from the power role's loop, so a slow scheduler never
holds the control loop: a failure keeps what was last read (logged once until it changes).
Until the first read of labels every GPU is class 0, so that a node its scheduler protects
is never capped on a guess; until the first read of jobs each node counts as a job of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

from pipeline.kube import Cluster, connect, needs_node, said, unanswered
from pipeline.power.classes import FlexClasses

log = logging.getLogger("pipeline.power")

Labels = dict[str, frozenset[str]]
Jobs = dict[str, str]  # node -> the job running on it
FETCH_TIMEOUT_S = 10.0
GPU_RESOURCE = "nvidia.com/gpu"  # the NVIDIA device plugin's resource


class LabelsUnavailable(Exception):
    """The source could not say (what was wrong, and what to do)."""


class NodeLabelSource(Protocol):
    name: str

    async def fetch(self) -> Labels: ...


class JobSource(Protocol):
    name: str

    async def fetch(self) -> Jobs: ...


def parse_sinfo(text: str) -> Labels:
    """`sinfo -N -h -o "%N|%f"` lines: a node and its features, comma-separated, "(null)" for
    none; a node in several partitions is listed once per partition."""
    labels: dict[str, frozenset[str]] = {}
    for line in text.splitlines():
        node, sep, features = line.partition("|")
        node = node.strip()
        if not node or not sep:
            continue
        found = frozenset(f.strip() for f in features.split(",") if f.strip() and f.strip() != "(null)")
        labels[node] = labels.get(node, frozenset()) | found
    return labels


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list ("gpu-a[01-03,07],gpu-b1", "r[1-2]-n[1-2]") as names,
    in order; a range keeps its lower bound's zero padding, as Slurm writes it."""
    names: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(hostlist + ","):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            names += _expand_one(hostlist[start:i].strip())
            start = i + 1
    return names


def _expand_one(name: str) -> list[str]:
    if not name:
        return []
    open_ = name.find("[")
    close = name.find("]", open_)
    if open_ < 0 or close < 0:
        return [name]
    head, ranges, rest = name[:open_], name[open_ + 1:close], _expand_one(name[close + 1:]) or [""]
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        width = len(lo) if lo.startswith("0") else 0
        numbers = range(int(lo), int(hi or lo) + 1) if lo.isdigit() and (hi or lo).isdigit() else None
        for n in (numbers if numbers is not None else [part]):
            out += [f"{head}{str(n).zfill(width) if numbers is not None else n}{tail}" for tail in rest]
    return out


# squeue's fields, `|` after each (a field with no size is printed whole): a job's GPUs per node,
# per job or per task, as it asked for them (--gres/--gpus-per-node, --gpus, --gpus-per-task).
SQUEUE_FIELDS = "JobID:|,NodeList:|,tres-per-node:|,tres-per-job:|,tres-per-task:|,NumTasks:"


def gpus_of_tres(tres: str) -> int:
    """The GPUs a TRES list asks for ("gres:gpu:4", "gres/gpu:a100=2,gres:nic:1"; Slurm 22.05
    writes `gres:`, later ones `gres/`), 0 for none or "N/A"."""
    total = 0
    for entry in tres.split(","):
        name, *rest = entry.strip().removeprefix("gres:").removeprefix("gres/").replace("=", ":").split(":")
        if name == "gpu":
            total += int(rest[-1]) if rest and rest[-1].isdigit() else 1  # (a type alone: one)
    return total


def parse_squeue(text: str) -> Jobs:
    """`squeue -h -t R -O <SQUEUE_FIELDS>` lines: a running job, its nodes (a compressed host
    list) and what it asked for. A node several jobs share (select/cons_tres) is the job's that
    holds the most of its GPUs, as the Kubernetes source takes it; where they say none, the
    one on the most nodes (losing it loses the most); ties: the lowest job id."""
    held: dict[str, dict[str, tuple[int, int]]] = {}
    for line in text.splitlines():
        job, nodes, per_node, per_job, per_task, tasks, *_ = [*line.split("|"), "", "", "", "", ""]
        job, names = job.strip(), expand_hostlist(nodes.strip())
        if not job or not names:
            continue
        n = len(names)
        gpus = (gpus_of_tres(per_node) or -(-gpus_of_tres(per_job) // n)  # (spread evenly: rounded up)
                or -(-gpus_of_tres(per_task) * (int(tasks) if tasks.strip().isdigit() else 1) // n))
        for node in names:
            held.setdefault(node, {})[job] = (gpus, n)
    return {node: min(jobs, key=lambda j: (-jobs[j][0], -jobs[j][1], len(j), j)) for node, jobs in held.items()}


async def run_slurm(command: str, args: list[str], env: dict[str, str] | None, timeout_s: float,
                    setting: str) -> str:
    """A Slurm client's output; LabelsUnavailable saying what to do when it has none."""
    try:
        proc = await asyncio.create_subprocess_exec(command, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
    except OSError as e:  # not installed, not executable
        raise LabelsUnavailable(f"cannot run {command!r} ({e.strerror or e}): install Slurm's client "
                                f"(Debian: slurm-client) or set {setting} to its path") from None
    try:
        async with asyncio.timeout(timeout_s):  # (3.11's wait_for can lose a cancel: the process then never ends)
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise LabelsUnavailable(f"{command} did not answer within {timeout_s:g} s: is slurmctld up "
                                f"and reachable from here?") from None
    if proc.returncode != 0:
        first = (err.decode(errors="replace").strip().splitlines() or ["no message"])[0]
        raise LabelsUnavailable(f"{command} exited with {proc.returncode}: {first} (is slurmctld up, and "
                                f"does SLURM_CONF name the cluster?)")
    return out.decode(errors="replace")


@dataclass
class SlurmQuery:
    """A Slurm client command whose output, parsed, is what the source says."""
    command: str
    args: tuple[str, ...]
    parse: Callable[[str], Any]
    setting: str                     # the setting that names the command
    env: dict[str, str] | None = None
    timeout_s: float = FETCH_TIMEOUT_S
    name: ClassVar[str] = "slurm"

    async def fetch(self) -> Any:
        return self.parse(await run_slurm(self.command, list(self.args), self.env, self.timeout_s, self.setting))


def slurm_env(names: list[str] | None = None) -> dict[str, str]:
    """What Slurm's clients get of the daemon's environment: what remediation's commands get
    (`remediate.command_env`: PATH, SLURM_CONF, ...; a site adds SLURM_JWT there), never the rest
    (its Kafka password, its cloud credentials)."""
    from pipeline.config import COMMAND_ENV
    from pipeline.remediate.backends.command import command_env
    return command_env(list(COMMAND_ENV) if names is None else names)


def slurm_features(sinfo: str = "sinfo", env: dict[str, str] | None = None,
                   timeout_s: float = FETCH_TIMEOUT_S) -> SlurmQuery:
    """Each node's features (a NodeLabelSource)."""
    # -a: hidden partitions and those the querying user's group cannot use are nodes of the site too
    return SlurmQuery(sinfo, ("-a", "-N", "-h", "-o", "%N|%f"), parse_sinfo, "power.sinfo", env, timeout_s)


def slurm_jobs(squeue: str = "squeue", env: dict[str, str] | None = None,
               timeout_s: float = FETCH_TIMEOUT_S) -> SlurmQuery:
    """The running jobs' nodes (a JobSource)."""
    # -a: jobs in hidden partitions too (PrivateData=jobs still hides other users' jobs: run as root or SlurmUser)
    return SlurmQuery(squeue, ("-a", "-h", "-t", "R", "-O", SQUEUE_FIELDS), parse_squeue, "power.squeue", env,
                      timeout_s)


def parse_nodes(nodes) -> Labels:
    """A NodeList's items: each node's labels as `key=value` strings."""
    return {n.metadata.name: frozenset(f"{k}={v}" for k, v in (n.metadata.labels or {}).items()) for n in nodes}


def _gpus(pod) -> int:
    total = 0
    for container in pod.spec.containers or ():
        limit = ((container.resources.limits if container.resources else None) or {}).get(GPU_RESOURCE)
        if limit is not None and str(limit).isdigit():
            total += int(limit)
    return total


def parse_pods(pods) -> Jobs:
    """A PodList's items (running pods): the job holding the most GPUs of each node (its
    controller, or the pod itself; named namespace/kind/name), ties by name."""
    held: dict[str, dict[str, int]] = {}
    for pod in pods:
        node, gpus = pod.spec.node_name if pod.spec else None, _gpus(pod)
        if not node or not gpus or not needs_node(pod):
            continue
        meta = pod.metadata
        owner = next((r for r in meta.owner_references or () if r.controller), None)
        job = f"{meta.namespace}/{owner.kind}/{owner.name}" if owner else f"{meta.namespace}/Pod/{meta.name}"
        on = held.setdefault(node, {})
        on[job] = on.get(job, 0) + gpus
    return {node: min(jobs, key=lambda j: (-jobs[j], j)) for node, jobs in held.items()}


class KubernetesQuery:
    """A list on the Kubernetes API whose answer's items, parsed, are what the source says."""
    name: ClassVar[str] = "kubernetes"

    def __init__(self, cluster: Cluster, what: str, request: Callable[[Any, float], Any], parse: Callable[[Any], Any],
                 timeout_s: float = FETCH_TIMEOUT_S) -> None:
        self.cluster, self.what, self.request, self.parse, self.timeout_s = cluster, what, request, parse, timeout_s

    async def fetch(self) -> Any:
        return self.parse(await asyncio.to_thread(self._list))

    def _list(self) -> list:
        c = self.cluster
        try:
            # (connect, read): clients before 32 ignore a single float, waiting for ever
            return self.request(c.api, (self.timeout_s, self.timeout_s)).items
        except c.ApiException as e:
            status = said(e)
            if e.status == 401:
                raise LabelsUnavailable(f"the Kubernetes API did not accept fleetwatch's credentials listing "
                                        f"{self.what} ({status}): renew the token or client certificate of {c.where}") \
                    from None
            if e.status == 403:
                raise LabelsUnavailable(f"the Kubernetes API forbade listing {self.what} ({status}): RBAC: the "
                                        f"identity of {c.where} needs list on nodes (power.node_labels) and pods "
                                        f"(power.jobs), in a ClusterRole bound to it") from None
            raise LabelsUnavailable(f"the Kubernetes API failed listing {self.what} ({status}): is the API server "
                                    f"healthy (`kubectl get --raw /readyz`)?") from None
        except c.HTTPError as e:  # no answer at all
            raise LabelsUnavailable(unanswered(c, e, self.timeout_s, f"listing {self.what}", c.where)) from None


def kubernetes_labels(kubeconfig: str = "", timeout_s: float = FETCH_TIMEOUT_S) -> KubernetesQuery:
    """Each node's labels (a NodeLabelSource)."""
    cluster = connect(kubeconfig, "power.kubeconfig", "power.node_labels = kubernetes")
    return KubernetesQuery(cluster, "nodes", lambda api, t: api.list_node(_request_timeout=t), parse_nodes, timeout_s)


def kubernetes_jobs(kubeconfig: str = "", timeout_s: float = FETCH_TIMEOUT_S) -> KubernetesQuery:
    """The job on each node, from the running pods (a JobSource)."""
    cluster = connect(kubeconfig, "power.kubeconfig", "power.jobs = kubernetes")
    return KubernetesQuery(cluster, "pods", lambda api, t: api.list_pod_for_all_namespaces(
        field_selector="status.phase=Running", _request_timeout=t), parse_pods, timeout_s)


class Poller:
    """`poll()` from the role's loop: starts a fetch when one is due, hands a finished one's
    result to `take`. Never waits on the source."""
    what = ""  # what the source says, for the log

    def __init__(self, source: NodeLabelSource | JobSource, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source, self.interval_s, self.clock = source, interval_s, clock
        self._task: asyncio.Task | None = None
        self._next = -float("inf")
        self.failure = ""      # the last failure's message, "" after a read
        self.reads = 0
        self.failures = 0

    def poll(self) -> None:
        if self._task is not None and self._task.done():
            self._take(self._task)
            self._task = None
        if self._task is None and self.clock() >= self._next:
            self._next = self.clock() + self.interval_s
            self._task = asyncio.create_task(self.source.fetch())

    def take(self, result, again: bool) -> None:
        """A read's result (`again`: the first since a failure)."""

    def meanwhile(self) -> str:
        """What stands while the source fails."""
        return ""

    def _take(self, task: asyncio.Task) -> None:
        error = task.exception()
        if error is None:
            self.reads += 1
            self.take(task.result(), bool(self.failure))
            self.failure = ""
            return
        self.failures += 1
        message = str(error) if isinstance(error, LabelsUnavailable) else f"{type(error).__name__}: {error}"
        if message != self.failure:  # once until it changes: a scheduler down for an hour is one line
            log.warning("power: %s from %s: %s; %s", self.what, self.source.name, message, self.meanwhile())
        self.failure = message

    def status(self) -> dict:
        """For `fleetwatch power status --json`: whether it was read, and why not."""
        return {"source": self.source.name, "reads": self.reads, "failures": self.failures,
                "failing": self.failure or None}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class LabelPoller(Poller):
    """Node labels, handed to the flexibility classes."""
    what = "node labels"

    def __init__(self, source: NodeLabelSource, classes: FlexClasses, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(source, interval_s, clock)
        self.classes = classes

    def take(self, labels: Labels, again: bool) -> None:
        changed = self.classes.set_node_labels(labels)
        if again or self.reads == 1:
            log.info("power: node labels from %s: %d nodes, %d with labels%s", self.source.name, len(labels),
                     sum(1 for v in labels.values() if v), " (read again after a failure)" if again else "")
        elif changed:
            log.info("power: node labels from %s changed: flexibility classes taken again", self.source.name)

    def meanwhile(self) -> str:
        return ("the labels last read stand" if self.classes.labels_known
                else "until they are read every GPU is class 0 (never capped)")

    def status(self) -> dict:
        return {"source": self.source.name, "read": self.classes.labels_known, "nodes": len(self.classes.node_labels),
                **{k: v for k, v in super().status().items() if k != "source"}}


class JobPoller(Poller):
    """The jobs running on each node, handed to the controller (its firm capacity)."""
    what = "jobs"

    def __init__(self, source: JobSource, apply: Callable[[Jobs], None], interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(source, interval_s, clock)
        self.apply, self.jobs = apply, 0

    def take(self, jobs: Jobs, again: bool) -> None:
        self.apply(jobs)
        self.jobs = len(set(jobs.values()))
        if again or self.reads == 1:
            log.info("power: jobs from %s: %d running on %d nodes%s", self.source.name, self.jobs, len(jobs),
                     " (read again after a failure)" if again else "")

    def meanwhile(self) -> str:
        return "the jobs last read stand" if self.reads else "until they are read each node counts as a job of its own"

    def status(self) -> dict:
        return {**super().status(), "jobs": self.jobs}


def poller_for(settings, classes: FlexClasses, env_names: list[str] | None = None) -> LabelPoller | None:
    """The poller `power.node_labels` asks for; None for "none". `env_names`: what of the daemon's
    environment a Slurm client gets (remediate.command_env)."""
    if settings.node_labels == "slurm":
        return LabelPoller(slurm_features(settings.sinfo, slurm_env(env_names)), classes,
                           settings.node_labels_interval_s)
    if settings.node_labels == "kubernetes":
        return LabelPoller(kubernetes_labels(settings.kubeconfig), classes, settings.node_labels_interval_s)
    return None


def job_poller_for(settings, apply: Callable[[Jobs], None], env_names: list[str] | None = None) -> JobPoller | None:
    """The poller `power.jobs` asks for; None for "none". `env_names`: as poller_for's."""
    if settings.jobs == "slurm":
        return JobPoller(slurm_jobs(settings.squeue, slurm_env(env_names)), apply, settings.node_labels_interval_s)
    if settings.jobs == "kubernetes":
        return JobPoller(kubernetes_jobs(settings.kubeconfig), apply, settings.node_labels_interval_s)
    return None
