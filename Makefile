# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates its own virtual environment and installs torch before the package, because a
# bare `torch` requirement would pull a CUDA build of several GB.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
# The real torchvision and timm models (tests/zoo) in an environment of their own: torchvision
# 0.29.1 needs torch 2.14.1 (a CUDA build that runs on the CPU, from local disk), named in every
# install so that nothing replaces it.
ZOO_VENV ?= .venv-zoo
ZOO_TORCH ?= torch==2.14.1 torchvision==0.29.1
ZOO_PY := $(ZOO_VENV)/bin/python

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

$(ZOO_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(ZOO_VENV)
	$(ZOO_PY) -m pip install -q --upgrade pip
	$(ZOO_PY) -m pip install -q $(ZOO_TORCH)
	$(ZOO_PY) -m pip install -q $(ZOO_TORCH) "timm==1.0.31" "pytest>=7" "tensorboard>=2.14" "numpy>=1.24"
	$(ZOO_PY) -m pip install -q --no-deps -e .
	touch $@

test: $(VENV)/.installed $(ZOO_VENV)/.installed
	$(PY) -m pytest -q --durations=15
	$(ZOO_PY) -m pytest -q --durations=5 tests/zoo

clean:
	rm -rf $(VENV) $(ZOO_VENV) runs build *.egg-info
