# One-command set-up: `make demo` and `make test` both create .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: the CPU wheel on disk. A bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash tools/demo.sh

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q --durations=40

# ruff with the rules in pyproject.toml ([tool.ruff]); `$(BIN)/ruff check --fix .` fixes most of what it reports.
lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs demo_out
