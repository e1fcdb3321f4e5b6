# make serve  - create .venv if needed, install the project, start the service on port 3000
# make test   - same install plus dev extras, then the whole test suite
# make test-quick - the in-process tests only (no server started): the request path, images, settings, manifests
# make bento / bento-cpu - build the GPU (default) or CPU bento, offline
# make test-container    - podman: build the CPU image on a local Debian base and run it --network none (root;
#                          downloads ~1 GB, about 17 min the first time; not in CI)
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 3000
# Loopback unless asked: `make serve` starts with auth off. HOST=0.0.0.0 to serve other machines (set
# SIGLIP_API_TOKEN then); the container and the Kubernetes manifests listen on all interfaces themselves.
HOST ?= 127.0.0.1
export BENTOML_DO_NOT_TRACK ?= True

.PHONY: install install-dev serve test test-quick lint bench-cpu clean bento bento-cpu test-container

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
	$(VENV)/bin/bentoml serve --host $(HOST) --port $(PORT)

test: install-dev
	$(PY) -m pytest

# No `bentoml serve`, no Ray, no browser: what a change to the request path or the model layer breaks first.
QUICK_TESTS = tests/test_requests.py tests/test_images.py tests/test_preprocessing.py tests/test_settings.py \
	tests/test_coalesce.py tests/test_textcache.py tests/test_fetch_policy.py tests/test_process_pieces.py \
	tests/test_checkpoints.py tests/test_graphs.py tests/test_device_decode.py
test-quick: install-dev
	$(PY) -m pytest -q $(QUICK_TESTS)

bento: install-dev
	$(VENV)/bin/bentoml build

bento-cpu: install-dev
	SIGLIP_IMAGE=cpu $(VENV)/bin/bentoml build

test-container: install-dev
	tests/container/test_container.sh

lint: install-dev
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
