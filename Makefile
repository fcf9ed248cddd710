# Quick start:  make serve   (set up .venv, pull weights, start on 127.0.0.1:8000)
#               make test    (same set-up, then lint, type-check and the whole test suite)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# pymatting (imported by rembg) compiles numba kernels on first import: cache them once.
export NUMBA_CACHE_DIR := $(CURDIR)/$(VENV)/numba-cache
export HF_HUB_OFFLINE := 1

.PHONY: setup weights browser serve test lint bench clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "imgsvc needs Python >= 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

weights: setup
	$(PY) -m imgsvc weights pull

serve: weights
	$(PY) -m imgsvc serve --dev-key

lint: setup
	$(VENV)/bin/ruff check imgsvc tests bench examples
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff format --check imgsvc tests bench examples
	$(VENV)/bin/mypy

# The browser test drives Debian's Chromium (no browser download), installed once.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

test: weights lint browser
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
