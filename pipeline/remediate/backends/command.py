"""The command backend: a site's own script does every step, called as
`COMMAND NODE STEP ALERTNAME` with the case as JSON on stdin (`context` of base.py plus
"node" and "step"). STEP is quarantine, drained, held, reset_gpu, reboot_node or resume.

Exit codes: for drained and held, 0 is yes and 1 is no; for the other steps 0 is done and 2
is "cannot do this here" (Unsupported: the node goes to repair, stderr says why). Anything
else is a failure whose first stderr line is reported. drained and held have no case to
hand, so ALERTNAME is "" for them. The Slurm backend calls one of these for its actions
(`remediate.action_command`): the same convention, STEP being the action.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
from collections.abc import Mapping
from fnmatch import fnmatchcase

from pipeline.config import ConfigError
from pipeline.remediate.backends.base import ACTIONS, BackendError, Unsupported, check_node


def split_command(line: str) -> list[str]:
    """A command line as a shell would split it ("bash /x/y.sh" is two words)."""
    try:
        argv = shlex.split(line)
    except ValueError as e:
        raise ConfigError(f"cannot split {line!r} into a command ({e}): quote it as a shell would") from None
    if not argv:
        raise ConfigError("the command is empty: give a program and its arguments")
    return argv


def command_env(names: list[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The daemon's environment variables that `remediate.command_env` names (or matches): a
    site's script gets these, never the rest (the daemon's tokens and credentials)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if any(fnmatchcase(k, name) for name in names)}


def run_command(argv: list[str], timeout_s: float, env: dict[str, str] | None = None,
                stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run to the end; any exit status is returned. Raises OSError (cannot start) and
    subprocess.TimeoutExpired, after killing the whole process group: a hung script's
    children (an ssh to a dead node) must not outlive it."""
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, errors="replace",
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(stdin, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


class Command:
    name = "command"

    def __init__(self, path: str, timeout_s: float = 60.0, env: dict[str, str] | None = None) -> None:
        self.path, self.timeout_s, self.env = path, timeout_s, env
        self.argv = split_command(path)

    def _call(self, node: str, step: str, context: dict) -> subprocess.CompletedProcess[str]:
        check_node(node)  # (never a script's option: `-oProxyCommand=...` to its ssh)
        argv = [*self.argv, node, step, str(context.get("alertname", ""))]
        shown = f"`{self.path} {node} {step}`"  # never the stdin: the case is the script's business
        try:
            return run_command(argv, self.timeout_s, self.env, json.dumps({**context, "node": node, "step": step}))
        except OSError as e:
            raise BackendError(f"cannot run {shown} ({e.strerror or e}): check that {self.argv[0]!r} exists and "
                               f"is executable, or set remediate.command / remediate.action_command") from None
        except subprocess.TimeoutExpired:
            raise BackendError(f"{shown} did not finish within {self.timeout_s:g} s and was stopped: make it "
                               f"faster or raise remediate.command_timeout_s") from None

    def _failed(self, node: str, step: str, proc: subprocess.CompletedProcess[str], expected: str) -> BackendError:
        return BackendError(f"`{self.path} {node} {step}` exited with {proc.returncode} ({expected}): "
                            f"{first_line(proc.stderr) or 'no message on stderr'}")

    def _step(self, node: str, step: str, context: dict) -> None:
        proc = self._call(node, step, context)
        if proc.returncode == 2:
            raise Unsupported(f"`{self.path} {node} {step}` cannot do this here: "
                              f"{first_line(proc.stderr) or 'no reason on stderr'}")
        if proc.returncode != 0:
            raise self._failed(node, step, proc, "0: done, 2: unsupported")

    def _ask(self, node: str, step: str) -> bool:
        proc = self._call(node, step, {})
        if proc.returncode not in (0, 1):
            raise self._failed(node, step, proc, "0: yes, 1: no")
        return proc.returncode == 0

    def quarantine(self, node: str, context: dict) -> None:
        self._step(node, "quarantine", context)

    def drained(self, node: str) -> bool:
        return self._ask(node, "drained")

    def held(self, node: str) -> bool | None:
        try:
            return self._ask(node, "held")
        except BackendError:
            return None  # cannot tell now: the caller asks again later

    def act(self, node: str, action: str, context: dict) -> None:
        if action not in ACTIONS:
            raise Unsupported(f"{action!r} is not an action a backend does (only {', '.join(ACTIONS)})")
        self._step(node, action, context)

    def resume(self, node: str, context: dict) -> None:
        self._step(node, "resume", context)
