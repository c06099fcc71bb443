# `make demo` and `make test` each create .venv, install the project into it, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test test-scale bench venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/rdu run --platform sn40l-node --model llama-2-7b --experts 150 --workload trace --limit 2000 \
		--policy lru --out runs/demo --force --dashboard

test: $(STAMP)
	$(BIN)/python tests/leftovers.py snapshot .pytest_cache/ray-before
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m cluster tests/cluster
	$(BIN)/python tests/leftovers.py check .pytest_cache/ray-before

test-scale: $(STAMP)
	$(BIN)/python -m pytest -q -m scale
	HYPOTHESIS_PROFILE=scale $(BIN)/python -m pytest -q tests/test_fuzz.py $(wildcard tests/test_fuzz_more.py)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# BENCH_ARGS: e.g. "--only plane"; exits 1 when a target is missed (see bench/run.py).
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)
