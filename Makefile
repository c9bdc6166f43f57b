# Two entry points, each doing its whole set-up: `make demo` (main job on the bundled mesh) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[fast,plots,test,app]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/sparseflex fit examples/demo.obj -o out/demo --resolution 128 --iterations 150 --overwrite

test: $(VENV)/.installed
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/extraction.py

.PHONY: install demo test bench
