# tailwise: the two commands a new user runs.
#   make serve   set up, then serve the shipped model over HTTP (port 3000)
#   make test    set up, then run the whole test suite
#   make test-fast  the tests not marked slow, for the inner loop (under a minute on 2 cores)
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,test,ray
export BENTOML_DO_NOT_TRACK := true

.PHONY: setup test test-fast serve help clean gpu

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

# Two pytest workers (one per core; up to 4), one whole test file each at a time, one thread each: on 2 cores
# this took 137 s against 180 s for one process with torch's two threads (the tiny models here gain little from
# a second thread). A single process: $(PY) -m pytest -q
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

# Leaves out the tests marked slow (they train, serve, build wheels, read the real data or run the walkthrough).
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Serves the shipped (or newest exported) model; with no model under models/ yet it prints the help instead.
serve: setup
	@if ls models/*/model.onnx >/dev/null 2>&1; then $(VENV)/bin/tailwise serve; \
	else echo "no model under models/ yet: export one with 'tailwise export' (see README)"; $(VENV)/bin/tailwise --help; fi

# On a bare GPU machine (no venv, no network; docs/GPU.md, which starts with experiments/gpu_run.sh --check):
# make gpu GPU_ARGS='--out $$OUT'
GPU_DATA ?= data/fashion-mnist
gpu:
	experiments/gpu_run.sh --data $(GPU_DATA) $(GPU_ARGS)

help: setup
	$(VENV)/bin/tailwise --help

clean:
	rm -rf $(VENV) build *.egg-info
