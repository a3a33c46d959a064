# The README's two commands: `make train` and `make test`. Both bootstrap .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmjax-installed
TEST_XLA_FLAGS := --xla_force_host_platform_device_count=8
# pytest-xdist workers; each test file runs whole on one worker (module fixtures once).
TEST_WORKERS ?= 2

.PHONY: train test venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m mmjax.main --config=configs/default.py --workdir=runs/default

test: $(STAMP)
	XLA_FLAGS=$(TEST_XLA_FLAGS) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30 tests

clean:
	rm -rf runs
