# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The trainer's torch. Pinned so that pip never resolves a bare `torch` to several GB of CUDA
# wheels on a machine that only needs the CPU build; override for your platform.
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev,trainer,plot]'
	touch $@

.PHONY: install test demo lint bench
install: $(VENV)/.installed

test: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest

demo: $(VENV)/.installed
	$(VENV)/bin/fanout demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench

bench: $(VENV)/.installed
	$(PY) bench/bench_fanout.py --markdown
