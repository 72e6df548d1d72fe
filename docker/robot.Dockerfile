# fleetloop simulated robot: one stateless actor driving a Meta-World (MuJoCo) robot with the current
# policy, streaming experience to a learner over gRPC.
#   docker build -f docker/robot.Dockerfile -t fleetloop/robot:0.1.0 .
#   docker run fleetloop/robot:0.1.0 actor --learner HOST:50051 --job JOB --tasks reach-v3 --metrics-port 9100
# Camera observations (pixel robots) render headless through EGL on Mesa (llvmpipe on a
# CPU; MUJOCO_GL=egl is the actor's default): the runtime installs those libraries, and no X server.
# Base pinned by exact tag; pin by digest in a real registry.

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
 && fleetloop actor --help > /dev/null

# ---- runtime ----------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="fleetloop-robot" \
      org.opencontainers.image.description="fleetloop simulated robot actor (Meta-World on headless MuJoCo) streaming experience to a learner" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="fleetloop" \
      org.opencontainers.image.base.name="python:3.11.14-slim-bookworm"
# libegl1 libopengl0 libegl-mesa0 libgl1-mesa-dri libgbm1: headless EGL rendering of the robot's cameras.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libegl1 libopengl0 libegl-mesa0 libgl1-mesa-dri libgbm1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 fleetloop \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/fleetloop --shell /usr/sbin/nologin fleetloop
COPY --from=builder /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/fleetloop/healthcheck.py
# The spool (unacknowledged chunks) lives in /tmp/spool; mount a volume there to keep it across
# container restarts. Caches go to /tmp so a read-only root filesystem works.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib XDG_CACHE_HOME=/tmp/.cache FLEETLOOP_METRICS_HOST=0.0.0.0
WORKDIR /home/fleetloop
USER 10001:10001
EXPOSE 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/opt/venv/bin/python", "/opt/fleetloop/healthcheck.py", "--port", "9100", "--path", "/metrics", "--tls", "off"]
ENTRYPOINT ["fleetloop"]
# Defaults for a compose-style network where the learner is reachable as `learner`; the token comes
# from $FLEETLOOP_ROBOT_TOKEN. Override the whole command to point at a real learner and job.
CMD ["actor", "--learner", "learner:50051", "--job", "demo", "--tasks", "reach-v3", "--spool", "/tmp/spool", "--metrics-port", "9100"]
