# meshserve: `make serve` serves the embedded model, `make test` runs the suite. Both set up .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test serve model clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

model: $(STAMP)
	$(BIN)/python -m model.embedded

test: $(STAMP) model
	$(BIN)/python -m pytest -q tests

serve: $(STAMP)
	@echo "meshserve: serving is not built yet (it lands with the Ray Serve application issue)." >&2
	@exit 1

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
