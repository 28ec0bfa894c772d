"""Remediation: from a failing node to a drained node and back, with guardrails.

Follow the data: the alerts (each with its catalog remediation: none, reset_gpu, reboot_node,
drain_inspect, replace) come in as `cases.AlertChange`; `remediator.Remediator` opens a case
for a node whose allowed alert asks for one, unless `guardrails.Guardrails` refuses, and drives
it healthy -> quarantined -> drained -> action -> validating -> healthy (or needs_repair), one
state per round, through a backend (`backends/`: slurm, command) and a check (`validate.py`).
Every transition is a `cases.Event` (remediation_events). The role that runs it in the daemon
is pipeline/roles/remediate.py; `fleetwatch eval` runs it in dry-run (analytics/evaluate.py).
"""
