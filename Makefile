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

serve: $(STAMP) model
	@echo "meshserve: starting Ray Serve with serve_config.yaml; when it says ready, the OpenAI endpoint is"
	@echo "  http://localhost:8000/v1   e.g.:"
	@echo "  curl http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"model\": \"SmolLM2-135M-Instruct\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'"
	$(BIN)/serve run serve_config.yaml

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
