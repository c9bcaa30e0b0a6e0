# The two commands: `make demo` (the main job, end to end on a local broker) and `make test`.
# Everything they need is installed here: the venv, Python packages, the Kafka jars (and Java/Maven via
# apt-get when missing, from calmrun.devkafka).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: install kafka demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

kafka: install
	$(PY) -m calmrun.devkafka fetch

demo: kafka
	$(PY) -m calmrun.demo

test: kafka
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check calmrun tests $(wildcard bench)
	$(VENV)/bin/ruff format --check calmrun tests $(wildcard bench)
	$(VENV)/bin/mypy

bench: kafka
	$(PY) -m bench

clean:
	rm -rf $(VENV) .calmrun build dist *.egg-info
