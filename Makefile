# Two commands do everything: `make run` (the whole pipeline) and `make test`.
# Both create .venv and install the pinned lock when needed.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Python 3.11 (the lock is resolved for it).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# DVC stage commands (`python -m flows ...`) and Prefect workers must find the venv's interpreter.
export PATH := $(CURDIR)/$(BIN):$(PATH)

DATASET ?= k49
# DATASET=local: a folder of official-format files; its prefix is detected from *_classmap.csv.
LOCAL_DIR ?=
# Empty: `make run` picks quick for DATASET=synthetic, else full with a usable GPU and cpu without one
# (python -m launcher choose-profile says which and why). PROFILE=full|cpu|quick always wins.
PROFILE ?=
# The one local Prefect server of `make run` (when PREFECT_API_URL is not set), on 127.0.0.1.
PREFECT_PORT ?= 4200
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (auto: one per core); each test module runs whole on one worker.
TEST_WORKERS ?= auto
HOST ?= 127.0.0.1
POOL ?= kuzushiji-process
WORKERS ?= 1
PORT ?= 3000

.PHONY: help venv run test lint lock exp-show mlflow-ui prefect-ui prefect-stop prefect-server worker deploy tune serve bento container

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { \
	  echo "make: $(PYTHON) is not Python 3.11; run e.g. make $(MAKECMDGOALS) PYTHON=/path/to/python3.11"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

venv: $(STAMP) ## create .venv and install the pinned lock

# One Prefect API for every stage of the run: PREFECT_API_URL if set, else the server on PREFECT_PORT
# (started here if none answers, and left running for its UI). The `pipeline` flow then runs
# `dvc exp run` (its flow run the parent of every stage's) and ends with a short summary instead of the
# all-columns `dvc metrics show`.
run: $(STAMP) ## the whole pipeline (DATASET=k49|kmnist|synthetic|local [LOCAL_DIR=..], PROFILE=full|cpu|quick)
	@set -euo pipefail; \
	profile=$$($(BIN)/python -m launcher choose-profile --dataset "$(DATASET)" --profile "$(PROFILE)"); \
	api=$$($(BIN)/python -m launcher server start --port $(PREFECT_PORT)); \
	set -x; \
	PREFECT_API_URL="$$api" $(BIN)/python -m flows flow pipeline --dataset $(DATASET) --profile $$profile \
	  $(if $(LOCAL_DIR),--set data.local_dir=$(LOCAL_DIR))

test: $(STAMP) ## the test suite, slow end-to-end tests included
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP) ## style and types: ruff (bugbear, simplify, imports, pyupgrade, ...) and mypy (pipeline, flows, service)
	$(BIN)/ruff check .
	$(BIN)/mypy

lock: ## re-pin requirements.lock from the current .venv
	{ echo "# Pinned lock of the full stack (Python 3.11, x86_64). Regenerate: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^-e'; } > requirements.lock

# The columns of `dvc exp show` that matter (regexes over column names; --keep wins over --drop).
EXP_SHOW_KEEP ?= Experiment|Created|test_balanced_accuracy|test_accuracy|profile|data\.dataset|train\.lr|train\.epochs|train\.batch_size

exp-show: $(STAMP) ## the DVC experiments side by side, only the columns that matter (EXP_SHOW_KEEP=regex|...)
	$(BIN)/dvc exp show --only-changed --drop '.*' --keep '$(EXP_SHOW_KEEP)' --no-pager

mlflow-ui: $(STAMP) ## MLflow UI on the embedded store (http://127.0.0.1:5000; prints the experiment's page)
	@echo "MLflow UI: open $$($(BIN)/python -m launcher summary --mlflow-url)  (the training view)"
	$(BIN)/mlflow ui --workers 1 --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/stores/mlflow/mlflow.db}" \
	  --host 127.0.0.1 --port 5000

prefect-ui: $(STAMP) ## start (if needed) the project's Prefect server in the background and print its UI address
	@api=$$($(BIN)/python -m launcher server start --port $(PREFECT_PORT)) && \
	  echo "Prefect UI: $${api%/api}   (in other shells: export PREFECT_API_URL=$$api)"

prefect-stop: $(STAMP) ## stop the Prefect server that make run / make prefect-ui started
	@$(BIN)/python -m launcher server stop

prefect-server: $(STAMP) ## Prefect server + UI in the foreground (Ctrl-C stops it); same port as make run
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

