# Two entry points, each sets itself up:  `make demo` (the main job: `loralab train` on its bundled default)
# and `make test` (the whole suite; it installs Debian's chromium for the browser tests when it is missing).
# A fresh machine gets a .venv; torch==2.13.0 (a CPU wheel) is installed only when no torch is present,
# so a CUDA torch you already have (e.g. `make VENV=/path/to/your/env`) is kept.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo tour test bench install install-test chromium clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e ".[hf,plot]"
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The browser tests drive Debian's chromium through Playwright (never a browser download of its own).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 || { echo "no chromium on PATH and no apt-get: install Chromium" \
	    "so that \`chromium\` runs it, then rerun make test" >&2; exit 1; }; \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=; else sudo=sudo; fi; \
	  echo "installing Debian's chromium for the browser tests" >&2; \
	  $$sudo apt-get update -q && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }

demo: $(VENV)/.installed
	$(VENV)/bin/loralab train --overwrite   # a rerun replaces its own runs/train

tour: $(VENV)/.installed
	$(VENV)/bin/loralab demo

test: $(VENV)/.installed-test chromium
	$(PY) -m pytest

bench: $(VENV)/.installed-test
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
