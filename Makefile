# Compression Workbench. `make lab` opens the notebooks, `make test` runs every test, `make lint` checks
# style, import layering and the docs.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=
# `make app` serves NOTEBOOK as a web app (Voila, safe settings); APP_ARGS e.g. "--port 8900 --public".
NOTEBOOK ?= notebooks/01_quickstart.ipynb
APP_ARGS ?=
# Extra `jupyter lab` options, e.g. make lab LAB_ARGS="--port=8899 --ServerApp.token=secret".
LAB_ARGS ?=

# As root (containers, CI) Jupyter refuses to start without --allow-root. Without a browser to open
# (CI set, or Linux without an X/Wayland display) it only prints the URL.
CI_SET    := $(filter-out false 0,$(CI))
NO_SCREEN := $(and $(filter Linux,$(shell uname -s)),$(if $(DISPLAY)$(WAYLAND_DISPLAY),,yes))
LAB_FLAGS := $(if $(filter 0,$(shell id -u)),--allow-root,) $(if $(CI_SET)$(NO_SCREEN),--no-browser,)

.PHONY: lab app test lint test-package test-notebooks report bench venv clean

venv: $(STAMP)

# Re-install only when the dependency files change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[all]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

lab: $(STAMP)
	$(PY) -m jupyter lab notebooks/01_quickstart.ipynb $(LAB_FLAGS) $(LAB_ARGS)

app: $(STAMP)
	$(PY) -m workbench app $(NOTEBOOK) $(APP_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests
	$(PY) -m pytest -q --nbval-lax notebooks/

lint: $(STAMP)
	$(VENV)/bin/ruff check workbench tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mkdocs build --strict -d "$$(mktemp -d)"

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
