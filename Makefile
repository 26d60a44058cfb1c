# SE ablation runner. `make ablation-ratio` runs the main job; `make test` runs the tests.
# Every target installs first, so each works as the very first command on a fresh machine.
# PYTHON=/path/to/python uses an existing environment (e.g. a GPU box with torch preinstalled).

PROFILE ?= quick
SEEDS   ?= 3
WORKERS ?= 2   # trials in parallel: quick trains on 1 torch thread, so 2 fill 2 cores
DEVICES ?=
STORAGE ?=
RESULTS ?= results
PRECISION ?=   # top-1 points: add seeds in rounds until every row's minimum detectable effect is this
MAX_SEEDS ?=   # with PRECISION: the most seeds per setting (ablate's default: 20)
PORT    ?= 8080
PYTEST_ARGS ?=
TEST_WORKERS ?= 2   # pytest-xdist processes for `make test` (1: one process, no xdist)

ifdef PYTHON
PY := $(PYTHON)
STAMP := .stamp-system
else
PY := .venv/bin/python
STAMP := .venv/.installed
endif

ABLATE = $(PY) -m ablations
RUN_OPTS = --profile $(PROFILE) --seeds $(SEEDS) --workers $(WORKERS) --results-dir $(RESULTS) \
	$(if $(DEVICES),--devices $(DEVICES)) $(if $(STORAGE),--storage $(STORAGE)) \
	$(if $(PRECISION),--precision $(PRECISION)) $(if $(MAX_SEEDS),--max-seeds $(MAX_SEEDS))
AXES = ratio squeeze excitation stages integration se3x3 nosqueeze
BEYOND = attention families   # other attention modules, other timm families (not in `make ablations`)

.PHONY: install test lint ablations $(addprefix ablation-,$(AXES) $(BEYOND)) dashboard status tables figures \
	notebooks report bench gpu-check clean

install: $(STAMP)

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install --upgrade pip
	.venv/bin/pip install -e '.[dev,scale,tensorboard]'
	touch $@

# An existing interpreter: install the project without touching its packages (no registry needed).
.stamp-system: pyproject.toml
	$(PY) -m pip install --no-deps --no-build-isolation -e . || echo "(using the source tree via PYTHONPATH)"
	touch $@

export PYTHONPATH := $(CURDIR)

test: install
	$(PY) -m pytest -q $$($(PY) -c 'import xdist' 2>/dev/null && [ $(TEST_WORKERS) -gt 1 ] && echo '-n $(TEST_WORKERS)') $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .

$(addprefix ablation-,$(AXES) $(BEYOND)): ablation-%: install
	$(ABLATE) run $* $(RUN_OPTS)

ablations: install
	$(ABLATE) run $(AXES) $(RUN_OPTS)

status: install
	$(ABLATE) status --results-dir $(RESULTS) $(if $(STORAGE),--storage $(STORAGE))

dashboard: install
	$(ABLATE) dashboard --results-dir $(RESULTS) --port $(PORT) $(if $(STORAGE),--storage $(STORAGE))

tables figures report: install
	$(ABLATE) $@ --profile $(PROFILE) --results-dir $(RESULTS) $(if $(STORAGE),--storage $(STORAGE))

notebooks: install
	$(ABLATE) notebooks --profile $(PROFILE) --results-dir $(RESULTS) $(if $(STORAGE),--storage $(STORAGE))

bench: install
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/render_benchmarks.py

# Under 10 minutes on one GPU; then its section of BENCHMARKS.md. Without a GPU: one line, exit 0.
GPU_CHECK_OUT ?= benchmarks/gpu_check.json
gpu-check: install
	$(PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf .venv .stamp-system *.egg-info .pytest_cache
