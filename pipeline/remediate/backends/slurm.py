"""The Slurm backend: a quarantine is a drain (`scontrol update nodename=NODE state=drain
reason=...`), its end a resume; the cluster is the one `SLURM_CONF` names, as for any Slurm
client. Whoever runs it must be allowed to change nodes (root, SlurmUser, or a user with
AdminLevel=Operator).

Slurm calls a node DRAINING while jobs still run on it (ALLOCATED+DRAIN, MIXED+DRAIN, or
+COMPLETING) and DRAINED once they ended (IDLE+DRAIN, or DOWN+DRAIN: a DOWN node runs
nothing). A drain is Slurm's only out-of-service mark an operator and fleetwatch share, so:

- held: the node is out of service while it has DRAIN, whoever's reason it carries now (an
  operator who drains it again with a reason of their own owns it from then on), or while
  it is DOWN or FAIL; without any of them someone returned it to service.
- quarantine and resume never take over an operator's drain or FAIL: a node drained or FAIL
  with a reason not starting with REASON_PREFIX is left alone and the call fails, saying so.
- a DOWN node (an operator's, or Slurm's own "Not responding") is drained all the same, so that
  it cannot come back into service with its fault, and its reason is kept in ours
  (`DOWN_BEFORE`); a resume that finds it still DOWN puts it back as it was (DOWN, that
  reason), one that went DOWN under our drain is only undrained (`state=undrain`): whatever
  made it DOWN is not ours to clear, and only a node that is up is resumed into service.
- one node at a time: a name from the samples that is a hostlist expression (`gpu[01-04]`,
  `a,b`) or ALL, which scontrol would expand to several nodes, is refused.

Slurm usually names nodes by their short host name (NodeName) where the samples may carry the
full one (dcgm-exporter's Hostname, an agent's FQDN). With `short_names`
(remediate.slurm_short_names) a node Slurm does not know by its full name is looked up,
drained and resumed by its short name (the first label), said once per node; without it, the
error says that Slurm knows the short name. Off by default: a drain is the one call that must
never reach another machine, and two domains may share a short name.

Slurm cannot reset a GPU, and reboots a node only where its RebootProgram is set, with a reboot
that clears the drain (`scontrol reboot ASAP nextstate=resume`): `actions` (remediate.action_command)
does both, keeping the node drained, or the node goes to repair.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess

from pipeline.remediate.backends.base import REASON_PREFIX, BackendError, delegated_action, is_host_name, reason
from pipeline.remediate.backends.command import Command, first_line, run_command

# A reason may hold "key=value" words (ours does) and "[who@where]" (an operator's): its value ends at a
# field `scontrol show node` may print after it (Comment, Extra, ResumeAfterTime since 23.02; InstanceId,
# InstanceType, ReservationName since 23.11) or the line's end, less the stamp Slurm puts last ("[user@time]").
# (Read up to ReservationName, a DOWN node's reason came back with the field in it at resume, and
# Slurm returns a node to service by itself only where its reason is exactly "Not responding".)
_AFTER_REASON = r"(?:Comment|Extra|ResumeAfterTime|InstanceId|InstanceType|ReservationName)="
_REASON = re.compile(rf"(?:^|\s)Reason=(.*?)(?:\s+\[[^\[\]@]*@[^\[\]]*\])?\s*(?=\s{_AFTER_REASON}|$)", re.M)
_NO_JOBS = ("IDLE", "DOWN")  # base states in which nothing runs on the node
DOWN_BEFORE = "; DOWN before: "  # in our reason: the reason of the DOWN node we drained, put back at resume

log = logging.getLogger("pipeline.remediate")


class UnknownNode(BackendError):
    """Slurm answered that it has no node of this name (`said`: Slurm's words)."""
    said = ""


def parse_node(text: str) -> dict:
    """One node of `scontrol show node NODE [--oneliner]`: {"name", "base" (IDLE, ALLOCATED,
    MIXED, DOWN, ...), "flags" (DRAIN, COMPLETING, NOT_RESPONDING, ...), "reason" (without
    Slurm's " [user@time]" suffix; "" when none)}. Raises ValueError when there is no state."""
    state = re.search(r"(?:^|\s)State=(\S+)", text)
    if state is None:
        raise ValueError(f"no State= in {first_line(text)[:200]!r}")
    # sinfo-style markers (IDLE*, DOWN~) are not scontrol's, but cost nothing to drop.
    base, *flags = (word.rstrip("*~#!%$@^-") for word in state.group(1).upper().split("+"))
    name = re.search(r"(?:^|\s)NodeName=(\S+)", text)
    found = _REASON.search(text)
    return {"name": name.group(1) if name else "", "base": base, "flags": frozenset(flags),
            "reason": found.group(1).strip() if found else ""}


def is_drained(node: dict) -> bool:
    """DRAINED, not DRAINING: drain asked and no job left on the node."""
    return "DRAIN" in node["flags"] and node["base"] in _NO_JOBS and "COMPLETING" not in node["flags"]


def is_ours(node: dict) -> bool:
    return node["reason"].startswith(REASON_PREFIX)


class Slurm:
    name = "slurm"

    def __init__(self, scontrol: str = "scontrol", env: dict[str, str] | None = None, timeout_s: float = 60.0,
                 actions: Command | None = None, short_names: bool = False) -> None:
        self.scontrol, self.env, self.timeout_s, self.actions = scontrol, env, timeout_s, actions
        self.short_names = short_names
        self._names: dict[str, str] = {}  # a node as the samples name it -> Slurm's NodeName, where they differ

    def _scontrol(self, node: str, *args: str) -> str:
        argv = [self.scontrol, *args]
        shown = "`" + " ".join(shlex.quote(a) for a in argv) + "`"
        try:
            proc = run_command(argv, self.timeout_s, self.env)
        except OSError as e:  # not installed, not executable
            raise BackendError(f"cannot run {self.scontrol!r} for node {node} ({e.strerror or e}): install Slurm's "
                               f"client (Debian: slurm-client) or set remediate.scontrol to its path") from None
        except subprocess.TimeoutExpired:
            raise BackendError(f"{shown} for node {node} did not answer within {self.timeout_s:g} s: is slurmctld "
                               f"up and reachable from here?") from None
        if proc.returncode != 0:
            message = first_line(proc.stderr) or first_line(proc.stdout) or "no message"
            may = ", and may this user change nodes (root, SlurmUser or AdminLevel=Operator)" \
                if args[0] == "update" else ""
            error = UnknownNode if re.search(r"\bnot found\b", message, re.I) else BackendError
            failed = error(f"{shown} failed for node {node} (exit {proc.returncode}: {message}): is {node} a "
                           f"node of this cluster (`scontrol show node {node}`){',' if may else ' and'} does "
                           f"SLURM_CONF name the cluster{may}?")
            failed.said = message
            raise failed
        return proc.stdout

    def _show(self, name: str) -> dict:
        text = self._scontrol(name, "show", "node", name, "--oneliner")
        try:
            return parse_node(text)
        except ValueError as e:
            raise BackendError(f"`{self.scontrol} show node {name}` gave no state for node {name} ({e}): is "
                               f"{self.scontrol!r} Slurm's scontrol?") from None

    def show(self, node: str) -> dict:
        """parse_node of the node now (by Slurm's name for it: `slurm_name`)."""
        if not is_host_name(node):
            raise BackendError(f"{node!r} is not one node's name: scontrol would take it for several nodes (a "
                               f"hostlist expression, a list or ALL); fleetwatch drains one node at a time")
        name = self._names.get(node, node)
        try:
            return self._show(name)
        except UnknownNode as unknown:
            short = node.split(".", 1)[0]
            if name != node or short == node:
                raise
            try:
                found = self._show(short)
            except UnknownNode as e:
                raise BackendError(f"Slurm knows neither {node} nor its short name {short} ({unknown.said}; "
                                   f"{e.said}): is it a node of this cluster, and does SLURM_CONF name the cluster?") \
                    from None
            if not self.short_names:
                raise BackendError(f"{unknown}: Slurm knows its short name {short}; if that is this node (Slurm's "
                                   f"NodeName is the short host name), set remediate.slurm_short_names = true") \
                    from None
            self._names[node] = short
            log.info("remediate: Slurm names node %s %s (its short host name): drained and resumed by that name",
                     node, short)
            return found

    def slurm_name(self, node: str) -> str:
        """The name Slurm knows `node` by (after a `show`)."""
        return self._names.get(node, node)

    def _refuse_an_operators_mark(self, node: str, now: dict, doing: str) -> None:
        if is_ours(now):
            return
        if "DRAIN" in now["flags"]:
            raise BackendError(f"node {node} is drained by someone else (reason {now['reason']!r}): fleetwatch "
                               f"does not {doing} it; whoever drained it resumes it (`scontrol update "
                               f"nodename={self.slurm_name(node)} state=resume`)")
        if "FAIL" in now["flags"]:
            raise BackendError(f"node {node} is FAIL, set by someone else (reason {now['reason']!r}): fleetwatch "
                               f"does not {doing} it; whoever set it returns it")

    def quarantine(self, node: str, context: dict) -> None:
        now = self.show(node)
        if "DRAIN" in now["flags"] and is_ours(now):
            return  # already (a restart mid-case): its reason, and what it keeps, stay
        self._refuse_an_operators_mark(node, now, "take over and later resume")
        name = self.slurm_name(node)
        why = reason(context)
        if now["base"] == "DOWN" and not is_ours(now):
            why += DOWN_BEFORE + (now["reason"] or "none")
        elif now["base"] == "DOWN" and DOWN_BEFORE in now["reason"]:  # a resume cut off after its undrain
            why += DOWN_BEFORE + now["reason"].split(DOWN_BEFORE, 1)[1]
        try:
            self._scontrol(name, "update", f"nodename={name}", "state=drain", f"reason={why}")
        except BackendError as failed:
            # scontrol gives up after its own timeout (~10 s) while a slow slurmctld may still apply the
            # update: a drain of ours found now is this one, which no case would otherwise ever resume.
            try:
                now = self._show(name)
            except BackendError:
                raise failed from None
            if not ("DRAIN" in now["flags"] and is_ours(now)):
                raise failed from None
            log.info("remediate: scontrol reported a failure, but node %s carries our drain: quarantined", node)

    def drained(self, node: str) -> bool:
        return is_drained(self.show(node))

    def held(self, node: str) -> bool | None:
        try:
            now = self.show(node)
        except BackendError:
            return None  # cannot tell now: the caller asks again later
        return "DRAIN" in now["flags"] or "FAIL" in now["flags"] or now["base"] == "DOWN"

    def act(self, node: str, action: str, context: dict) -> None:
        delegated_action("Slurm", self.actions, node, action, context)

    def resume(self, node: str, context: dict) -> None:
        now = self.show(node)
        name = self.slurm_name(node)
        if "DRAIN" in now["flags"]:
            self._refuse_an_operators_mark(node, now, "resume")
            if now["base"] != "DOWN":
                self._scontrol(name, "update", f"nodename={name}", "state=resume")
                return
            # DOWN: ours to undrain, not to bring up (undrain keeps it DOWN, where resume would not)...
            self._scontrol(name, "update", f"nodename={name}", "state=undrain")
        elif not is_ours(now):
            return  # already returned to service (Slurm refuses a second resume: "Invalid node state")
        # ... and DOWN when we drained it (or undrained by a resume cut off here): with the reason it had
        if now["base"] == "DOWN" and DOWN_BEFORE in now["reason"]:
            self._scontrol(name, "update", f"nodename={name}", "state=down",
                           f"reason={now['reason'].split(DOWN_BEFORE, 1)[1]}")
