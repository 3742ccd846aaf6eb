# make demo   sets up on first use, then runs the default federated retraining simulation
# make dashboard  serves the dashboard of runs/ (the demo's runs) on http://127.0.0.1:8765/
# make browser    installs Debian's chromium and chromium-driver if missing (make test does)
# make test   sets up on first use, then runs the linters and the whole test suite (slow and e2e
#             included): the quick tier on every core (pytest-xdist), then the slow tier (the
#             deployment's tests beside the simulations), with the slowest tests printed
# make lint   ruff (lint and format) on the whole tree, mypy on the core, strategies, server, client
# make bench  sets up on first use, then runs every benchmark into one table and
#             benchmarks/results/latest.json (50-65 min on 2 cores; QUICK=1: ~2 min smoke run, BENCH_OUT=path)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedretrain-installed

.PHONY: setup demo dashboard browser lint test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: where there is no GPU this takes the local CPU wheel, so
	# nothing later pulls several GB of CUDA packages; with a GPU, PyPI's CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/fedretrain simulate experiment=demo $(ARGS)

dashboard: setup
	$(BIN)/fedretrain dashboard --runs runs $(ARGS)

# The dashboard's browser test drives Debian's chromium through Debian's chromedriver
# (tests/browser.py); installed here, from the machine's own package sources, when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then \
	  echo "make browser: installing Debian's chromium and chromium-driver (apt-get)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver >/dev/null && chromium --version; \
	fi

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy fedretrain strategies server client

# The quick tier is independent tests (tmp_path each, free ports, no fixed paths), so xdist
# spreads it over the cores. In the slow tier the deployment's tests (one SuperLink and its
# sites, in a module fixture) mostly wait on deadlines and heartbeats: they run in a process
# of their own, beside the simulations on two workers (--dist loadfile keeps a file's tests
# on one worker), and their report follows the simulations'. Either failing fails the target.
# (Started beside the quick tier instead, they slowed it by 40 s and the simulations by more:
# the machine's two cores are busy throughout, 936 s in all against 929 s.)
# Every test process computes on one thread (OMP_NUM_THREADS=1; Ray's actors already do):
# the suite runs more processes than cores, and torch's second OpenMP thread then spins
# waiting for a descheduled peer. Measured in one CI run with the default two threads: the
# quick privacy audit (benchmarks/bench_audit.py) took 117 core-s against 20-35 alone, and
# tests/test_audit.py 274 s. Code that sets its own threads (pretraining) still does.
DEPLOY_TESTS := tests/test_deploy_e2e.py
# The tests' embedded base model (tests/conftest.py) is built on first use, about 25 s on one
# core; the linters use one core too, so it is built beside them, not in a test's fixture.
BUILD_MODEL := from fedretrain.modeling.embedded import embedded_model_dir; embedded_model_dir()

test: setup
	@FEDRETRAIN_CACHE=$(CURDIR)/.cache/fedretrain $(BIN)/python -c "$(BUILD_MODEL)" & built=$$!; \
	$(MAKE) --no-print-directory browser & browsed=$$!; \
	$(MAKE) --no-print-directory lint; linted=$$?; wait $$built && wait $$browsed && test $$linted -eq 0
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -rs -n auto -m "not slow and not e2e" $(PYTEST_ARGS)
	@log=$$(mktemp); export OMP_NUM_THREADS=1; \
	$(BIN)/python -m pytest -q -rs -m "slow or e2e" --durations=10 $(PYTEST_ARGS) $(DEPLOY_TESTS) >$$log 2>&1 & deploy=$$!; \
	$(BIN)/python -m pytest -q -rs -n 2 --dist loadfile -m "slow or e2e" --ignore=$(DEPLOY_TESTS) --durations=10 $(PYTEST_ARGS); rest=$$?; \
	wait $$deploy; deployed=$$?; echo "--- $(DEPLOY_TESTS) (run beside the above) ---"; cat $$log; rm -f $$log; \
	test $$rest -eq 0 -a $$deployed -eq 0

test-fast: setup
	$(BIN)/python -m pytest -q -n auto -m "not slow and not e2e" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/bench_suite.py $(if $(QUICK),--quick) $(if $(BENCH_OUT),--out $(BENCH_OUT))

clean:
	rm -rf $(VENV) .cache .pytest_cache runs
