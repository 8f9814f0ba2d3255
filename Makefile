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

# buf (lint + breaking checks of the contract) comes from the npm registry, so `make lint` needs npm;
# `make run` and `make test` need only python3 and make.
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
# Every change must stay compatible with the contract as first committed: flowsession.v1 never breaks.
BUF_AGAINST ?= .git\#ref=$$(git rev-list --max-parents=0 HEAD | tail -n 1),subdir=protos

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

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

lint: $(STAMP) $(BUF)
	cd protos && ../$(BUF) lint
	cd protos && ../$(BUF) breaking --against "../$(BUF_AGAINST)"
	$(VENV)/bin/ruff check .

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

# Not part of `make test`: about 12-14 minutes; writes bench/results/<date>.json, .png and latest.md.
bench: $(BENCH_STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .tools build *.egg-info
