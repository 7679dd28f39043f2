# The two commands: `make run` starts the relay, `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= conf/openai_model.yaml
PORT ?= 8000
PYTEST_ARGS ?=
DURATION ?=
REPEATS ?=
BENCH_ARGS ?=

.PHONY: install run test unit test-latest test-nemo-gym bench bench-quick soak clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

# With env.yaml: relay to the upstream it names. Without: local mode (a bundled fake upstream).
run: $(STAMP)
	@if [ -f env.yaml ]; then \
		exec $(VENV)/bin/relay serve --config $(CONFIG) --port $(PORT); \
	else \
		exec $(VENV)/bin/relay serve --local --config $(CONFIG) --port $(PORT); \
	fi

# The cluster tests start a real redis-server (Debian's package), installed here when missing.
test: $(STAMP)
	command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server)
	$(PY) -m pytest $(PYTEST_ARGS)

# The pure-logic tests alone, in a few seconds (no processes, no sockets but loopback in-process ones).
unit: $(STAMP)
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

# The whole suite against the newest release of every dependency, pins ignored, in a throwaway venv:
# taking a new version is this command, then moving its pin in pyproject.toml. tests/unit/test_seams.py
# names what a new release broke inside relay/seams/.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet --upgrade starlette 'uvicorn[standard]' aiohttp prometheus-client \
		multidict yarl httptools orjson pyyaml pytest trustme openai redis matplotlib
	$(LATEST)/bin/python -m pip install --quiet --no-deps -e .
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -i -E '^(starlette|uvicorn|aiohttp|prometheus.client) '
	$(LATEST)/bin/python -m pytest $(PYTEST_ARGS); status=$$?; rm -rf $(LATEST); exit $$status

# A real NeMo Gym run (minutes; the first run installs nemo-gym 0.7.0 and Ray, about 1.4 GB, into its own
# venv): `relay nemo-gym install` into a scratch Gym root, ng_run with the mcqa resources server, the simple
# agent and relay_model in front of the fake upstream, ng_collect_rollouts, checks of the rollouts and of
# the capture files with Gym's own reader; then the same with Gym's openai_model, both timed. Gym wants
# Python >= 3.13.14; this machine's newest is 3.13.0, hence --ignore-requires-python.
GYM_PYTHON ?= /root/.pyenv/versions/3.13.0/bin/python3.13
GYM_VENV := .venv-nemo-gym
GYM_STAMP := $(GYM_VENV)/.installed
GYM_ARGS ?=

$(GYM_STAMP): pyproject.toml
	$(GYM_PYTHON) -m venv $(GYM_VENV)
	$(GYM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GYM_VENV)/bin/python -m pip install --quiet --ignore-requires-python nemo-gym==0.7.0 -e .
	touch $@

test-nemo-gym: $(GYM_STAMP)
	$(GYM_VENV)/bin/python -m tests.nemo_gym_e2e $(GYM_ARGS)

# About three minutes, no network, no credentials: what the relay costs over talking to the upstream
# directly. Longer: make bench DURATION=5 REPEATS=7. Figures and a plot land in bench/results/.
bench: $(STAMP)
	$(PY) -m bench.run $(if $(DURATION),--duration $(DURATION)) $(if $(REPEATS),--repeats $(REPEATS)) $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) -m bench.run --quick $(BENCH_ARGS)

# Two minutes at high load with 10% upstream faults: RSS, open files and in-flight gauge must come back.
soak: $(STAMP)
	SOAK_SECONDS=120 $(PY) -m pytest -s tests/test_soak.py

clean:
	rm -rf $(VENV) $(LATEST) $(GYM_VENV) build *.egg-info .pytest_cache
