# The two commands of the README. Each creates .venv when it is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'

demo: install
	$(BIN)/onestep-lm run --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: install-test
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
