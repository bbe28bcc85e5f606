VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/condense-pipeline

.PHONY: demo test test-cluster lint clean chromium

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(CLI) run digits --ipc 10 --out runs/demo

# The report's browser test needs chromium: Debian's package, installed when missing (as root, or
# with sudo); where it cannot be installed, that test skips and says so.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium) || \
	    echo "chromium could not be installed: the report's browser test will skip"; }

test: $(VENV)/.installed chromium
	$(VENV)/bin/ruff check condense_pipeline tests benchmarks examples
	$(VENV)/bin/ruff format --check condense_pipeline tests benchmarks examples
	$(PY) -m pytest -q --durations=15

test-cluster: $(VENV)/.installed
	$(PY) -m pytest -q -m cluster

clean:
	rm -rf $(VENV) runs
