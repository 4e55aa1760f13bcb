# Two entry points that must work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo
PYTEST_ARGS ?=
# The suite runs on two pytest-xdist workers: its tests are mostly single-threaded XLA compiles, so
# two share CI's two cores (11 → 8 minutes measured on them). PYTEST_WORKERS=0 runs it in-process.
PYTEST_WORKERS ?= 2
DEMO_FLAGS ?=  # extra flags for the demo run, e.g. DEMO_FLAGS=--config.total_steps=100

.PHONY: demo test test-slow benchmark lock clean

# The venv is rebuilt whenever pyproject.toml or requirements.lock changes (the stamp file records
# the last install). pyproject.toml has compatible ranges; the lock fixes the exact tested set.
$(VENV): $(VENV)/.installed
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[test]'
	touch $@

demo: $(VENV)
	$(BIN)/python -m glip_jax.main --config=configs/demo.py --workdir=$(WORKDIR) $(DEMO_FLAGS)

test: $(VENV)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

test-slow: $(VENV)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

benchmark: $(VENV)
	$(BIN)/python tools/benchmark.py --config=configs/demo.py

# The papers' masking claims on the synthetic scenes: every strategy, three ratios, three seeds →
# docs/experiments.md (90 min measured on an idle 2-core CPU; finished runs in runs/reproduce are
# skipped; REPRODUCE_FLAGS=--deadline_min=60 stops starting runs after an hour, by which the
# priority order has run CLIP/FLIP/GLIP at 0.5 and 0.918, A-CLIP and the uncentred rows).
REPRODUCE_FLAGS ?=  # e.g. REPRODUCE_FLAGS=--quick (1 seed, CLIP and GLIP 50%) or --seeds=5
.PHONY: reproduce
reproduce: $(VENV)
	$(BIN)/python tools/reproduce.py $(REPRODUCE_FLAGS)

# After a tested upgrade in .venv: write its exact set (comment header kept) to requirements.lock.
lock: $(VENV)
	{ grep '^#' requirements.lock; $(BIN)/python -m pip freeze --exclude-editable \
	  | grep -viE '^(pip|setuptools)=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) runs *.egg-info
