# Two commands for a new user: `make demo` and `make test`; `make editor` starts the pose editor.
# Each creates .venv from requirements.txt first when it is missing (Python 3.11; see README).
# `make test-anytorch` runs the suite in a second environment, .venv-anytorch: another torch
# (ANYTORCH_TORCH, ANYTORCH_VISION) with requirements-any-torch.txt and no PyTorch3D.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
ANYTORCH_VENV := .venv-anytorch
ANYTORCH_PY := $(ANYTORCH_VENV)/bin/python
ANYTORCH_TORCH ?= torch==2.11.0
ANYTORCH_VISION ?= torchvision==0.26.0

.PHONY: setup demo editor test bench setup-anytorch test-anytorch clean-venv

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
	$(PY) -m pytest -q -n auto $(ARGS)

bench: setup
	$(PY) tools/bench.py decode

$(ANYTORCH_VENV)/.installed: requirements-any-torch.txt
	$(PYTHON) -m venv $(ANYTORCH_VENV)
	$(ANYTORCH_PY) -m pip install "$(ANYTORCH_TORCH)" "$(ANYTORCH_VISION)" -r requirements-any-torch.txt
	@if $(ANYTORCH_PY) -c "import pytorch3d" 2>/dev/null; then \
		echo "$(ANYTORCH_VENV) has PyTorch3D; it is meant to run without it"; exit 1; fi
	touch $@

setup-anytorch: $(ANYTORCH_VENV)/.installed

test-anytorch: setup-anytorch
	$(ANYTORCH_PY) -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, '(no PyTorch3D)')"
	$(ANYTORCH_PY) -m pytest -q -n auto $(ARGS)

clean-venv:
	rm -rf $(VENV) $(ANYTORCH_VENV)
