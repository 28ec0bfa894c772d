"""Which scheduler job uses each GPU: dcgm-exporter's HPC job mapping directory, read by the
NVML agent (`agent.job_mapping_dir`), so a Slurm fleet's prolog and epilog scripts that feed
dcgm-exporter's `hpc_job` label feed the agent's `job` column too.

The format is dcgm-exporter's (`--hpc-job-mapping-dir`): one file per GPU, named by its index
(`0`, `1`, ...), one job id per line; the prolog writes it when a job gets the GPU and the
epilog removes it. A GPU without a file has no job (null). Several jobs on one GPU are
comma-separated, as the DCGM source writes a GPU seen in several `hpc_job` series.

Read at each scrape, one directory listing; a file is read again only when its size or time
changed, or it was replaced. A directory that is missing or unreadable gives no jobs and is
said once, until it is readable again: the samples go on without them.

`deploy/slurm/fleetwatch-job-map` is a Slurm Prolog and Epilog that keeps such a directory.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


class JobMapping:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._files: dict[str, tuple[tuple[int, ...], str | None]] = {}  # name -> ((inode, mtime, size), jobs)
        self._failing: str | None = None

    def jobs(self, indices: list[int]) -> list[str | None]:
        """The jobs on each GPU index now (comma-separated), None where the mapping names none."""
        try:
            entries = {e.name: e for e in os.scandir(self.directory) if e.name.isdigit() and e.is_file()}
        except OSError as e:
            self._fail(f"cannot list {self.directory} ({e.strerror or e}): samples go without their jobs until it "
                       "can be read; is agent.job_mapping_dir the directory the scheduler's prolog writes "
                       "(dcgm-exporter's --hpc-job-mapping-dir)?")
            return [None] * len(indices)
        if self._failing is not None:
            log.info("agent: job mapping %s readable again", self.directory)
            self._failing = None
        files: dict[str, tuple[tuple[int, ...], str | None]] = {}
        for name, entry in entries.items():
            try:
                st = entry.stat()
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # (an epilog's rename: another inode)
                known = self._files.get(name)
                files[name] = known if known and known[0] == stamp else (stamp, _read(entry.path))
            except OSError:  # removed by the epilog since the listing: no job
                continue
        self._files = files
        return [files[str(i)][1] if str(i) in files else None for i in indices]

    def _fail(self, why: str) -> None:
        if self._failing != why:
            log.warning("agent: job mapping: %s", why)
            self._failing = why


def _read(path: str) -> str | None:
    with open(path, encoding="utf-8", errors="replace") as f:
        jobs = list(dict.fromkeys(line.strip() for line in f if line.strip()))
    return ",".join(jobs) or None
