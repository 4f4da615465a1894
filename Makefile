# Two commands for a new user: `make demo` and `make test`. Each creates .venv from
# requirements.txt first when it is missing (Python 3.11; see README).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench clean-venv

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) demo/demo.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

bench: setup
	$(PY) main/bench.py decode

clean-venv:
	rm -rf $(VENV)
