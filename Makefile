# Quickstart: `make run` serves on 127.0.0.1:50051 with ./flowsession.db; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ADDRESS ?= 127.0.0.1:50051
DB ?= ./flowsession.db
PROTO_FILES := $(wildcard protos/flowsession/v1/*.proto)
GEN_DIR := clients/python

.PHONY: venv run test proto proto-check lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/flowsession serve --address $(ADDRESS) --db $(DB)

# Generated code is produced only here; protoc's well-known types come from grpc_tools.
proto: $(STAMP)
	$(PY) scripts/gen_proto.py $(GEN_DIR)

proto-check: $(STAMP)
	$(PY) scripts/gen_proto.py --check $(GEN_DIR)

test: $(STAMP) proto-check
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info
