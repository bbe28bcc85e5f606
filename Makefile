VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/condense-pipeline

.PHONY: demo test test-cluster lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(CLI) run digits --ipc 10 --out runs/demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check condense_pipeline tests benchmarks
	$(VENV)/bin/ruff format --check condense_pipeline tests benchmarks
	$(PY) -m pytest -q

test-cluster: $(VENV)/.installed
	$(PY) -m pytest -q -m cluster

clean:
	rm -rf $(VENV) runs
