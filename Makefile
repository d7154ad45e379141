# Compression Workbench. `make lab` opens the notebooks, `make test` runs every test.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: lab test test-package test-notebooks report bench venv clean

venv: $(STAMP)

# Re-install only when the dependency files change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[test]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

lab: $(STAMP)
	$(PY) -m jupyter lab notebooks/01_quickstart.ipynb $(if $(CI),--no-browser,)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests
	$(PY) -m pytest -q --nbval-lax notebooks/

test-package: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

test-notebooks: $(STAMP)
	$(PY) -m pytest -q --nbval-lax notebooks/

report: $(STAMP)
	$(PY) -m workbench report digits-mlp --out report

bench: $(STAMP)
	$(PY) -m workbench bench latency digits-mlp --json

clean:
	rm -rf $(VENV) .pytest_cache
