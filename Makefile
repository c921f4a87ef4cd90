# vloop's stable commands (DESIGN.md): setup, test, demo, up, down.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
LS_VENV := .venv-labelstudio
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
LS_STAMP := $(LS_VENV)/.setup-stamp
export VLOOP_HOME ?= $(CURDIR)/var

.PHONY: setup test demo up down constraints bench-quick clean

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

## test: the whole suite (.ci/run calls this)
test: setup
	$(PY) -m pytest

## demo: the main job on embedded defaults (a local lake under ./var)
demo: $(STAMP)
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
