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

.PHONY: install run test bench bench-quick soak clean

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
		exec $(PY) -m bench.local --config $(CONFIG) --port $(PORT); \
	fi

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

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
	rm -rf $(VENV) build *.egg-info .pytest_cache
