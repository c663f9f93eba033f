# `make run` and `make test` do all set-up themselves (scripts/setup.sh, idempotent).
CONFIG ?= configs/1b-synthetic.yaml
PY := .venv/bin/python

.PHONY: setup run test lint
setup:
	bash scripts/setup.sh

run: setup
	$(PY) -m harness run $(CONFIG)

test: setup
	$(PY) -m ruff check harness tests
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check harness tests
