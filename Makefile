# cqil — quick start: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CQIL   := $(VENV)/bin/cqil
# The CPU wheel of torch; pyproject keeps a range so GPU users keep their own build.
TORCH_PIN ?= torch==2.13.0
DEMO_OUT ?= demo-out

.PHONY: install test test-fast demo lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(CQIL) assets fetch
	touch $@

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not integration" tests

# The whole pipeline on the default model: analyze -> convert (default budget 0.9, 3 minutes of
# tuning) -> bench against the original; 9 to 14 minutes on a 2-core CPU (docs/quality.md).
demo: install
	@mkdir -p $(DEMO_OUT)
	$(CQIL) analyze default --json $(DEMO_OUT)/analyze.json --plot $(DEMO_OUT)/similarity.png
	$(CQIL) convert default --out $(DEMO_OUT)/smol-cqil --analysis $(DEMO_OUT)/analyze.json --force
	$(CQIL) bench $(DEMO_OUT)/smol-cqil --baseline default --cqil-engine \
		--json $(DEMO_OUT)/bench.json --plot $(DEMO_OUT)/tradeoff.png
	@echo
	@echo "Results in $(DEMO_OUT)/: analyze.json + similarity.png (analyze), smol-cqil/ (the"
	@echo "converted model, manifest.json inside), bench.json + tradeoff.png (bench)."

lint: install
	$(PY) -m ruff check cqil_cli tests


clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
