# loraflow: the two commands a new user needs are `make demo` and `make test`.
# Both install what they need on a fresh Debian machine (run as root for the system
# packages and the Docker engine; see README "Set-up").

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export LORAFLOW_HOME ?= $(CURDIR)/.loraflow

.PHONY: setup system-deps docker-image stack-images stack-test trainer-image-gpu demo test test-fast ui stop bench clean

# Python packages, pinned (constraints.txt holds the whole resolved set).
$(VENV)/.installed: pyproject.toml trainer_image/pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==25.3"
	# torch first and alone: the CPU wheel (find-links) must win over PyPI's CUDA build.
	$(PY) -m pip install --quiet -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install --quiet -c constraints.txt -e "trainer_image[train]" -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# Debian packages the tests use: a Docker engine, debootstrap for the local base image,
# Chromium for the UI test.
system-deps:
	bash scripts/install-system-deps.sh

# A running Docker engine, a locally built base image and the CPU trainer image.
docker-image: system-deps
	bash scripts/start-docker.sh
	bash scripts/build-base-image.sh
	bash scripts/build-trainer-image.sh

# Every image of docker-compose.yaml, built here without a registry (README "Deploy the
# stack"); writes build/stack-images.env, the LORAFLOW_*_IMAGE overrides compose reads.
stack-images: system-deps
	bash scripts/start-docker.sh
	bash scripts/build-stack-images.sh

# The compose stack for real on those images: up --wait, runs through the REST API and
# Celery, persistence across `down`, two workers; then `down -v` (figures in README).
stack-test: setup stack-images
	LORAFLOW_STACK_TEST=1 $(PY) -m pytest -x -q -p no:cacheprovider tests/stack

# The trainer image as a GPU host builds it: PyPI's CUDA torch (its wheels carry the CUDA
# libraries) on the local Debian base; tagged apart from the CPU image. Downloads ~GBs.
trainer-image-gpu: system-deps
	bash scripts/start-docker.sh
	LORAFLOW_TORCH=cuda LORAFLOW_BASE_IMAGE=$${LORAFLOW_BASE_IMAGE:-loraflow-base:bookworm} \
	  LORAFLOW_IMAGE=$${LORAFLOW_GPU_IMAGE:-loraflow-trainer:0.1.0-cuda} bash scripts/build-trainer-image.sh
	docker run --rm $${LORAFLOW_GPU_IMAGE:-loraflow-trainer:0.1.0-cuda} python -c \
	  'import torch, bitsandbytes; print("torch", torch.__version__, "cuda", torch.version.cuda, "bitsandbytes", bitsandbytes.__version__)'

# End to end on the embedded default: local Airflow DB, local MLflow server, local
# runtime, the tiny CPU model and the bundled sample dataset.
demo: setup
	$(PY) scripts/demo.py

# Everything the tests need, then the whole suite, on TEST_WORKERS processes (pytest-xdist):
# a module stays on one worker, the Docker engine tests share one. TEST_WORKERS=0 runs it in one.
TEST_WORKERS ?= 2
test: setup docker-image
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# The suite without the Docker engine tests (they skip), for a quick loop.
test-fast: setup
	$(PY) -m pytest -m "not docker"

# Airflow UI (api-server + scheduler + dag-processor) and MLflow UI, in the background, for
# this LORAFLOW_HOME, with the tiny model the trigger form's defaults name. Settings:
#   make ui LORAFLOW_AIRFLOW_PORT=8081 LORAFLOW_MLFLOW_PORT=5001 LORAFLOW_AIRFLOW_LOG_PORT=8794
#   make ui LORAFLOW_BIND=0.0.0.0   # listen beyond loopback (the default is 127.0.0.1)
export LORAFLOW_AIRFLOW_PORT LORAFLOW_MLFLOW_PORT LORAFLOW_AIRFLOW_LOG_PORT LORAFLOW_BIND
ui: setup
	$(PY) scripts/demo.py --serve-only

# Stops the servers this LORAFLOW_HOME started (pidfiles in $(LORAFLOW_HOME)/pids), nothing else.
stop:
	$(PY) scripts/demo.py --stop

# Benchmarks (figures and machine notes in docs/benchmarks.md); add ARGS=--smoke for a quick run.
bench: setup
	$(PY) bench/throughput.py $(ARGS)
	$(PY) bench/memory.py $(ARGS)
	$(PY) bench/data_path.py $(ARGS)
	$(PY) bench/pipeline_overhead.py $(ARGS)
	$(PY) bench/gpu.py $(ARGS)

clean:
	rm -rf .loraflow
