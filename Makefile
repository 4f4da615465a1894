# Two commands for a new user: `make demo` and `make test`; `make editor` starts the pose editor.
# Each creates .venv from requirements.txt first when it is missing (Python 3.11; see README).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo editor test bench clean-venv

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) demo/demo.py $(ARGS)

editor: setup
	$(PY) demo/editor.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

bench: setup
	$(PY) main/bench.py decode

clean-venv:
	rm -rf $(VENV)
