# tailwise: the two commands a new user runs (README, "Two commands").
#   make serve PORT=3000   install what serving needs (no torch), then serve the default model over HTTP
#                          ($TAILWISE_MODEL, else the shipped model; PORT: default 3000)
#   make test-fast         install everything, then run the tests not marked slow, for the inner loop
# and `make test`, the whole suite (what CI runs).
VENV ?= .venv
PY := $(VENV)/bin/python
# Extras per goal: serving needs onnxruntime only (cpu; gpu for onnxruntime-gpu), the tests also training (train:
# torch ...) and the test tools. One stamp per set of extras, so `make test` after `make serve` adds the rest.
SERVE_EXTRAS ?= cpu
TRAIN_EXTRAS ?= cpu,train
TEST_EXTRAS ?= cpu,train,test,ray
PORT ?= 3000
export BENTOML_DO_NOT_TRACK := true

.PHONY: setup setup-serve setup-train test test-fast serve help clean gpu

$(VENV)/.installed-%: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade -e ".[$*]"
	touch $@

setup: $(VENV)/.installed-$(TEST_EXTRAS)
setup-serve: $(VENV)/.installed-$(SERVE_EXTRAS)
# Serving and training (torch), without the test tools and Ray: README "Start here", step 2.
setup-train: $(VENV)/.installed-$(TRAIN_EXTRAS)

# Two pytest workers (one per core; up to 4), one whole test file each at a time, one thread each: on 2 cores
# this took 137 s against 180 s for one process with torch's two threads (the tiny models here gain little from
# a second thread). A single process: $(PY) -m pytest -q
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

# Leaves out the tests marked slow (they train, serve, build wheels, read the real data or run the walkthrough).
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Serves $TAILWISE_MODEL, else the model shipped with tailwise (never a model chosen by modification time).
serve: setup-serve
	$(VENV)/bin/tailwise serve --port $(PORT)

# On a bare GPU machine (no venv, no network; docs/GPU.md, which starts with experiments/gpu_run.sh --check):
# make gpu GPU_ARGS='--out $$OUT'
GPU_DATA ?= data/fashion-mnist
gpu:
	experiments/gpu_run.sh --data $(GPU_DATA) $(GPU_ARGS)

help: setup-serve
	$(VENV)/bin/tailwise --help

clean:
	rm -rf $(VENV) build *.egg-info
