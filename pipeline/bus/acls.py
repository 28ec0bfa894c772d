"""The Kafka ACLs each role's user needs, made from the role table (roles/__init__.py): a
site that gives each kind of process its own user (docs/kafka.md, Users and ACLs) grants
exactly these, with `kafka-acls.sh` (`fleetwatch topics acls` prints the commands).

What a role does on the cluster, and the right it takes (Kafka's DESCRIBE comes with READ
and WRITE):
- produces to a topic (its `outputs`): WRITE on the topic; a consumer also writes what it
  cannot decode to the dead-letter topic;
- consumes in a group (`inputs`, `group`, and `tiers`' groups): READ on the topics and on
  the group (join, fetch and commit offsets, the lag check);
- reads outside a group (`listens`: an agent's power caps, the power role's look back at
  the alerts, detect's checkpoints): READ on the topic;
- transactional producers (detect): WRITE on the transactional ids its groups' names begin
  (one prefixed ACL a group).
Creating topics is not here: `fleetwatch topics create`, run once as a user with CREATE,
makes them, and the roles run with `kafka.create_topics = false`.

So a node's agent may write samples, events and what it did with a cap, and read its caps;
it cannot write an alert, a cap or a remediation. What it writes names nodes, and Kafka
cannot tell one node's writes from another's: a node's credential can still send samples
in another node's name (the guardrails bound what detection of them may lead to).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from pipeline.bus.kafka_settings import DEAD_LETTER, GROUP_PREFIX
from pipeline.roles import RoleSpec


@dataclass(frozen=True)
class Acl:
    operation: str        # Read, Write
    resource: str         # topic, group, transactional-id
    name: str             # on the cluster, kafka.topic_prefix included
    prefixed: bool = False

    def args(self) -> list[str]:
        """kafka-acls.sh's arguments for it, after --allow-principal."""
        return ["--operation", self.operation, f"--{self.resource}", self.name,
                *(["--resource-pattern-type", "prefixed"] if self.prefixed else [])]


def role_acls(spec: RoleSpec, prefix: str = "") -> list[Acl]:
    """What `spec`'s user needs, in order, each once; `prefix` is kafka.topic_prefix."""
    acls: list[Acl] = []

    def add(acl: Acl) -> None:
        if acl not in acls:
            acls.append(acl)
    groups = ([(spec.group, spec.inputs)] if spec.group else []) + list(spec.tiers)
    for topic in spec.outputs:
        add(Acl("Write", "topic", f"{prefix}{topic}"))
    for group, topics in groups:
        for topic in topics:
            add(Acl("Read", "topic", f"{prefix}{topic}"))
        add(Acl("Read", "group", f"{prefix}{GROUP_PREFIX}{group}"))
    for topic in spec.listens:
        add(Acl("Read", "topic", f"{prefix}{topic}"))
    if groups:
        add(Acl("Write", "topic", f"{prefix}{DEAD_LETTER}"))
    if spec.transactional:
        for group, _ in groups:
            add(Acl("Write", "transactional-id", f"{prefix}{GROUP_PREFIX}{group}-p", prefixed=True))
    return acls


def topics_used(specs: list[RoleSpec]) -> set[str]:
    """The topics (unprefixed) a process of these roles reads or writes: the ones it creates or
    checks at start. A user with only its role's rights sees no other, so it must ask for none."""
    return {a.name for spec in specs for a in role_acls(spec) if a.resource == "topic"}


def commands(specs: list[RoleSpec], principal: str, prefix: str = "", bootstrap: str = "BOOTSTRAP") -> list[str]:
    """One `kafka-acls.sh` command line per role and right; `principal` may hold `{role}`."""
    lines = []
    for spec in specs:
        who = principal.format(role=spec.name)
        lines.append(f"# {spec.name}: {who}")
        lines += [shlex.join(["kafka-acls.sh", "--bootstrap-server", bootstrap, "--add", "--allow-principal", who,
                              *acl.args()]) for acl in role_acls(spec, prefix)]
    return lines
