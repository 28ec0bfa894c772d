"""Each role's Kafka rights, from the role table (pipeline/bus/acls.py, `fleetwatch topics acls`).
That they suffice is tested against a real broker with an authorizer
(e2e/test_kafka_cluster.py: each role runs as a user with exactly these)."""

from __future__ import annotations

import json

from pipeline.bus.acls import role_acls, topics_used
from pipeline.bus.kafka import topic_specs
from pipeline.bus.kafka_settings import DEAD_LETTER
from pipeline.roles import ROLE_SPECS, ROLE_TABLE
from tests.conftest import fleetwatch

CONTROL = {"fleetwatch.alerts", "fleetwatch.power.caps", "fleetwatch.remediation"}  # what acts on the fleet


def written(role: str) -> set[str]:
    return {a.name for a in role_acls(ROLE_SPECS[role]) if a.operation == "Write" and a.resource == "topic"}


def test_a_nodes_agent_and_the_collectors_may_write_nothing_that_acts_on_the_fleet():
    for source in ("agent", "dcgm", "simulate"):
        assert not written(source) & CONTROL, source
    # The facility collector (a site service) writes its own FleetwatchStalled: nothing else tells of its silence.
    assert written("facility") & CONTROL == {"fleetwatch.alerts"}
    assert written("agent") == {"fleetwatch.gpu", "fleetwatch.events", "fleetwatch.power.actions"}
    assert topics_used([ROLE_SPECS["agent"]]) == {"fleetwatch.gpu", "fleetwatch.events", "fleetwatch.power.actions",
                                                  "fleetwatch.power.caps"}
    assert written("detect") >= {"fleetwatch.alerts", "fleetwatch.state", "fleetwatch.racks", DEAD_LETTER}


def test_every_topic_a_role_names_is_one_the_cluster_has():
    known = set(topic_specs(3, 24))
    for spec in ROLE_TABLE:
        assert topics_used([spec]) <= known, spec.name


def test_the_command_prints_kafka_acls_with_the_prefix_and_refuses_what_would_widen_rights():
    r = fleetwatch("topics", "acls", "agent", "detect", env={"FLEETWATCH_KAFKA__TOPIC_PREFIX": "site-a."})
    assert r.returncode == 0, r.stderr
    assert ("kafka-acls.sh --bootstrap-server BOOTSTRAP --add --allow-principal User:fleetwatch-agent "
            "--operation Write --topic site-a.fleetwatch.gpu") in r.stdout
    assert ("--allow-principal User:fleetwatch-detect --operation Write --transactional-id "
            "site-a.fleetwatch.detect-p --resource-pattern-type prefixed") in r.stdout
    assert "--operation Read --group site-a.fleetwatch.detect-site" in r.stdout
    rights = json.loads(fleetwatch("topics", "acls", "--json", "notify").stdout)
    assert rights["notify"]["principal"] == "User:fleetwatch-notify"
    assert {(a["operation"], a["name"]) for a in rights["notify"]["acls"]} == {
        ("Read", "fleetwatch.alerts"), ("Read", "fleetwatch.notify"), ("Write", DEAD_LETTER)}
    same_user = fleetwatch("topics", "acls", "--principal", "User:fleetwatch")
    assert same_user.returncode == 2 and "put {role} in it" in same_user.stderr
    typo = fleetwatch("topics", "acls", "detcet")
    assert typo.returncode == 2 and "no role 'detcet'" in typo.stderr and "detect" in typo.stderr
