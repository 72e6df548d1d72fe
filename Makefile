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

.PHONY: install proto test test-fast demo bench clean

install: $(STAMP) $(GEN)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch from the local wheel first, so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

$(GEN): $(PROTOS) $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	touch $(GEN)

proto: $(GEN)

test: install
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest tests -m "not gpu" -p no:cacheprovider $(PYTEST_ARGS)

test-fast: install
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest tests/unit -p no:cacheprovider $(PYTEST_ARGS)

demo: install
	RAY_AUTH_MODE=disabled $(BIN)/fleetloop demo $(DEMO_ARGS)

bench: install
	$(BIN)/fleetloop bench ingest --out runs/bench/ingest.json
	$(BIN)/fleetloop bench weights --size-mb 10 --actors 4 --out runs/bench/weights.json

clean:
	rm -rf $(VENV) fleetloop/v1/*_pb2*.py fleetloop/v1/*_pb2*.pyi runs