worker: $(STAMP) ## create the process work pool and run a worker for the deployments (keep it running)
	$(BIN)/prefect work-pool create $(POOL) --type process --overwrite
	$(BIN)/prefect worker start --pool $(POOL)

deploy: $(STAMP) ## register the deployments of prefect.yaml
	$(BIN)/prefect --no-prompt deploy --all

tune: $(STAMP) ## add trials to the current study with WORKERS processes (one shared journal/RDB study)
	$(BIN)/python -m pipeline.stages.tune --workers $(WORKERS)

serve: $(STAMP) ## serve the champion model with BentoML (http://$(HOST):$(PORT))
	$(BIN)/bentoml serve service:Kuzushiji --host $(HOST) --port $(PORT)

bento: $(STAMP) ## build the bento (service + champion model + serving deps only)
	$(BIN)/bentoml build

CONTAINER_ARGS ?=
container: $(STAMP) ## build the serving image (bentoml containerize), run it, check real answers
	scripts/container_smoke.sh $(CONTAINER_ARGS)

# The shared-services stack of compose.yaml (README, "Scale-out"). podman-compose (pinned in the lock)
# where podman is installed, else Docker's compose plugin; COMPOSE="docker compose" picks one.
COMPOSE ?= $(if $(shell command -v podman),$(BIN)/podman-compose,docker compose)
COMPOSE_PROJECT ?= kuzushiji
SERVICE_IMAGE ?= kuzushiji:latest
.PHONY: stack-up stack-down stack-deploy stack-serve

stack-up: $(STAMP) ## build the pipeline image; start PostgreSQL, MLflow and Prefect servers and a worker
	KUZUSHIJI_PROJECT_DIR=$(CURDIR) $(COMPOSE) -p $(COMPOSE_PROJECT) up -d --build

stack-down: ## stop the stack (named volumes keep the data)
	$(COMPOSE) -p $(COMPOSE_PROJECT) --profile serve down

stack-deploy: $(STAMP) ## register prefect.yaml's deployments with the stack's Prefect server
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:4200/api} $(BIN)/prefect --no-prompt deploy --all

stack-serve: $(STAMP) ## containerize the champion's bento as SERVICE_IMAGE and serve it in the stack
	$(BIN)/bentoml build
	$(BIN)/bentoml containerize kuzushiji:latest --image-tag $(SERVICE_IMAGE) \
	  $(if $(shell command -v podman),--backend podman)
	KUZUSHIJI_SERVICE_IMAGE=$(SERVICE_IMAGE) $(COMPOSE) -p $(COMPOSE_PROJECT) --profile serve up -d service

# The GPU check (benchmarks/gpu_check.sh, benchmarks/GPU.md) on the lent GPU machine, whose image has no pydantic
# and cannot install from a registry: the wheels and the data travel in these ignored folders (`carry`).
DEVICE_WHEELS := .whl
DEVICE_DATA := .device/kmnist-60k
SHARED_DATA ?= $(abspath $(CURDIR)/../shared/data)
DEVICE_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
.PHONY: device-wheels device-data device-dry-run

device-wheels: $(STAMP) ## fetch the GPU check's wheels (benchmarks/device_wheels.txt, Python 3.12) into .whl/
	rm -rf $(DEVICE_WHEELS) && mkdir -p $(DEVICE_WHEELS)
	$(BIN)/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(foreach p,$(DEVICE_PLATFORMS),--platform $(p)) -d $(DEVICE_WHEELS) \
	  $$(sed -e 's/#.*//' benchmarks/device_wheels.txt)
	@ls $(DEVICE_WHEELS)

device-data: $(STAMP) ## download + prepare ../shared/data/kmnist-60k for the GPU check into .device/ (~20 MB)
	$(BIN)/python -m benchmarks.device_check prepare --source $(SHARED_DATA)/kmnist-60k --dest $(DEVICE_DATA)
	@du -sh $(DEVICE_DATA)

$(DEVICE_DATA)/params.yaml:
	$(MAKE) device-data

device-dry-run: $(STAMP) $(DEVICE_DATA)/params.yaml ## the GPU check on the CPU, tiny, imports as on the GPU image
	PYTHON=$(BIN)/python DEVICE_DATA=$(DEVICE_DATA) bash benchmarks/gpu_check.sh --dry-run $${OUT:-/tmp/device-dry-run}
