# Quick start: `make demo` (the main job) and `make test`. Each sets up .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-nnunet lint bench pretrained clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: the CPU wheel on this machine's disk; elsewhere pip fetches it.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gem3d demo

# Two workers, a test file each at a time (its module fixtures built once): most tests use one
# core, so the suite takes about half its serial time on two cores.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile

# nnU-Net v2 as the downstream judge (an optional extra), end to end with its short CPU budget.
# The torch already installed is kept; a torchvision that cannot load next to it (a CUDA build
# beside the CPU torch) is removed: the judge never imports it.
test-nnunet: $(STAMP)
	$(PY) -m pip install --quiet -e ".[nnunet]" "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall --quiet -y torchvision
	$(PY) -m pytest -m nnunet

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) experiments/benchmarks/train_throughput.py
	$(PY) experiments/benchmarks/sampling.py
	$(PY) experiments/benchmarks/data_loading.py
	$(PY) experiments/benchmarks/federation.py
	$(PY) experiments/benchmarks/privacy.py

# Re-create the public pre-trained weights the demo starts from (experiments/pretrained/demo).
pretrained: $(STAMP)
	$(PY) experiments/pretrained/make.py

clean:
	rm -rf $(VENV) demo_out
