"""The check a node must pass before it returns to service (`remediate.validate_command`):
run as `COMMAND NODE` with the case as JSON on stdin (base.py's context plus "node"); exit 0
passes. A failure is an answer, not an error: the node fails validation and goes to repair,
with the reason the check gave."""

from __future__ import annotations

import json
import subprocess

from pipeline.remediate.backends.base import BackendError, check_node
from pipeline.remediate.backends.command import command_env, first_line, run_command, split_command


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


class Validation:
    def __init__(self, command: str, timeout_s: float, env: dict[str, str] | None = None) -> None:
        self.command, self.timeout_s, self.env = command, timeout_s, env
        self.argv = split_command(command)

    def check(self, node: str, context: dict) -> tuple[bool, str]:
        """(passed, what the check said: its last stdout line, or why it failed)."""
        try:
            check_node(node)
        except BackendError as e:
            return False, str(e)
        try:
            proc = run_command([*self.argv, node], self.timeout_s, self.env, stdin=json.dumps({**context, "node": node}))
        except OSError as e:
            return False, f"cannot run {self.argv[0]!r}: {e.strerror or e} (check remediate.validate_command)"
        except subprocess.TimeoutExpired:
            return False, f"timed out after {self.timeout_s:g} s"
        if proc.returncode == 0:
            return True, _last_line(proc.stdout) or "passed"
        return False, f"exit {proc.returncode}: {first_line(proc.stderr) or _last_line(proc.stdout) or 'no output'}"


def validation_for(cfg) -> Validation | None:
    """`cfg` a Config; None when remediate.validate_command is empty (an operator returns nodes)."""
    r = cfg.remediate
    if not r.validate_command.strip():
        return None
    return Validation(r.validate_command, r.command_timeout_s, command_env(r.command_env))
