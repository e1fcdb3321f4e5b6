# make serve  - create .venv if needed, install the project, start the service on port 3000
# make test   - same install plus dev extras, then the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 3000
export BENTOML_DO_NOT_TRACK ?= True

.PHONY: install install-dev serve test lint bench-cpu clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

serve: install
	$(VENV)/bin/bentoml serve --port $(PORT)

test: install-dev
	$(PY) -m pytest

lint: install-dev
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
