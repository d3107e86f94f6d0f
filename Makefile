# radsynth: two commands do all set-up on a fresh machine.
#   make demo   the main job on the embedded default (sample export, cpu profile)
#   make test   the test suite
# Both create .venv and install what is missing; when everything is there they are no-ops
# up to the work itself.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .make
PROFILE ?= cpu
# pytest-xdist workers for `make test` (auto: one per core; 0 runs in this process)
TEST_WORKERS ?= auto
export GX_ANALYTICS_ENABLED := false
export MLFLOW_ENABLE_TELEMETRY := false
export DO_NOT_TRACK := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-fast env sysdeps data clean help

help:
	@echo "make demo   run radsynth end to end on the sample export (profile $(PROFILE))"
	@echo "make test   run the tests"
	@echo "make test-fast  the fast lane only (no servers; under a minute), for the edit-test loop"

# --- environment -----------------------------------------------------------------------
$(STAMPS)/venv: pyproject.toml requirements.lock
	@mkdir -p $(STAMPS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned environment into $(VENV) (first time: ~2-3 min)"
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" -c requirements.lock -e ".[dev]" 2>&1 \
		| grep -v '^WARNING: Location' || true
	@$(BIN)/python -c "import torch, radsynth" || { echo "environment install failed: see pip output above"; exit 1; }
	@touch $@

# System tools the tests use: Debian's chromium (browser tests), dcmtk (independent DICOM reader)
# and dicom3tools (dciodvfy, the DICOM IOD validator).
$(STAMPS)/sysdeps: Makefile
	@mkdir -p $(STAMPS)
	@missing=""; command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v dcmdump >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing system packages:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else \
			echo "missing system packages:$$missing; run: sudo apt-get install$$missing"; exit 1; \
		fi; \
	fi
	@touch $@

# The sample export, pinned by data.dvc, from the default DVC remote.
$(STAMPS)/data: data.dvc $(STAMPS)/venv
	$(BIN)/dvc pull -q data.dvc
	@touch $@

env: $(STAMPS)/venv
sysdeps: $(STAMPS)/sysdeps
data: $(STAMPS)/data

test: $(STAMPS)/venv $(STAMPS)/sysdeps $(STAMPS)/data
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The fast lane (tests/conftest.py marks tests fast or integration); CI runs everything with `make test`.
test-fast: $(STAMPS)/venv $(STAMPS)/data
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m fast

demo: $(STAMPS)/venv $(STAMPS)/data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pipelines.demo --profile $(PROFILE)

clean:
	rm -rf artifacts mlruns $(STAMPS)
