# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch is installed first, pinned, and only when missing: an unpinned torch would pull a
# multi-GB CUDA build where a CPU wheel is wanted.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install lint test test-all demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The linter the project names (pyproject.toml [tool.ruff]): syntax errors, pyflakes,
# bugbear and the 120-character line length.
lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

test: lint
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "" 

demo: $(STAMP)
	$(VENV)/bin/dpg demo

clean:
	rm -rf $(VENV) runs .pytest_cache
