# The two README commands: `make quickstart` (main job) and `make test` (test suite).
# Both build the virtual environment at .venv/ first if it is missing or stale.
PY := .venv/bin/python
PYTEST_ARGS ?=
QUICKSTART_ARGS ?=

.PHONY: venv test test-slow test-all quickstart data clean-venv

venv:
	@bash tools/setup_env.sh

test: venv
	@export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}; \
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: venv
	@export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}; \
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: venv
	@export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}; \
	$(PY) -m pytest -q $(PYTEST_ARGS)

data: venv
	$(PY) tools/make_synthetic_data.py --root data/synthetic

# QUICKSTART_ARGS: options of tools/quickstart.py, e.g. QUICKSTART_ARGS=--resume after a run was cut short
quickstart: venv
	bash tools/quickstart.sh $(QUICKSTART_ARGS)

clean-venv:
	rm -rf .venv
