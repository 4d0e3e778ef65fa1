# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates its own virtual environment and installs torch before the package, because a
# bare `torch` requirement would pull a CUDA build of several GB.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,examples]"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/matrix_sensing.py --out runs/matrix_sensing
	$(PY) examples/relu_1d.py --out runs/relu_1d
	$(PY) examples/sigmoid_single_point.py --out runs/sigmoid_single_point
	@echo
	@echo "figures:   runs/matrix_sensing/matrix_sensing.png runs/relu_1d/relu_1d.png runs/sigmoid_single_point/sigmoid_single_point.png"
	@echo "summaries: runs/*/summary.json"
	@echo "live logs: $(VENV)/bin/tensorboard --logdir runs"

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs build *.egg-info
