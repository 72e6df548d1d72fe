# fleetloop LLM rollout actor: upstream vLLM engines on a GPU generate on-policy completions, a
# verifier scores them, and the actor streams them to the learner (`fleetloop actor --kind llm`).
#   docker build -f docker/llm-actor.Dockerfile -t fleetloop/llm-actor:0.1.0 .
# The LLM actor kind is issue 5: until it lands, this image builds but its entry point is refused by
# the CLI (tests/unit/test_dockerfiles.py marks exactly that check xfail, strict).
# Base pinned by exact tag; pin by digest in a real registry. Node driver must support CUDA 12.8.

# ---- builder: a self-contained venv in /opt/venv ----------------------------------------------
FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04 AS builder
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# CUDA torch first (cu128 index, pyproject's version), then vLLM from PyPI with torch==2.13.0 in the
# same request: if this vLLM release wants another torch, the resolver fails the build instead of
# silently replacing the CUDA wheel.
RUN python3.11 -m venv /opt/venv \
 && pip install --no-cache-dir pip==25.3 \
 && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0 \
 && pip install --no-cache-dir vllm==0.32.0 torch==2.13.0
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
 && python -c "import torch, vllm; assert torch.version.cuda == '12.8', torch.__version__; print(vllm.__version__)" \
 && fleetloop actor --help > /dev/null

# ---- runtime ----------------------------------------------------------------------------------
FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04
LABEL org.opencontainers.image.title="fleetloop-llm-actor" \
      org.opencontainers.image.description="fleetloop LLM rollout actor: vLLM generation, verifier rewards, experience streamed to the learner" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="fleetloop" \
      org.opencontainers.image.base.name="nvidia/cuda:12.8.1-runtime-ubuntu22.04"
# python3.11: the venv's interpreter. gcc + python3.11-dev: Triton (used by vLLM kernels) compiles a
# small C launcher against Python.h at run time.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 python3.11-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 fleetloop \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/fleetloop --shell /usr/sbin/nologin fleetloop
COPY --from=builder /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/fleetloop/healthcheck.py
# Model, Triton and vLLM caches go to /tmp so a read-only root filesystem (+ /tmp emptyDir) works;
# mount a volume at /tmp/.cache to keep compiled kernels and downloaded models across restarts.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib XDG_CACHE_HOME=/tmp/.cache TRITON_CACHE_DIR=/tmp/.cache/triton \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/fleetloop
USER 10001:10001
EXPOSE 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["/opt/venv/bin/python", "/opt/fleetloop/healthcheck.py", "--port", "9100", "--path", "/metrics", "--tls", "off"]
ENTRYPOINT ["fleetloop"]
CMD ["actor", "--kind", "llm", "--learner", "learner:50051", "--job", "llm", "--spool", "/tmp/spool", "--metrics-port", "9100"]
