# `make demo`, `make test` (the whole suite), `make test-fast` (the suite without the tests marked slow),
# `make lint` (ruff, ruff format, mypy), `make docs` (the mkdocs site, --strict, into site/), `make methods-table`
# and `make compat` (regenerate docs/methods.md and docs/compatibility.md), `make screenshots` (rewrite
# docs/screenshots/ from the browser tests) and `make bench`.
# Each builds .venv from nothing when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.camkit-installed

.PHONY: demo test test-fast lint bench compat docs methods-table clean screenshots

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,reference]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/camkit explain --out out/
	@echo "Overlay written under out/ (open out/chelsea_gradcam.png)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)   # without the tests marked slow and without the model-family matrix (make test runs both)
	$(BIN)/python -m pytest -q -m "not slow" --ignore=tests/adapters/test_families.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools
	$(BIN)/mypy

docs: $(STAMP)   # build the documentation site into site/ (gitignored); fails on any warning
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site -f mkdocs.yml

methods-table: $(STAMP)   # regenerate docs/methods.md from the method registry
	$(BIN)/python tools/methods_table.py

compat: $(STAMP)   # regenerate docs/compatibility.md from the model-family test matrix
	$(BIN)/python tools/compat_table.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_gradient.py

clean:
	rm -rf $(VENV) out build site *.egg-info src/*.egg-info .pytest_cache

screenshots: $(STAMP)   # rewrite docs/screenshots/ from the browser tests (tests never write into the repository otherwise)
	CAMKIT_UPDATE_SCREENSHOTS=1 $(BIN)/python -m pytest -q tests/report/test_report_screenshots.py tests/app/test_app.py
