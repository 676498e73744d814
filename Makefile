# Two commands set everything up on a fresh machine:
#   make demo   install, then serve the default model (../shared/models/stories260K) and
#               answer requests through the OpenAI API
#   make test   install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml setup.py $(wildcard strata/model/csrc/*.cpp strata/model/csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0 'setuptools>=68' ninja
	# builds the C++ kernels for this CPU (setup.py), with the torch above
	$(BIN)/pip install -q --no-build-isolation -e '.[dev,nixl,gateway]'
	$(BIN)/pip install -q --no-deps nixl==1.5.1
	touch $@

install: $(VENV)/.installed

# Debian's Chromium, for the dashboard's browser test (tests/test_dashboard_browser.py)
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

demo: install
	BIN=$(BIN) scripts/demo.sh

test: install browser
	$(BIN)/pytest -q --durations=20

lint: install
	$(BIN)/ruff check strata tests benchmarks

.PHONY: install browser demo test lint
