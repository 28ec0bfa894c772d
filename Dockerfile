# syntax=docker/dockerfile:1
# Fleetwatch: one image for every role (`docker run IMAGE detect --kafka kafka:9092 ...`).
#   docker build -t fleetwatch .                                   the full install
#   docker build --build-arg EXTRAS=agent -t fleetwatch-agent .    GPU nodes: no Numba, no polars
# Everything is installed at build time, so a container starts without a package index; it
# runs as the unprivileged user fleetwatch (uid 10001); data lives in /var/lib/fleetwatch.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY runbooks/ runbooks/
COPY schemas/ schemas/
# Every wheel of the full install, Fleetwatch's included; the final stage installs from these alone.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[all]"

FROM ${PYTHON_IMAGE}
ARG EXTRAS=all
# NUMBA_CPU_NAME=generic: the kernels cached below are valid on any CPU of the architecture;
# a cache compiled for the build host's CPU would miss (and recompile) everywhere else.
ENV PATH=/opt/fleetwatch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/var/cache/fleetwatch/numba \
    NUMBA_CPU_NAME=generic \
    FLEETWATCH_DATA_DIR=/var/lib/fleetwatch
# tini as PID 1: it forwards SIGTERM to fleetwatch from the first instant and reaps the orphans of the
# remediation commands (Python as PID 1 does neither).
RUN apt-get update && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 fleetwatch \
 && useradd --system --uid 10001 --gid fleetwatch --home-dir /var/lib/fleetwatch --shell /usr/sbin/nologin fleetwatch \
 && install -d -o fleetwatch -g fleetwatch -m 0750 /var/lib/fleetwatch "$NUMBA_CACHE_DIR"
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    python -m venv /opt/fleetwatch \
 && /opt/fleetwatch/bin/pip install --no-cache-dir --no-index --find-links /wheels "fleetwatch[${EXTRAS}]"
USER fleetwatch
# Compile the detectors' kernels now, as the user that runs them: Numba only uses a cache
# directory it can write, and a container then starts without compiling (readiness in seconds).
RUN if [ "$EXTRAS" != agent ]; then python -c "from pipeline.detect import kernels; kernels.warm_up()"; fi
WORKDIR /var/lib/fleetwatch
VOLUME ["/var/lib/fleetwatch"]
# 9400: the NVML agent (dcgm-exporter's port and names); 9410: the central roles.
EXPOSE 9400 9410
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "fleetwatch"]
CMD ["run", "--http", "0.0.0.0:9410"]
