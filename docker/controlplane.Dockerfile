# fleetloop control plane: REST API + dashboard over Redis, launching jobs as Kubernetes objects.
#   docker build -f docker/controlplane.Dockerfile -t fleetloop/controlplane:0.1.0 .
# Build context: the repository root (see .dockerignore). Runtime contract (env REDIS_URL,
# FLEETLOOP_NAMESPACE, FLEETLOOP_ADMIN_KEY, FLEETLOOP_API_TLS_*, FLEETLOOP_K8S_*): docker/README.md.
# Base images are pinned by exact tag; in a real registry pin them by digest too (@sha256:...).

# ---- builder: a self-contained venv in /opt/venv ----------------------------------------------
FROM python:3.11.14-slim-bookworm AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/venv/bin:$PATH
WORKDIR /src
# CPU torch first, from the PyTorch CPU index, so that `pip install .` finds torch==2.13.0 satisfied
# and never pulls a CUDA build (the API imports the algorithm configs to validate job specs).
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
# The generated gRPC modules (fleetloop/v1/*_pb2*.py) are not in git: generate them (as `make` does)
# before installing, so the wheel contains them. The dashboard's static files are package data of
# `services.control` (pyproject); the build fails if the installed package lacks them.
RUN pip install --no-cache-dir grpcio-tools==1.85.1 \
 && python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. proto/fleetloop/v1/*.proto \
 && pip install --no-cache-dir . \
 && python -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__" \
 && site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && test -f "$site/services/control/dashboard/index.html" \
 && fleetloop api --help > /dev/null

# ---- runtime ----------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="fleetloop-controlplane" \
      org.opencontainers.image.description="fleetloop control plane: REST API and dashboard; launches learners and simulated fleets as Kubernetes objects" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="fleetloop" \
      org.opencontainers.image.base.name="python:3.11.14-slim-bookworm"
RUN groupadd --system --gid 10001 fleetloop \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/fleetloop --shell /usr/sbin/nologin fleetloop
COPY --from=builder /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/fleetloop/healthcheck.py
# Caches go to /tmp so the container also runs with a read-only root filesystem (+ /tmp emptyDir).
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib XDG_CACHE_HOME=/tmp/.cache
WORKDIR /home/fleetloop
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["/opt/venv/bin/python", "/opt/fleetloop/healthcheck.py", "--port", "8000", "--path", "/healthz"]
ENTRYPOINT ["fleetloop"]
CMD ["api", "--launcher", "kubernetes", "--host", "0.0.0.0", "--port", "8000"]
