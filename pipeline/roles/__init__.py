"""The role table: every role a fleetwatch process can run, in one place.

A row says what the role is (a source, detect, a sink), what it reads (topics and
consumer group, and topics it reads outside a group) and writes (every topic it produces to:
the Kafka ACLs a role's user needs are made from it, bus/acls.py), when `fleetwatch run` includes it, what it needs from the
configuration, and where its builder is (`module:function`, imported only when a
process runs the role: a notify-only process never imports the detector, whose
import compiles Numba kernels). The daemon (pipeline/daemon.py) builds the rows of
its roles through roles/context.py, starts them, and drains them stage by stage.
The command line makes one subcommand per row (`fleetwatch power` also has the actions
that manage its requests: request, status, cancel, report).

Builders take (ctx, spec): a source's returns a `Source` (sources/base.py), detect's
and a sink's return the coroutine function that consumes until its input ends, or
None when the configuration turns the role off (archive.enabled = false).

Importing this module is cheap: nothing heavy is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pipeline.bus.base import Topic
from pipeline.config import Config

# Stages, in drain order: the sources stop first; the collectors (which read what other
# sources of this process may still be sending them, e.g. over MQTT) after them; then the
# sources' topics end, detect finishes and its topics end; then what acts on detect's verdicts
# (remediation) finishes and its topic ends; then the sinks finish.
SOURCE, COLLECTOR, DETECT, ACT, SINK = "source", "collector", "detect", "act", "sink"
CONSUMER_STAGES = (DETECT, ACT, SINK)

# Power requests (the grid signal) come from outside, like the sources' data: they end with them.
SOURCE_TOPICS = [Topic.GPU, Topic.FACILITY, Topic.EVENTS, Topic.LABELS, Topic.POWER_ACTIONS, Topic.POWER_REQUESTS]
DETECT_TOPICS = [Topic.ALERTS, Topic.HEALTH, Topic.POWER_CAPS, Topic.POWER_REPORTS]
ACT_TOPICS = [Topic.REMEDIATION]
DATASET_OF_TOPIC = {Topic.GPU: "gpu_samples", Topic.FACILITY: "facility_samples", Topic.EVENTS: "events",
                    Topic.ALERTS: "alerts", Topic.HEALTH: "node_health", Topic.LABELS: "fault_labels",
                    Topic.POWER_ACTIONS: "power_actions", Topic.POWER_REPORTS: "power_requests",
                    Topic.REMEDIATION: "remediation_events"}


@dataclass(frozen=True)
class RoleOption:
    """A command-line option of a role: `--flag VALUE` sets the config key `key`."""
    flag: str                 # "--dcgm-targets"
    metavar: str
    help: str
    key: str                  # "section.name" it sets
    split: bool = False       # a comma-separated list
    implies_source: str = ""  # with `run`: this daemon.source, unless --source says otherwise
    switch: bool = False      # a flag without a value: it sets the key to `sets`
    sets: bool = True

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def value(self, text):
        if self.switch:
            return self.sets
        return [t.strip() for t in text.split(",") if t.strip()] if self.split else text


MQTT = RoleOption("--mqtt", "HOST:PORT", "the BMS's MQTT broker (mqtt.broker): the simulator publishes its facility "
                  "data there, the facility collector reads it", "mqtt.broker")
REPLAY = RoleOption("--replay", "DIR", "replay recorded NVML data instead of the GPUs (agent.replay): h100 or h200, "
                    "the shipped recordings of a real H100 and H200, or a directory of the same files", "agent.replay",
                    implies_source="nvml")
DCGM_TARGETS = RoleOption("--dcgm-targets", "URL[,URL...]", "dcgm-exporter endpoints to scrape (dcgm.targets): URLs "
                          "or HOST:PORT, comma-separated; with `run` they imply --source dcgm", "dcgm.targets",
                          split=True, implies_source="dcgm")

DRY_RUN = RoleOption("--dry-run", "", "the power role plans and reports each request's caps but applies none "
                     "(power.dry_run)", "power.dry_run", switch=True)
APPLY = RoleOption("--apply", "", "apply remediations through remediate.backend (remediate.dry_run = false); "
                   "without it every transition is planned, logged and archived, and nothing is applied",
                   "remediate.dry_run", switch=True, sets=False)


@dataclass(frozen=True)
class RoleSpec:
    name: str
    stage: str                                # SOURCE, COLLECTOR, DETECT or SINK
    build: str                                # "module:function", imported when a process runs the role
    help: str                                 # its `fleetwatch NAME` subcommand's help
    in_run: Callable[[Config], bool]          # does `fleetwatch run` include it with this config?
    inputs: tuple[Topic, ...] = ()            # topics it consumes ...
    group: str = ""                           # ... in this consumer group
    outputs: tuple[Topic, ...] = ()           # topics it produces (over Kafka; its dead letters aside)
    listens: tuple[Topic, ...] = ()           # topics it reads outside any consumer group (bus.listen, read_latest)
    tiers: tuple[tuple[str, tuple[Topic, ...]], ...] = ()  # more consumer groups of its own: (group, topics)
    transactional: bool = False               # its producers are transactional (ids: its groups', then -p<N>)
    paced: bool = False                       # a source that publishes when others send (a BMS, exporters): its
                                              # quiet is a stall to alert on, never a hung loop (ops/health.py)
    run_source: str = ""                      # its daemon.source value, for a source `run` can run
    options: tuple[RoleOption, ...] = ()      # its own command-line options
    check: Callable[[Config], str] = field(default=lambda cfg: "")  # what is missing to run it ("" = nothing)
    preflight: str = ""                       # "module:function(cfg, env, warn)": ConfigError before it starts


ROLE_TABLE: tuple[RoleSpec, ...] = (
    RoleSpec("simulate", SOURCE, "pipeline.sources.simulate:build",
             "run only the fleet simulator, producing to Kafka",
             in_run=lambda cfg: cfg.daemon.source == "simulate", run_source="simulate",
             outputs=(Topic.GPU, Topic.FACILITY, Topic.EVENTS, Topic.LABELS, Topic.POWER_ACTIONS),
             listens=(Topic.POWER_CAPS,), options=(MQTT,)),
    RoleSpec("agent", SOURCE, "pipeline.sources.nvml:build",
             "run only the NVML agent of this node's GPUs, producing to Kafka",
             in_run=lambda cfg: cfg.daemon.source == "nvml", run_source="nvml",
             outputs=(Topic.GPU, Topic.EVENTS, Topic.POWER_ACTIONS), listens=(Topic.POWER_CAPS,), options=(REPLAY,),
             preflight="pipeline.sources.nvml:preflight"),
    RoleSpec("dcgm", SOURCE, "pipeline.sources.dcgm:build",
             "run only the DCGM exporter source (scrapes existing dcgm-exporter endpoints), producing to Kafka",
             in_run=lambda cfg: cfg.daemon.source == "dcgm", run_source="dcgm",
             outputs=(Topic.GPU, Topic.EVENTS), options=(DCGM_TARGETS,), preflight="pipeline.sources.dcgm:preflight",
             paced=True,
             check=lambda cfg: "" if cfg.dcgm.targets or cfg.dcgm.targets_file else
             "the dcgm role scrapes dcgm-exporter endpoints: give --dcgm-targets URL[,URL...] (dcgm.targets) or "
             "dcgm.targets_file"),
    RoleSpec("facility", COLLECTOR, "pipeline.sources.mqtt:build",
             "run only the MQTT facility collector (a BMS topic tree), producing to Kafka",
             in_run=lambda cfg: bool(cfg.mqtt.broker), options=(MQTT,), paced=True,
             # Its own FleetwatchStalled too: no other alert tells of facility data that stopped (a site
             # service, unlike an agent on every node, whose silence is NodeNotReporting).
             outputs=(Topic.FACILITY, Topic.ALERTS),
             preflight="pipeline.sources.mqtt:preflight",
             check=lambda cfg: "" if cfg.mqtt.broker else
             "the facility role reads a BMS's MQTT broker: give --mqtt HOST:PORT (mqtt.broker)"),
    RoleSpec("detect", DETECT, "pipeline.roles.detect:build",
             "run only detection, consuming from and producing to Kafka (consumer group 'detect')",
             in_run=lambda cfg: True, inputs=(Topic.GPU, Topic.FACILITY, Topic.EVENTS), group="detect",
             outputs=(Topic.ALERTS, Topic.HEALTH, Topic.EVENTS, Topic.RACKS, Topic.STATE), listens=(Topic.STATE,),
             tiers=(("detect-site", (Topic.RACKS,)),), transactional=True),
    RoleSpec("power", DETECT, "pipeline.roles.power:build",
             "run only the power role (demand response for fleet.site: requests in, caps out), consuming from "
             "Kafka (consumer group 'power'; one process per site); its requests: power request|status|cancel|report",
             in_run=lambda cfg: True, inputs=(Topic.GPU, Topic.FACILITY, Topic.POWER_REQUESTS, Topic.POWER_ACTIONS),
             group="power",
             outputs=(Topic.POWER_CAPS, Topic.ALERTS, Topic.POWER_REPORTS), listens=(Topic.ALERTS,), options=(DRY_RUN,),
             preflight="pipeline.roles.power:preflight"),
    RoleSpec("remediate", ACT, "pipeline.roles.remediate:build",
             "run only the remediation role (failing nodes out of service and back, dry-run unless --apply), "
             "consuming from Kafka (consumer group 'remediate'; one process per site); its cases: remediation status",
             in_run=lambda cfg: True, inputs=(Topic.ALERTS, Topic.GPU), group="remediate",
             outputs=(Topic.REMEDIATION, Topic.ALERTS), options=(APPLY,), preflight="pipeline.roles.remediate:preflight"),
    RoleSpec("archive", SINK, "pipeline.sinks.archive_sink:build",
             "run only the Parquet archive, consuming from Kafka (consumer group 'archive')",
             in_run=lambda cfg: True, inputs=tuple(DATASET_OF_TOPIC), group="archive",
             outputs=(Topic.ALERTS,)),  # FleetwatchArchiveFailing (sinks/archive_outage.py)
    RoleSpec("notify", SINK, "pipeline.sinks.notify_sink:build",
             "run only alert delivery, consuming from Kafka (consumer group 'notify')",
             in_run=lambda cfg: True, inputs=(Topic.ALERTS,), group="notify",
             preflight="pipeline.sinks.notify_sink:preflight"),
)
ROLE_SPECS = {spec.name: spec for spec in ROLE_TABLE}
ROLES = tuple(ROLE_SPECS)
SOURCE_ROLES = {spec.run_source: spec.name for spec in ROLE_TABLE if spec.run_source}  # daemon.source -> role


def run_roles(cfg: Config) -> frozenset[str]:
    """What `fleetwatch run` runs: the configured source, the collectors that have
    something to read (the MQTT facility collector with a broker) and every consumer."""
    return frozenset(spec.name for spec in ROLE_TABLE if spec.in_run(cfg))


def whole(roles: frozenset[str]) -> bool:
    """A source and every consumer in one process: the in-process bus will do."""
    consumers = {spec.name for spec in ROLE_TABLE if spec.stage in CONSUMER_STAGES}
    return consumers <= roles and any(spec.name in roles for spec in ROLE_TABLE if spec.stage in (SOURCE, COLLECTOR))


def builder(spec: RoleSpec) -> Callable:
    """The role's builder, imported now."""
    return _imported(spec.build)


def preflight(spec: RoleSpec) -> Callable | None:
    """The role's own checks before it starts (its config section's files, URLs), imported now."""
    return _imported(spec.preflight) if spec.preflight else None


def _imported(where: str) -> Callable:
    import importlib
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(module), name)
