"""One typed configuration: defaults, then a TOML file, then FLEETWATCH_* environment
variables, then command-line flags. Validated once at start; nothing else reads
settings from anywhere.

Environment overrides name a section and a key with a double underscore:
``FLEETWATCH_FLEET__RACKS=8``, ``FLEETWATCH_ALERTS__WEBHOOKS=http://a,http://b``;
top-level keys have no section: ``FLEETWATCH_DATA_DIR=/var/lib/fleetwatch``. Any other
FLEETWATCH_* variable (``FLEETWATCH_ONCALL_SECRET``, say) is not configuration and is ignored, unless
its section is one of ours mistyped (``FLEETWATCH_ALERT__WEBHOOKS``): that is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pipeline.detect.catalog import ALERTS as CATALOG_ALERTS, inhibit_rules as catalog_inhibit_rules
from pipeline.faults import FAULT_TYPES
from pipeline.sinks.receivers import RECEIVER_KINDS

ENV_PREFIX = "FLEETWATCH_"


class ConfigError(ValueError):
    """A setting is wrong; the message names the key, the value and what is allowed."""


class Unavailable(Exception):
    """A service the process needs cannot be reached now (Kafka at start): exit status 75
    (EX_TEMPFAIL), which a supervisor restarts, where a configuration error's 2 is not (systemd's
    RestartPreventExitStatus=2: a node rebooted during a Kafka outage had kept its agent dead)."""


def _spec(default: Any, *, min: float | None = None, max: float | None = None,
          choices: tuple[str, ...] | None = None, doc: str = "", nonempty: str = "") -> Any:
    meta = {"min": min, "max": max, "choices": choices, "doc": doc, "nonempty": nonempty}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class FleetConfig:
    """The simulated fleet (the embedded default source)."""
    site: str = _spec("site-a", doc="site label of every simulated device")
    racks: int = _spec(4, min=1, max=4096, doc="racks in the site")
    nodes_per_rack: int = _spec(8, min=1, max=64, doc="GPU nodes per rack")
    gpus_per_node: int = _spec(8, min=1, max=16, doc="GPUs per node")
    sample_interval_s: float = _spec(1.0, min=0.01, max=3600, doc="scrape interval")
    speed: float = _spec(1.0, min=0.0, doc="simulated seconds per wall second; 0 = as fast as possible")
    power_limit_w: float = _spec(700.0, min=100, max=2000, doc="GPU enforced power limit")
    pdu_rating_w: float = _spec(90000.0, min=1000, doc="rack PDU rating")
    supply_temp_c: float = _spec(30.0, min=5, max=60, doc="CDU coolant supply temperature")
    fault_interval_s: float = _spec(60.0, min=0.0, doc="mean time between injected faults; 0 = none")
    faults: list[str] = _spec(list(FAULT_TYPES), choices=FAULT_TYPES, doc="fault types to inject")
    gpu_reset_interval_s: float = _spec(1800.0, min=0.0, doc="mean time between harmless GPU resets; 0 = none")
    seed: int = _spec(0, min=0, doc="random seed; the same seed gives the same fleet")
    normal: str = _spec("realistic", choices=("realistic", "simple"),
                        doc="what normal operation looks like: realistic adds diurnal inference load, training jobs "
                            "swinging power in lockstep across racks, checkpoint stalls, rolling reboots and driver "
                            "upgrades (labelled normal events), sensor noise, quantization, dropouts, recalibration "
                            "steps, a 5% spread in the GPUs' temperature rise per watt and node clocks skewed by up "
                            "to 3 s (sources/simulate.py); simple is the steady fleet of before, reading exact "
                            "values on one clock")


_S3_URL = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/=-]*)?")


@dataclass(frozen=True)
class ArchiveConfig:
    enabled: bool = _spec(True, doc="write the Parquet archive")
    flush_interval_s: float = _spec(10.0, min=0.1, max=3600, doc="longest time data waits in memory")
    max_buffer_rows: int = _spec(500_000, min=1, doc="flush a dataset early at this many rows")
    compression: str = _spec("zstd", choices=("zstd", "snappy", "lz4", "gzip", "none"), doc="Parquet codec")
    outage_buffer_mb: float = _spec(256.0, min=0.01, doc="data held in memory while the archive cannot write; "
                                    "past it, in-process, the oldest is dropped (counted), and over Kafka the "
                                    "archive stops reading (nothing lost)")
    min_free_mb: float = _spec(64.0, min=0.0, doc="free space left on the archive's filesystem for alerts.jsonl "
                               "and outboxes: below it the archive holds data as on a full disk; 0 = off")
    retry_max_s: float = _spec(30.0, min=0.1, max=3600, doc="longest wait between write attempts while the archive "
                               "is failing (backoff from 1 s)")
    upkeep_interval_s: float = _spec(600.0, min=0.0, doc="this often the archive role merges the closed hours' small "
                                     "files (one per hour and source partition) and deletes the hours past their "
                                     "retention (docs/data.md#compaction-and-retention); 0 = never (`fleetwatch archive "
                                     "compact|prune` do it by hand)")
    compact_after_s: float = _spec(900.0, min=0.0, doc="an hour is merged once it ended this long ago: data later "
                                   "than that still lands, beside the merged file, and is merged at the next pass")
    retention_days_samples: float = _spec(30.0, min=0.0, doc="gpu_samples and facility_samples are deleted an hour "
                                          "at a time once this many days old, by the clock; 0 = kept forever")
    retention_days_records: float = _spec(400.0, min=0.0, doc="the same for events, alerts, node_health, fault_labels "
                                          "and power_*: what operators look back on for a year; 0 = kept forever")
    url: str = _spec("", doc="where the archive lives: empty = <data_dir>/archive on local disk (the default); "
                     "s3://bucket/prefix = a Delta Lake table per dataset on S3-compatible object storage "
                     "(docs/data.md#object-storage)")
    s3_endpoint_url: str = _spec("", doc="an S3-compatible server's URL (MinIO, Ceph, s3proxy); empty = AWS S3")
    s3_region: str = _spec("", doc="the bucket's region; empty = AWS_REGION from the environment, else us-east-1")
    s3_allow_http: bool = _spec(False, doc="allow a plain-HTTP s3_endpoint_url (a test server; never across a network)")
    credentials_file: str = _spec("", doc="an AWS shared-credentials file (INI: aws_access_key_id, "
                                  "aws_secret_access_key, aws_session_token); empty = the environment's AWS_* "
                                  "variables or the instance's role. Never printed")
    credentials_profile: str = _spec("default", doc="the profile (section) of credentials_file to use")

    def __post_init__(self) -> None:
        if self.url and not _S3_URL.fullmatch(self.url):
            from pipeline.redact import redact_url
            raise ConfigError(f"config error: archive.url = {redact_url(self.url)!r}: expected s3://bucket or "
                              f"s3://bucket/prefix (credentials go in the environment or archive.credentials_file), "
                              f"or empty for <data_dir>/archive")


@dataclass(frozen=True)
class DetectConfig:
    ewma_halflife_s: float = _spec(600.0, min=1, doc="memory of the EWMA baselines")
    z_threshold: float = _spec(6.0, min=1, doc="z-score (in standard deviations) beyond which a sample is anomalous")
    warmup_samples: int = _spec(60, min=2, doc="samples a series needs before it can alert")
    relearn_samples: int = _spec(3600, min=10, doc="consecutive outliers after which a baseline relearns")
    cusum_slack_c: float = _spec(1.0, min=0, doc="CUSUM slack k for thermal drift (C)")
    cusum_limit: float = _spec(600.0, min=1, doc="CUSUM decision limit h (C x seconds: the same time to alert at "
                               "any scrape interval)")
    drift_confirm_samples: int = _spec(60, min=1, doc="samples a drift must hold before it alerts (drifts are slow)")
    cap_not_binding_ratio: float = _spec(0.9, min=0.1, max=1.0, doc="a busy GPU under a power cap drawing less than "
                                         "this share of it, without reason 0x4, saves nothing (PowerCapNotBinding)")
    cap_not_binding_samples: int = _spec(60, min=1, doc="samples a cap must save nothing before it alerts (a load "
                                         "dips for seconds: a checkpoint, a data-loader stall)")
    drift_baseline_halflife_s: float = _spec(6 * 3600.0, min=60, doc="baseline memory of the drift detector")
    thermal_margin_c: float = _spec(4.0, min=0, max=40, doc="a GPU this close to its own HW slowdown threshold "
                                    "(NVML; H100: 89 C) is over temperature")
    gpu_temp_limit_c: float = _spec(85.0, min=40, max=120, doc="over-temperature limit of GPUs whose slowdown "
                                    "threshold is unknown")
    peer_temp_excess_c: float = _spec(10.0, min=1, doc="GPU hotter than its node's median by this much (power-adjusted)")
    node_temp_excess_c: float = _spec(6.0, min=1, doc="a node's GPUs hotter than its rack's other nodes by this "
                                      "much (at the same power)")
    runaway_early_c: float = _spec(6.0, min=1, doc="a smaller excess that is a runaway when it is still rising")
    runaway_rise_c: float = _spec(2.0, min=0.1, doc="... by this much above its own ~20 s average")
    runaway_steady_w: float = _spec(30.0, min=1, doc="... at steady power: the GPU's and its node's power within "
                                    "this of their lagged power (temperatures lag a load change)")
    thermal_c_per_w: float = _spec(0.04, min=0, max=1, doc="GPU temperature rise per W above coolant (H100: ~0.04)")
    straggler_ratio: float = _spec(0.85, min=0.1, max=1.0, doc="power and clock below this share of peers")
    pcie_replay_rate_per_s: float = _spec(5.0, min=0, doc="PCIe replays per second that alert")
    nvlink_crc_rate_per_s: float = _spec(10.0, min=0, doc="NVLink CRC errors per second that alert")
    stuck_samples: int = _spec(30, min=3, doc="identical power readings in a row that mean a stuck sensor")
    rack_temp_excess_c: float = _spec(5.0, min=1, doc="a rack's GPUs, at zero power, above its mean coolant "
                                      "temperature by this much more than the site's other racks")
    liquid_fraction: float = _spec(0.8, min=0.05, max=1.0, doc="share of a rack's IT power its coolant carries "
                                   "away (heat balance; direct liquid cooling: ~0.8)")
    heat_balance_tolerance: float = _spec(0.2, min=0.01, max=1.0, doc="heat balance alerts when the coolant "
                                          "carries more or less than liquid_fraction by this share")
    heat_balance_min_delta_c: float = _spec(1.5, min=0.1, doc="judge the heat balance only when the expected "
                                            "coolant delta-T is at least this (sensor resolution)")
    heat_balance_sensor_c: float = _spec(0.5, min=0, doc="heat balance alerts only when the measured delta-T is also off "
                                         "by more than this (C): how far two coolant sensors' calibration can be off together")
    coolant_lag_s: float = _spec(20.0, min=0, doc="time constant of the coolant's return temperature after a "
                                 "power change")
    flow_loss_ratio: float = _spec(0.6, min=0.05, max=0.99, doc="flow below this share of its baseline")
    site_power_cap_w: float = _spec(0.0, min=0, doc="site power cap (W) the main meter must stay under; 0 = none")
    pdu_load_ratio: float = _spec(0.95, min=0.1, max=2.0, doc="PDU power above this share of its rating")
    xid_hold_s: float = _spec(900.0, min=1, doc="an XID keeps its alert firing this long")
    missing_after_intervals: float = _spec(3.0, min=1.5, doc="a GPU unseen this many intervals is missing")
    maintenance_s: float = _spec(1800.0, min=0, doc="a node announced as going down for maintenance (an event of kind "
                                 "node_reboot or driver_upgrade) is not reported missing for this long after the "
                                 "announcement; 0 = always reported")
    restart_grace_s: float = _spec(120.0, min=0, doc="a node whose collector said it stops on request (an event of "
                                   "kind collector_stopping: an upgrade, a config change) is not reported missing for "
                                   "this long after; one that stops without saying (a crash) is found as before")
    forget_after_s: float = _spec(7 * 86400.0, min=0, doc="a node silent this long is forgotten (decommissioned, "
                                  "scaled away): its alerts resolve with the annotation `resolution`, its state is "
                                  "dropped, a `node_forgotten` event; it starts afresh if it reports again; 0 = never")
    lateness_s: float = _spec(5.0, min=0, doc="event-time lateness bound: a GPU or node is judged missing once data "
                              "this much newer than its last sample arrived in its partition; older rows are late "
                              "(counted and archived, not detected on)")
    fire_after: int = _spec(3, min=1, doc="consecutive hits before a soft condition fires")
    resolve_after: int = _spec(30, min=1, doc="consecutive clear evaluations before an alert resolves")
    streak_s: float = _spec(1.0, min=0, doc="the least time one evaluation of a streak stands for (s): N hits in a "
                            "row (`fire_after`, `drift_confirm_samples`, `cap_not_binding_samples`) or N clear "
                            "(`resolve_after`) must also span (N - 1.5) x this of event time (half a step for "
                            "jitter), so scrapes faster than the 1 s the detectors are tuned at neither fire nor "
                            "resolve sooner; 0 = count evaluations only")


@dataclass(frozen=True)
class ReceiverConfig:
    """One place alerts go (`[[alerts.receivers]]` in the TOML file)."""
    name: str = _spec("", doc="unique name: [a-z0-9_-]+; its outbox is <data_dir>/outbox/<name>")
    url: str = _spec("", doc="http(s) URL: a webhook, or an Alertmanager's base URL (kind alertmanager)")
    kind: str = _spec("webhook", choices=tuple(RECEIVER_KINDS),
                      doc="; ".join(f"{kind}: {what}" for kind, (_, what) in RECEIVER_KINDS.items()))
    secret_env: str = _spec("", doc="environment variable holding the HMAC-SHA256 signing secret")
    secret_file: str = _spec("", doc="file holding the signing secret (used when secret_env is empty)")
    tls_verify: bool = _spec(True, doc="verify the receiver's TLS certificate")
    ca_file: str = _spec("", doc="CA bundle for the receiver's certificate; empty = the system's")
    bearer_token_env: str = _spec("", doc="environment variable holding a bearer token, sent as `Authorization: "
                                  "Bearer` (an Alertmanager or webhook behind an authenticating proxy)")
    bearer_token_file: str = _spec("", doc="file holding the bearer token, read at every request as Prometheus "
                                   "reads its credentials_file (a rotated token is taken without a restart); used "
                                   "when bearer_token_env is empty")
    cert_file: str = _spec("", doc="client certificate (PEM) for mutual TLS, https:// only; read again when it "
                           "changes on disk")
    key_file: str = _spec("", doc="the client certificate's private key (PEM); empty = in cert_file")


@dataclass(frozen=True)
class InhibitRule:
    """While a source alert fires, target alerts with the same `equal` labels are muted
    (`[[alerts.inhibit_rules]]`; Alertmanager's inhibit_rules with regex alertnames)."""
    source: str = _spec("", doc="regex (full match) of the inhibiting alertnames")
    target: str = _spec("", doc="regex (full match) of the inhibited alertnames")
    equal: list[str] = _spec(["site", "rack"], doc="labels both must share")


# From the alert catalog (AlertSpec.inhibits): rack cooling alerts mute the thermal alerts of
# their rack, a silent node mutes its silent GPUs.
DEFAULT_INHIBIT_RULES = [InhibitRule(source=source, target=target, equal=equal)
                         for source, target, equal in catalog_inhibit_rules()]


@dataclass(frozen=True)
class AlertsConfig:
    console: bool = _spec(True, doc="print alerts on the console")
    webhooks: list[str] = _spec([], doc="URLs that receive Alertmanager v4 webhook payloads, unsigned (shorthand "
                                "for [[alerts.receivers]] named webhook-1, webhook-2, ...)")
    receivers: list[ReceiverConfig] = _spec([], doc="receivers, as [[alerts.receivers]] tables (TOML only)")
    timeout_s: float = _spec(5.0, min=0.1, max=120, doc="per-request timeout (connect and read)")
    retry_initial_s: float = _spec(0.5, min=0.01, max=600, doc="first retry delay; doubles per failure, with jitter")
    retry_max_s: float = _spec(60.0, min=0.01, max=3600, doc="longest delay between retries")
    max_age_s: float = _spec(3600.0, min=1, doc="an undeliverable notification older than this goes to the "
                             "dead-letter file <data_dir>/deadletter/alerts-<receiver>.jsonl")
    group_by: list[str] = _spec(["alertname", "site", "rack"], doc="labels that group alerts into one notification")
    group_wait_s: float = _spec(5.0, min=0, doc="wait this long after a group's first alert before notifying")
    group_interval_s: float = _spec(60.0, min=0, doc="wait this long before notifying a changed group again")
    repeat_interval_s: float = _spec(4 * 3600.0, min=1, doc="re-notify a group that still fires this often")
    resend_interval_s: float = _spec(60.0, min=1, doc="re-push firing alerts to Alertmanager receivers this often; "
                                     "each push's endsAt is 4 of these later (Prometheus's lease): Alertmanager "
                                     "resolves the alerts of a notify that stopped then")
    inhibit_rules: list[InhibitRule] = _spec(DEFAULT_INHIBIT_RULES, doc="inhibition, as [[alerts.inhibit_rules]] "
                                             "tables (TOML only); the default: rack cooling alerts mute thermal "
                                             "alerts in the rack, a silent node mutes its silent GPUs")
    external_url: str = _spec("", doc="externalURL of webhook payloads and prefix of generatorURL")
    runbook_base_url: str = _spec("", doc="prefix of every runbook_url, e.g. your wiki or a copy of runbooks/; "
                                  "ALERTNAME.md is appended (after a / it lacks, unless it ends in = # ? - _ or :); "
                                  "empty = file:// URLs of the runbooks installed with Fleetwatch")


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap: str = _spec("", doc="Kafka bootstrap servers (host:port,...); empty = the in-process bus")
    topic_prefix: str = _spec("", doc="prefix of every topic, consumer group and transactional id (several "
                              "fleets, one cluster); groups and transactional ids also start with fleetwatch.")
    partitions: int = _spec(6, min=1, max=10000, doc="partitions of the telemetry topics when created")
    retention_hours: float = _spec(24.0, min=0.1, doc="retention of the telemetry topics when created")
    connect_timeout_s: float = _spec(30.0, min=0.1, doc="at start, keep trying to reach the brokers this long "
                                     "before giving up (exit status 75, EX_TEMPFAIL: a supervisor starts it "
                                     "again; a configuration error is 2)")
    buffer_mb: float = _spec(256.0, min=1, doc="producer outbox: messages wait here while the broker is "
                             "unreachable; when full, publishing blocks")
    commit_interval_s: float = _spec(1.0, min=0.05, max=60, doc="detect commits its alerts, offsets and state "
                                     "checkpoint (one transaction) this often: alerts wait up to this long")
    replication_factor: int = _spec(0, min=0, max=32767, doc="replicas of each topic when created; 0 = 3 when the "
                                    "cluster has 3 or more brokers, else 1")
    min_insync_replicas: int = _spec(0, min=0, max=32767, doc="topic config min.insync.replicas when created (an "
                                     "acks=all write waits for this many replicas); 0 = 2 when the replication "
                                     "factor is 3 or more, else 1")
    create_topics: bool = _spec(True, doc="create missing topics at start; refused for lack of rights: a warning, and "
                                "the process goes on (`fleetwatch topics create` does it once, as an admin); "
                                "false = never")
    security_protocol: str = _spec("PLAINTEXT", choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
                                   doc="how every Kafka client of the process connects: TLS (SSL, SASL_SSL) and "
                                       "SASL authentication (SASL_*)")
    ssl_cafile: str = _spec("", doc="PEM file of the CA(s) that signed the brokers' certificates; empty = the "
                            "system's CAs")
    ssl_certfile: str = _spec("", doc="PEM client certificate for mutual TLS (optional; its key in it or in "
                              "ssl_keyfile)")
    ssl_keyfile: str = _spec("", doc="PEM private key of ssl_certfile")
    sasl_mechanism: str = _spec("PLAIN", choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"), doc="SASL mechanism")
    sasl_username: str = _spec("", doc="SASL user name")
    sasl_password_file: str = _spec("", doc="file holding the SASL password (never printed); the environment "
                                    "variable FLEETWATCH_KAFKA_SASL_PASSWORD, when set, is used instead")


@dataclass(frozen=True)
class AgentConfig:
    """The NVML agent on a GPU node (`fleetwatch agent`, or `run` with daemon.source = "nvml")."""
    node: str = _spec("", doc="node name in the data; empty = this host's name")
    site: str = _spec("site-a", doc="site label of this node's samples")
    rack: str = _spec("rack-0", doc="rack label of this node's samples")
    interval_s: float = _spec(1.0, min=0.05, max=3600, doc="scrape interval")
    events: bool = _spec(True, doc="publish XID/ECC events as they happen (an NVML event thread)")
    replay: str = _spec("", doc="recorded NVML data to replay instead of the GPUs: a shipped recording by name "
                        "(h100, h200) or a directory of the same files; empty = real NVML")
    replay_gpus: int = _spec(8, min=1, max=64, doc="GPUs the replay pretends to have")
    job_mapping_dir: str = _spec("", doc="dcgm-exporter's HPC job mapping directory (--hpc-job-mapping-dir: a file "
                                 "per GPU index, one job id per line, that the scheduler's prolog writes and its "
                                 "epilog removes): each GPU's jobs fill the samples' job column; empty = none")


@dataclass(frozen=True)
class MqttConfig:
    """Facility telemetry from a building-management system's MQTT topic tree."""
    broker: str = _spec("", doc="MQTT broker (host:port) of the BMS topic tree; empty = the simulator's facility "
                        "data goes straight to the bus")
    site: str = _spec("", doc="site whose tree the collector reads (<topic_root>/<site>/#); empty = fleet.site")
    topic_root: str = _spec("bms/v1", doc="root of the BMS topic tree")
    client_id: str = _spec("", doc="collector's MQTT client id; empty = fleetwatch-facility-<site> (the broker keeps "
                           "the session under it: one per site)")
    username: str = _spec("", doc="user name at the broker (every MQTT client of Fleetwatch: the collector, the "
                          "power role's intake, the simulator's publisher); empty = anonymous")
    password_env: str = _spec("", doc="environment variable holding the user's password")
    password_file: str = _spec("", doc="file holding the user's password (used when password_env is empty)")
    tls: bool = _spec(False, doc="connect over TLS (mqtts, usually port 8883), verifying the broker's certificate "
                      "against the system's CAs or ca_file; on where ca_file or cert_file is set")
    ca_file: str = _spec("", doc="CA bundle (PEM) for the broker's certificate; empty = the system's")
    cert_file: str = _spec("", doc="client certificate (PEM) for a broker that asks for one (mutual TLS); read "
                           "again at the next connection when it changes on disk")
    key_file: str = _spec("", doc="the client certificate's key (PEM, unencrypted); empty = in cert_file")


@dataclass(frozen=True)
class DcgmConfig:
    """Existing dcgm-exporter endpoints, scraped (`fleetwatch dcgm`, or `run` with daemon.source = "dcgm")."""
    targets: list[str] = _spec([], doc="dcgm-exporter endpoints to scrape: URLs (http://gpu-node-1:9400/metrics) "
                               "or HOST:PORT (http, path /metrics); --dcgm-targets URL[,URL...]")
    targets_file: str = _spec("", doc="a file of more targets, read at start: one per line (# comments), or "
                              "Prometheus file_sd JSON ([{\"targets\": [...], \"labels\": {\"site\": ..., \"rack\": "
                              "..., \"node\": ...}}])")
    mapping_file: str = _spec("", doc="CSV with the header node,site,rack: the site and rack of each node (its "
                              "hostname label), read at start; a target's own labels come first")
    site: str = _spec("site-a", doc="site of a node neither its target's labels nor the mapping file place")
    rack: str = _spec("rack-0", doc="rack of a node neither its target's labels nor the mapping file place")
    interval_s: float = _spec(10.0, min=0.05, max=3600, doc="scrape interval (dcgm-exporter refreshes its values "
                              "every 30 s unless its -c flag says otherwise: set it to this)")
    timeout_s: float = _spec(5.0, min=0.01, max=600, doc="per-scrape timeout (connect, send, read); a slower "
                             "target counts as failed (timeout) this round")
    concurrency: int = _spec(64, min=1, max=10000, doc="scrapes in flight at once")
    ca_file: str = _spec("", doc="CA bundle (PEM) for https targets' certificates (an internal CA); empty = the "
                         "system's")
    username: str = _spec("", doc="user for targets behind basic auth (a target's own user info in its URL comes "
                          "first); empty = none")
    password_env: str = _spec("", doc="environment variable holding that user's password")
    password_file: str = _spec("", doc="file holding that user's password (used when password_env is empty)")


@dataclass(frozen=True)
class FlexRule:
    """A flexibility class for the GPUs whose node, and workload where given, match (power/classes.py)."""
    nodes: str = _spec("*", doc="glob of node names, e.g. r01-*", nonempty="give a glob of node names, e.g. r01-* "
                       "(* for every node)")
    flex_class: int = _spec(2, min=0, max=3, doc="0 = never cap; 1/2/3 = may lose up to 10/25/50% of throughput")
    namespace: str = _spec("", doc="glob of the Kubernetes namespace of the pod on the GPU (the samples' namespace, "
                           "from dcgm-exporter's pod mapping); empty = any")
    pod: str = _spec("", doc="glob of the pod on the GPU (the samples' pod); empty = any")
    feature: str = _spec("", doc="glob of a label of the node (power.node_labels, which must then be slurm or "
                         "kubernetes): a Slurm feature, or a Kubernetes node label as key=value (e.g. "
                         "fleetwatch.io/flex=*); empty = any")


@dataclass(frozen=True)
class PowerConfig:
    default_class: int = _spec(2, min=0, max=3, doc="flexibility class of a node no rule names: 0 = never cap its "
                               "GPUs; 1/2/3 = a cap may cost them up to 10/25/50% of their throughput")
    classes: list[FlexRule] = _spec([], doc="classes by node or workload, as [[power.classes]] tables (nodes = GLOB, "
                                    "namespace = GLOB, pod = GLOB, feature = GLOB, flex_class = N); the first that "
                                    "matches a GPU wins")
    node_labels: str = _spec("none", choices=("none", "slurm", "kubernetes"),
                             doc="where nodes' labels for the rules' `feature` come from: slurm = each node's "
                                 "features, by sinfo (SLURM_CONF names the cluster); kubernetes = each node's "
                                 "labels as key=value, from the API server (power.kubeconfig); until they are first "
                                 "read every GPU is class 0, and a node a read does not list takes the most "
                                 "protective class a feature rule could give it (a warning names it)")
    sinfo: str = _spec("sinfo", nonempty="give Slurm's sinfo command or its path",
                       doc="Slurm's sinfo command (power.node_labels = slurm); it gets the environment variables "
                       "remediate.command_env lists (PATH, SLURM_CONF, ...), none of the rest")
    jobs: str = _spec("none", choices=("none", "slurm", "kubernetes"),
                      doc="which job runs on each node, for the firm capacity (`fleetwatch power status`: what "
                          "the classes allow if the job holding the most of it ends or pauses): slurm = the "
                          "running jobs, by squeue; kubernetes = the controller (Job, PyTorchJob, ReplicaSet...) "
                          "of the running pods holding the most of a node's GPUs (nvidia.com/gpu); none = each "
                          "node counts as a job of its own")
    squeue: str = _spec("squeue", nonempty="give Slurm's squeue command or its path",
                        doc="Slurm's squeue command (power.jobs = slurm); its environment as power.sinfo's")
    kubeconfig: str = _spec("", doc="the kubeconfig of the cluster (power.node_labels or power.jobs = kubernetes); "
                            "empty = the pod's service account in a cluster, else $KUBECONFIG or ~/.kube/config")
    node_labels_interval_s: float = _spec(60.0, min=1, max=86400, doc="read the node labels (and the jobs) this "
                                          "often")
    headroom_pct: float = _spec(5.0, min=0, max=50, doc="shed this share beyond a request's reduction, for the "
                                "meter's error")
    headroom_sd: float = _spec(3.0, min=0, max=10, doc="aim this many standard deviations of the reduction's minute "
                               "means (how much the load's swings move them) above the target, when that is more "
                               "than headroom_pct: a hold is judged minute by minute (docs/power.md)")
    baseline_s: float = _spec(300.0, min=10, doc="a request's baseline: the site meter's mean over this long before "
                              "it starts")
    control_interval_s: float = _spec(5.0, min=0.5, max=60, doc="during a request, compare the meter with the target "
                                      "and correct the caps this often")
    restore_rate_kw_s: float = _spec(5.0, min=0.01, doc="after a request, let the site's power rise no faster than "
                                     "this (and not past detect.site_power_cap_w: a site already at its cap "
                                     "restores at a tenth of this, never held)")
    lease_s: float = _spec(60.0, min=5, max=3600, doc="an agent restores a GPU's default limit when the power role "
                           "has not renewed its cap for this long (a cap never outlives its controller)")
    dry_run: bool = _spec(False, doc="the power role plans, reports and archives each request's caps but applies none "
                          "(`fleetwatch power --dry-run`)")

    def __post_init__(self) -> None:
        featured = next((r.feature for r in self.classes if r.feature), None)
        if featured is not None and self.node_labels == "none":  # it would match no node, silently
            raise ConfigError(f"config error: power.classes: a rule names feature = {featured!r}, but "
                              f"power.node_labels is \"none\", so no node has labels and the rule would never "
                              f"match (its nodes would take power.default_class): set power.node_labels = \"slurm\" "
                              f"(Slurm features) or \"kubernetes\" (node labels), or remove the rule's feature")


# Alerts that may start a remediation unless remediate.alertnames says otherwise: the critical
# GPU and node alerts whose remediation does something (warnings wait for a person).
DEFAULT_REMEDIATION_ALERTS = [a.name for a in CATALOG_ALERTS
                              if a.severity == "critical" and a.scope in ("gpu", "node") and a.remediation != "none"]
REMEDIABLE_ALERTS = tuple(a.name for a in CATALOG_ALERTS if a.scope in ("gpu", "node"))
REMEDIATION_BACKENDS = ("none", "slurm", "command", "kubernetes")
# What a site's scripts and Slurm's clients need (a shell's basics, locale, Slurm's and ssh's own);
# nothing of the daemon's secrets, which sit in its environment (*_env settings, FLEETWATCH_*, AWS_*).
COMMAND_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_*", "TZ", "TMPDIR", "SLURM_CONF",
               "SSH_AUTH_SOCK", "KRB5CCNAME", "KUBECONFIG")


@dataclass(frozen=True)
class RemediateConfig:
    """The remediation role (pipeline/remediate/): failing nodes out of service and back."""
    dry_run: bool = _spec(True, doc="plan, log and archive every transition (remediation_events) but apply none; "
                          "false applies them through remediate.backend (`fleetwatch remediate --apply`)")
    backend: str = _spec("none", choices=REMEDIATION_BACKENDS,
                         doc="where quarantines are applied: slurm (scontrol drain and resume; SLURM_CONF names the "
                             "cluster), command (remediate.command for every step), kubernetes (cordon, taint, "
                             "NodeCondition), none (nothing can be applied: dry-run only)")
    alertnames: list[str] = _spec(DEFAULT_REMEDIATION_ALERTS, choices=REMEDIABLE_ALERTS,
                                  doc="the allow-list: only these alerts start a remediation (each alert's "
                                      "remediation comes from the catalog: docs/alerts.md)")
    breaker_fleet_pct: float = _spec(5.0, min=0, max=100, doc="circuit breaker: no new quarantine once more than "
                                     "this share of the fleet's nodes asked to be quarantined within remediate.breaker_window_s "
                                     "(RemediationBreakerOpen fires)")
    breaker_rack_pct: float = _spec(50.0, min=0, max=100, doc="circuit breaker: the same for the nodes of one rack")
    breaker_min_nodes: int = _spec(2, min=1, doc="circuit breaker: it trips only once at least this many nodes asked "
                                   "within the window; 5% of a small fleet is under one node, and one failing node is "
                                   "no storm")
    breaker_window_s: float = _spec(600.0, min=1, doc="the breaker's window; it closes again once a whole window "
                                    "passed without a new alert asking for a quarantine")
    fleet_nodes: int = _spec(0, min=0, doc="the breaker's share counts at most this many nodes in the fleet (0: the "
                             "nodes seen in the GPU samples). Set it from a trusted inventory: any producer of GPU "
                             "samples can name nodes that do not exist, and each one seen dilutes the share")
    rack_nodes: int = _spec(0, min=0, doc="the same bound for the nodes of one rack (0: those seen)")
    max_per_hour: int = _spec(10, min=0, doc="rate limit: at most this many quarantines in any hour (0: none)")
    cooldown_s: float = _spec(3600.0, min=0, doc="a node back in service is not quarantined again for this long")
    repeat_limit: int = _spec(3, min=1, doc="a node remediated more than this many times in 7 days goes to "
                              "needs_repair instead of back to service")
    drain_timeout_s: float = _spec(3600.0, min=0, doc="how long a quarantined node's work may run on; then "
                                   "remediate.on_drain_timeout")
    on_drain_timeout: str = _spec("wait", choices=("wait", "proceed"),
                                  doc="wait: the node stays quarantined until its work ends, and "
                                  "RemediationDrainOverdue fires on it meanwhile; proceed: act anyway")
    validate_command: str = _spec("", doc="the check a node must pass before it returns to service, run as "
                                  "`COMMAND NODE` with the case as JSON on stdin (e.g. a script that runs "
                                  "`dcgmi diag -r 1` on the node); exit 0 passes; empty: an operator returns it")
    command: str = _spec("", doc="remediate.backend = command: the script called as `COMMAND NODE STEP ALERTNAME` "
                         "(STEP: quarantine, drained, held, reset_gpu, reboot_node, resume) with the case as JSON on "
                         "stdin (docs/remediation.md#the-command-backend)")
    action_command: str = _spec("", doc="with the slurm or kubernetes backend: the script that resets a GPU or "
                                "reboots a node, called as `COMMAND NODE ACTION ALERTNAME` with the case as JSON on "
                                "stdin; empty: those nodes go to needs_repair for a person")
    scontrol: str = _spec("scontrol", nonempty="give Slurm's scontrol command or its path",
                          doc="Slurm's scontrol command (remediate.backend = slurm)")
    slurm_short_names: bool = _spec(False, doc="remediate.backend = slurm: a node the samples name by its full host "
                                    "name (gpu-001.dc1.example.com) that Slurm does not know is drained and resumed "
                                    "by its short name (gpu-001), Slurm's usual NodeName. Only where no two nodes "
                                    "this role sees share a short name: a drain would reach the wrong machine")
    kubeconfig: str = _spec("", doc="remediate.backend = kubernetes: the kubeconfig file to use; empty: the pod's "
                            "service account inside a cluster, else ~/.kube/config")
    command_env: list[str] = _spec(list(COMMAND_ENV), doc="the environment variables (names, or patterns as "
                                   "`LC_*`) that remediation's commands get from the daemon's (command, "
                                   "action_command, validate_command, scontrol; and power.sinfo and power.squeue); "
                                   "every other is left out, since the daemon's may hold its secrets (tokens, "
                                   "passwords, cloud credentials)")
    command_timeout_s: float = _spec(60.0, min=1, max=86400, doc="a backend call or validation that runs longer "
                                     "is stopped and counted as failed")
    interval_s: float = _spec(5.0, min=0.1, max=3600, doc="check quarantined nodes (drained yet? resumed by hand?) "
                              "this often")


@dataclass(frozen=True)
class DaemonConfig:
    source: str = _spec("simulate", choices=("simulate", "nvml", "dcgm", "none"),
                        doc="what `fleetwatch run` reads: the simulated fleet, this node's GPUs through NVML, "
                            "existing dcgm-exporter endpoints (dcgm.targets), or none of its own (a fleet's central "
                            "daemon over Kafka, whose agents publish there: the simulator must not)")
    status_interval_s: float = _spec(10.0, min=0.1, doc="period of status log lines when not on a terminal")
    jsonl_max_mb: float = _spec(256.0, min=0.01, doc="alerts.jsonl and the dead-letter files (deadletter/*.jsonl) "
                                "start afresh at this size, and on the first write of each UTC day; the old one is "
                                "kept beside as <name>.<YYYY-MM-DD>[.<n>].jsonl (docs/alerting.md#the-alert-log)")
    jsonl_keep_days: float = _spec(30.0, min=0.0, max=36500.0, doc="rotated alerts.jsonl and dead-letter files "
                                   "older than this are deleted")
    checkpoint_interval_s: float = _spec(10.0, min=0.1, max=3600, doc="without Kafka: save the detector and alert "
                                         "state to <data_dir>/state/ this often (and at shutdown); a restart "
                                         "resumes from it (over Kafka: kafka.commit_interval_s)")
    log_level: str = _spec("info", choices=("debug", "info", "warning", "error"), doc="log verbosity")
    log_format: str = _spec("text", choices=("text", "json"), doc="log lines on stderr: text (`TIME LEVEL LOGGER: "
                            "MESSAGE`, UTC times ending in Z) or json (one object per line: time, level, logger, "
                            "message and the record's fields)")
    http: str = _spec("", doc="serve /metrics (Prometheus), /healthz and /readyz on HOST:PORT, e.g. 0.0.0.0:9410 "
                      "(docs/operations.md); empty = off. `eval` and `replay` never serve")
    http_token_env: str = _spec("", doc="environment variable holding the bearer token that a role's route on --http "
                                "needs (POST and GET /power/requests: `Authorization: Bearer TOKEN`; /metrics, "
                                "/healthz and /readyz stay open); with no token set, they are served only to this "
                                "host (loopback)")
    http_token_file: str = _spec("", doc="file holding that token (used when http_token_env is empty)")
    watchdog_heartbeat_s: float = _spec(30.0, min=1.0, max=3600.0, doc="FleetwatchWatchdog and "
                                        "FleetwatchArchiveFailing are re-sent this often while they fire; notify "
                                        "resolves one that missed three heartbeats (its process is gone: the "
                                        "dead-man's switch trips, a stopped archive's outage ends)")
    stall_intervals: int = _spec(10, min=1, max=10000, doc="a role that makes no progress for this many of its "
                                 "intervals (a source's scrape interval, at least 1 s; the archive's flush interval) "
                                 "is stalled: FleetwatchStalled fires (and for a source, /healthz fails)")


@dataclass(frozen=True)
class IntakeConfig:
    """Checks where data enters a consumer (detect, archive, notify, the MQTT collector): readings
    stamped outside a window around the receiver's clock are dead-lettered, with the reason."""
    max_ahead_s: float = _spec(300.0, min=0, doc="a reading stamped more than this ahead of the receiver's clock "
                               "is dead-lettered (a clock that runs ahead); 0 = no limit. Where the simulator runs "
                               "in the same process its clock is the receiver's; a process that only consumes a "
                               "simulator at fleet.speed != 1 does not apply this limit")
    max_age_s: float = _spec(7 * 86400.0, min=0, doc="a reading older than this before the receiver's clock is "
                             "dead-lettered (a clock that lost its time, epoch ms read as ns); 0 = no limit")


@dataclass(frozen=True)
class Config:
    data_dir: str = _spec("./fleetwatch-data", doc="archive, alerts.jsonl and state live here",
                          nonempty="give a directory, e.g. ./fleetwatch-data")
    fleet: FleetConfig = field(default_factory=FleetConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    dcgm: DcgmConfig = field(default_factory=DcgmConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    power: PowerConfig = field(default_factory=PowerConfig)
    remediate: RemediateConfig = field(default_factory=RemediateConfig)

    @property
    def archive_dir(self) -> Path:
        return Path(self.data_dir) / "archive"

    @property
    def alerts_log(self) -> Path:
        return Path(self.data_dir) / "alerts.jsonl"

    @property
    def state_dir(self) -> Path:
        return Path(self.data_dir) / "state"

    @property
    def mqtt_dead_letters(self) -> Path:
        return Path(self.data_dir) / "deadletter" / "mqtt.jsonl"


_HOST = re.compile(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]")  # a name, an IPv4 or a bracketed IPv6 address


def read_secret(key: str, env_name: str, file_name: str, what: str, otherwise: str,
                env: Mapping[str, str] | None = None) -> bytes | None:
    """A secret named by a `<key>_env` / `<key>_file` pair of settings (the environment
    variable first), or None when neither is set; ConfigError naming the setting when the
    one set gives nothing. The secret itself is never in a message."""
    if env_name:
        value = (os.environ if env is None else env).get(env_name, "")
        if not value:
            raise ConfigError(f"config error: {key}_env = {env_name!r}: that environment variable is not set or "
                              f"empty; set it to {what}, or {otherwise}")
        return value.encode()
    if file_name:
        try:
            data = Path(file_name).read_bytes().strip()
        except OSError as e:
            raise ConfigError(f"config error: {key}_file = {file_name!r}: cannot read it ({e.strerror}); give a "
                              f"readable file holding {what}") from None
        if not data:
            raise ConfigError(f"config error: {key}_file = {file_name!r}: the file is empty; put {what} in it")
        return data
    return None


def host_port(key: str, value: str, default_port: int) -> tuple[str, int]:
    """`host[:port]` of an address setting, or ConfigError naming the key. Strict: no
    scheme, no user info, no space (a retry loop on a typo would hide it)."""
    host, _, port = value.rpartition(":") if ":" in value and not value.endswith("]") else (value, "", str(default_port))
    if not _HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
        shown = f"***@{value.rpartition('@')[2]}" if "@" in value else value  # user info may hold a password
        raise ConfigError(f"config error: {key} = {shown!r}: expected HOST:PORT (no scheme, user or spaces), "
                          f"e.g. bms.example:{default_port}")
    return host.strip("[]"), int(port)


def _coerce(where: str, raw: Any, typ: Any, meta: Mapping[str, Any], from_text: bool) -> Any:
    """Turn one raw value into the declared type, or raise ConfigError naming `where`."""
    def fail(allowed: str) -> ConfigError:
        return ConfigError(f"config error: {where} = {raw!r}: {allowed}")

    origin = typing.get_origin(typ)
    if origin is list and dataclasses.is_dataclass(typing.get_args(typ)[0]):
        if from_text:
            raise fail("set it in the TOML file, as an array of tables")
        if not isinstance(raw, list):
            raise fail("must be an array of tables")
        item = typing.get_args(typ)[0]
        return [i if isinstance(i, item) else _table(item, i, f"{where}[{n}]", from_text={})
                for n, i in enumerate(raw)]
    if origin is list:
        items = [s.strip() for s in raw.split(",") if s.strip()] if from_text and isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise fail("must be a list of strings")
        if meta.get("choices"):
            bad = [i for i in items if i not in meta["choices"]]
            if bad:
                raise fail(f"unknown entries {bad}; allowed: {', '.join(meta['choices'])}")
        return list(items)
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if from_text and str(raw).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return str(raw).lower() in ("1", "true", "yes", "on")
        raise fail("must be true or false")
    if typ in (int, float):
        value = raw
        if from_text:
            try:
                value = typ(raw)
            except ValueError:
                raise fail(f"must be {'an integer' if typ is int else 'a number'}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (typ is int and not isinstance(value, int)):
            raise fail(f"must be {'an integer' if typ is int else 'a number'}")
        value = typ(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise fail("must be a finite number")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo:
            raise fail(f"must be >= {lo}")
        if hi is not None and value > hi:
            raise fail(f"must be <= {hi}")
        return value
    if typ is str:
        if not isinstance(raw, str):
            raise fail("must be a string")
        if meta.get("choices") and raw not in meta["choices"]:
            raise fail(f"allowed: {', '.join(meta['choices'])}")
        if meta.get("nonempty") and not raw.strip():
            raise fail(f"must not be empty; {meta['nonempty']}")
        return raw
    raise TypeError(f"unsupported config type {typ!r}")  # a programming error, not user input


def _build(cls: type, values: Mapping[str, Any], prefix: str, from_text: Mapping[str, bool],
           origins: Mapping[str, str] | None = None) -> Any:
    """`cls` from `values`; a ConfigError says where the value it names was set (`origins`: dotted key ->
    the file, the environment variable or the command line)."""
    origins = origins or {}
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        where = f"{prefix}{unknown[0]}"
        raise _set_at(ConfigError(f"config error: unknown key {where!r}; known keys here: "
                                  f"{', '.join(sorted(known))}"), where, origins)
    kwargs = {}
    for name, f in known.items():
        if name not in values:
            continue
        typ = hints[name]
        key = f"{prefix}{name}"
        try:
            if dataclasses.is_dataclass(typ):
                kwargs[name] = _table(typ, values[name], key, from_text, origins)
            else:
                kwargs[name] = _coerce(key, values[name], typ, f.metadata, from_text.get(key, False))
        except ConfigError as e:
            raise _set_at(e, key, origins) from None
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a check across keys (__post_init__): the first key of this table it names
        named = next((f"{prefix}{n}" for n in kwargs if f"{prefix}{n}" in str(e)), "")
        if not named:  # (none: no guess from the table's other keys)
            e.origin_said = True
            raise
        raise _set_at(e, named, origins) from None


def _set_at(e: ConfigError, key: str, origins: Mapping[str, str]) -> ConfigError:
    """`e`, saying where `key` (or the first key under it) was set, once."""
    if getattr(e, "origin_said", False):
        return e
    origin = origins.get(key) or next((o for k, o in origins.items() if k.startswith(f"{key}.")), None)
    if origin is None:
        return e
    out = ConfigError(f"{e} (set {origin})")
    out.origin_said = True
    return out


def _table(cls: type, raw: Any, where: str, from_text: Mapping[str, bool],
           origins: Mapping[str, str] | None = None) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config error: {where} must be a table")
    return _build(cls, raw, f"{where}.", from_text, origins)


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of a nested mapping's leaves."""
    return [k for name, v in tree.items()
            for k in (_leaves(v, f"{prefix}{name}.") if isinstance(v, Mapping) and v else [f"{prefix}{name}"])]


def _env_values(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """FLEETWATCH_<SECTION>__<KEY> of a section that exists, and FLEETWATCH_<KEY> of a
    top-level key (FLEETWATCH_DATA_DIR). Other FLEETWATCH_* variables are not configuration
    and are left alone: a receiver's secret_env may well be FLEETWATCH_ONCALL_SECRET."""
    hints = typing.get_type_hints(Config)
    sections = {name: typ for name, typ in hints.items() if dataclasses.is_dataclass(typ)}
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}  # dotted key -> the variable
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        path = var[len(ENV_PREFIX):].lower().split("__")
        if len(path) == 1 and (path[0] not in hints or path[0] in sections):
            continue
        if len(path) > 1 and path[0] not in sections:
            # Another tool's variable (FLEETWATCH_ONCALL__TOKEN, a receiver's secret) is none of ours; a section
            # mistyped (ALERT for ALERTS) had been ignored without a word, and the alerts went nowhere.
            if near := difflib.get_close_matches(path[0], sections, n=1, cutoff=0.75):
                raise ConfigError(f"config error: environment variable {var}: unknown section {path[0]!r}; did you "
                                  f"mean FLEETWATCH_{near[0].upper()}__{'__'.join(path[1:]).upper()}?")
            continue
        known = {f.name for f in dataclasses.fields(sections[path[0]])} if len(path) > 1 else set()
        if len(path) > 1 and path[1] not in known:
            raise ConfigError(f"config error: environment variable {var}: unknown key {'.'.join(path)!r}; known "
                              f"keys of [{path[0]}]: {', '.join(sorted(known))}")
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = text
        keys[".".join(path)] = var
    return values, keys


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def existing_data_dir(cfg: Config) -> Config:
    """`cfg`, whose data_dir a daemon must have created (the commands that read one): a typo
    should not go unnoticed."""
    if not Path(cfg.data_dir).is_dir():
        raise ConfigError(f"data_dir {cfg.data_dir!r} does not exist; pass the daemon's --data-dir "
                          f"(or set FLEETWATCH_DATA_DIR)")
    return cfg


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults < TOML file < FLEETWATCH_* env < overrides (already typed, e.g. CLI flags)."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            values = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config error: file {str(p)!r} does not exist") from None
        except OSError as e:  # (a root-only file under the service's user: exit 2, not a restart loop)
            raise ConfigError(f"config error: file {str(p)!r} cannot be read ({e.strerror}); give a TOML file "
                              f"the process's user may read") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config error: {p} is not UTF-8 text; give a TOML file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config error: {p} is not valid TOML: {e}") from None
    origins = {k: f"in {path}" for k in _leaves(values)}
    env_values, env_keys = _env_values(os.environ if env is None else env)
    values = _merge(values, env_values)
    values = _merge(values, overrides or {})
    origins |= {k: f"by the environment variable {var}" for k, var in env_keys.items()}
    origins |= {k: "on the command line" for k in _leaves(overrides or {})}
    from_text = {k: True for k in env_keys if not _in(overrides or {}, k)}
    return _build(Config, values, "", from_text, origins)


def _in(tree: Mapping[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def reference() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every setting: docs/configuration.md's table comes from here."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            if dataclasses.is_dataclass(typ):
                walk(typ, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(default, list):
                default = [dataclasses.asdict(d) if dataclasses.is_dataclass(d) else d for d in default]
            rows.append((f"{prefix}{f.name}", getattr(typ, "__name__", str(typ)), default, f.metadata.get("doc", "")))
    walk(Config, "")
    return rows
