# EdgeOps: the two commands a new user needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# test files are spread over this many worker processes (pytest-xdist), each file on one
# worker (its module fixtures built once); each worker builds the session's models itself
PYTEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help install demo test services lint typecheck pytest coverage bench hil clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "EdgeOps needs Python >= 3.11 ($(PYTHON) is older)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
# --no-compile: Python compiles a module to bytecode when it is first imported (unless
# PYTHONDONTWRITEBYTECODE is set: see pytest below); pip would compile all ~17,000 modules of
# the extras (TensorFlow, Ray ...) up front, most never used
	$(BIN)/python -m pip install --quiet --progress-bar off --no-compile -e '.[all,dev]'
	touch $@

install: $(STAMP)  ## create .venv and install EdgeOps with every extra

demo: install  ## run the demo: embedded broker, hub and 3 agents (EDGEOPS_DEMO_HEADLESS=1 ends by itself)
	$(BIN)/edgeops demo --devices 3

services:  ## install and start what the tests need (Mosquitto, PostgreSQL; apt-get as root)
	bash scripts/test-services.sh

lint: install  ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install  ## mypy, strict
	$(BIN)/mypy

pytest: install services
# bytecode is cached for the test run even where PYTHONDONTWRITEBYTECODE=1 (container
# images often set it): without it every process compiles TensorFlow again (~11 s instead of
# ~4.5 s), and the tests start hundreds of CLI and agent processes. The cache lives in the venv.
	PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX=$(abspath $(VENV))/pycache \
		$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

# coverage traces every process the tests start (the CLI, agents, workers: patch =
# subprocess in pyproject.toml), which makes the run about 1.5 times as long: not in `make test`
coverage: install services  ## the test suite with line coverage of every process it starts
	PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX=$(abspath $(VENV))/pycache \
		$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile --cov --cov-report=term --durations=15 \
		$(PYTEST_ARGS)

test: install services lint typecheck pytest  ## everything CI runs; ends with pytest's summary

bench: install services  ## benchmarks; results in bench/results/
	$(BIN)/python bench/mqtt_qos1.py --ablation
	$(BIN)/python bench/update.py
	$(BIN)/python bench/firmware.py
	$(BIN)/python bench/api.py

# the rig's chaos plan: 20 device agents in network namespaces (root), one rollout under
# seeded faults; not in `make test` (docs/hil.md)
hil: install services  ## HIL chaos plan: 20 agents, faults during a rollout; reports in build/hil/chaos
	PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX=$(abspath $(VENV))/pycache \
		$(BIN)/edgeops-hil run chaos --report build/hil/chaos

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.* build *.egg-info
