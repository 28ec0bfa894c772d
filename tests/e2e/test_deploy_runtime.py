"""The deployment artifacts' claims that need a real process (docs/operations.md, Deploy):
the agent-only install runs the agent with numba and polars unimportable, against a real Kafka;
the image's build-time warm-up fills the Numba cache that a container then loads without compiling."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from pipeline.bus import EndOfStream, Topic
from pipeline.bus.kafka import KafkaBus
from tests.conftest import REPO
from tests.services import KafkaBroker
from tests.test_deploy import dockerfile_stages

FULL_ONLY = ("numba", "polars")  # what pyproject.toml's extra `all` adds to the agent's install

# Makes numba and polars unimportable in every Python process started with it on PYTHONPATH, as
# on a node with the agent-only install, and records each attempt (an optional import too).
BLOCKER = textwrap.dedent("""
    import os, sys

    class _FullInstallOnly:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {blocked!r}:
                with open(os.environ["BLOCKED_IMPORTS_LOG"], "a") as log:
                    log.write(name + "\\n")
                raise ModuleNotFoundError(f"No module named {{name!r}} (agent-only install)", name=name)

    sys.meta_path.insert(0, _FullInstallOnly())
""").format(blocked=FULL_ONLY)


def agent_only_env(tmp_path: Path, **extra: str) -> dict:
    site = tmp_path / "agent-only-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), BLOCKED_IMPORTS_LOG=str(tmp_path / "blocked.log"),
               **extra)
    return env


async def read_gpu_rows(bootstrap: str, prefix: str) -> list[dict]:
    bus = KafkaBus(bootstrap, prefix=prefix, client_id="deploy-test")
    sub = bus.subscribe([Topic.GPU], f"check-{uuid.uuid4().hex[:6]}")
    await bus.end([Topic.GPU])
    rows: list[dict] = []
    try:
        while True:
            for message in await sub.get_batch(timeout_s=1.0):
                rows += message.value.select(["node", "gpu", "power_w"]).to_pylist()
    except EndOfStream:
        pass
    finally:
        await bus.close()
    return rows


@pytest.mark.kafka
def test_the_agent_runs_without_numba_or_polars(tmp_path):
    """A GPU node's install: `fleetwatch agent` replays the shipped H100 into a real Kafka with
    numba and polars unimportable, and never even tries to import them. Its node name comes from
    FLEETWATCH_AGENT__NODE, as the DaemonSet sets it from the downward API."""
    env = agent_only_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import numba"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert probe.returncode != 0 and "agent-only install" in probe.stderr  # the blocker works
    (tmp_path / "blocked.log").unlink()

    broker = KafkaBroker().start()
    try:
        prefix = f"t{uuid.uuid4().hex[:6]}."
        env.update(FLEETWATCH_KAFKA__TOPIC_PREFIX=prefix, FLEETWATCH_AGENT__NODE="gpu-node-7")
        run = subprocess.run([sys.executable, "-m", "pipeline", "agent", "--kafka", broker.bootstrap,
                              "--replay", "h100", "--duration", "4", "--data-dir", str(tmp_path / "data")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr
        rows = asyncio.run(read_gpu_rows(broker.bootstrap, prefix))
    finally:
        broker.close()
    blocked = tmp_path / "blocked.log"
    assert not blocked.exists(), f"the agent tried to import {blocked.read_text().split()}"
    assert rows and {r["node"] for r in rows} == {"gpu-node-7"}
    assert {r["gpu"] for r in rows} == set(range(8))  # agent.replay_gpus
    assert all(r["power_w"] > 0 for r in rows)


def test_without_the_full_install_detection_says_what_to_install(tmp_path):
    """The agent-only install, asked for a role that needs the full one: status 2 and the command."""
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", "--duration", "1", "--data-dir", str(tmp_path / "d")],
                       cwd=tmp_path, env=agent_only_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "pip install 'fleetwatch[all]'" in r.stderr and "Traceback" not in r.stderr


def test_the_image_warm_up_leaves_a_cache_a_container_loads_without_compiling(tmp_path):
    """The Dockerfile's warm-up step, run as written with the image's NUMBA_* settings, then a
    fresh process (a container starting): every kernel comes from the cache, none is compiled."""
    final = dockerfile_stages()[-1]
    env_lines = [args for op, args in final if op == "ENV"]
    numba_env = {}
    for args in env_lines:
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            if key.startswith("NUMBA_"):
                numba_env[key] = value
    assert "NUMBA_CACHE_DIR" in numba_env
    warm_up = [args for op, args in final if op == "RUN" and "warm_up" in args]
    assert len(warm_up) == 1
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEETWATCH_", "NUMBA_"))}
    env.update(numba_env, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"), EXTRAS="all",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["sh", "-ec", warm_up[0]], env=env, check=True, timeout=600, cwd=tmp_path)
    assert list((tmp_path / "numba-cache").rglob("*.nbi")), "the warm-up cached nothing"

    report = textwrap.dedent("""
        import json
        from numba.core.registry import CPUDispatcher
        from pipeline.detect import kernels
        kernels.warm_up()
        stats = {name: f.stats for name, f in vars(kernels).items() if isinstance(f, CPUDispatcher)}
        print(json.dumps({name: [sum(s.cache_hits.values()), sum(s.cache_misses.values())]
                          for name, s in stats.items()}))
    """)
    out = subprocess.run([sys.executable, "-c", report], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, check=True)
    stats = json.loads(out.stdout)
    assert stats and not {name for name, (_, misses) in stats.items() if misses}, stats
    assert sum(hits for hits, _ in stats.values()) >= 5, stats  # the kernels warm_up() calls
