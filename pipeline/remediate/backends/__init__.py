"""Where a remediation is applied: one module per kind of scheduler or tooling, each a
`Backend` (backends/base.py). `remediate.backend` names the one a site uses."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.remediate.backends.base import Backend


def backend_for(cfg: Config) -> Backend | None:
    """The backend `remediate.backend` names (None for "none"); each is imported only when
    chosen, so a site without Slurm or Kubernetes never loads its module."""
    from pipeline.config import ConfigError
    from pipeline.remediate.backends.command import Command, command_env
    r = cfg.remediate
    env = command_env(r.command_env)
    if r.backend in ("slurm", "kubernetes"):
        actions = Command(r.action_command, r.command_timeout_s, env) if r.action_command.strip() else None
        if r.backend == "slurm":
            from pipeline.remediate.backends.slurm import Slurm
            return Slurm(r.scontrol, env, r.command_timeout_s, actions=actions, short_names=r.slurm_short_names)
        from pipeline.remediate.backends.kubernetes import Kubernetes
        return Kubernetes(r.kubeconfig, timeout_s=r.command_timeout_s, actions=actions)
    if r.backend == "command":
        if not r.command.strip():
            raise ConfigError("remediate.backend = command needs remediate.command: set it to the script that does "
                              "each step (`COMMAND NODE STEP ALERTNAME`, the case as JSON on stdin)")
        return Command(r.command, r.command_timeout_s, env)
    return None
