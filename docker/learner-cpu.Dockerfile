# fleetloop learner, CPU variant: gRPC ingest + weights + training on Ray (tests, small jobs, CI).
#   docker build -f docker/learner-cpu.Dockerfile -t fleetloop/learner:0.1.0-cpu .
# Same layout and entry point as docker/learner.Dockerfile (the CUDA image); also usable as a KubeRay
# head/worker image (`ray` is on PATH). Base pinned by exact tag; pin by digest in a real registry.

# ---- builder: a self-contained venv in /opt/venv ----------------------------------------------
FROM python:3.11.14-slim-bookworm AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/venv/bin:$PATH
WORKDIR /src
# CPU torch first, from the PyTorch CPU index, so `pip install .` keeps it (never a CUDA build).
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir pip==25.3 \
 && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY fleetloop/ fleetloop/
COPY actor/ actor/
COPY learner/ learner/
COPY services/ services/
COPY bench/ bench/
# Generated gRPC modules are not in git: generate them (as `make` does) before installing.
RUN pip install --no-cache-dir grpcio-tools==1.85.1 \
 && python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. proto/fleetloop/v1/*.proto \
 && pip install --no-cache-dir . \
 && python -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__" \
 && fleetloop learner --help > /dev/null \
 && ray --version

# ---- runtime ----------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="fleetloop-learner-cpu" \
      org.opencontainers.image.description="fleetloop learner on Ray (CPU torch): experience ingest over gRPC, training, versioned weights" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="fleetloop" \
      org.opencontainers.image.base.name="python:3.11.14-slim-bookworm"
# wget: KubeRay's default Ray pod probes exec `wget ... /api/local_raylet_healthz`.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 fleetloop \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/fleetloop --shell /bin/bash fleetloop \
 && mkdir -p /etc/fleetloop /var/lib/fleetloop/learner \
 && chown 10001:10001 /var/lib/fleetloop/learner
COPY --from=builder /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/fleetloop/healthcheck.py
# RAY_AUTH_MODE matches what the launcher sets, so `ray start` (KubeRay) and the learner agree.
# Caches go to /tmp so the container also runs with a read-only root filesystem (+ /tmp emptyDir).
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 RAY_AUTH_MODE=disabled \
    MPLCONFIGDIR=/tmp/matplotlib XDG_CACHE_HOME=/tmp/.cache
WORKDIR /home/fleetloop
USER 10001:10001
# 50051 gRPC (robots), 9400 /metrics; the learner config must set port/metrics_port to these (the
# Kubernetes launcher does). Ray head ports (6379 GCS, 8265 dashboard, 10001 client) when under KubeRay.
EXPOSE 50051 9400 6379 8265 10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
  CMD ["/opt/venv/bin/python", "/opt/fleetloop/healthcheck.py", "--port", "9400", "--path", "/metrics", "--tls", "off"]
ENTRYPOINT ["fleetloop"]
CMD ["learner", "--config", "/etc/fleetloop/learner.json"]
