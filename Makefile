# Quick start: `make demo` (the whole pipeline, offline, 15-20 min on 2 cores) and `make test`.
# Both install into .venv first when needed.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Stamp file: install reruns only when the dependency lists change.
STAMP := $(VENV)/.installed
# DeepSpeed's JIT-built ops live in the virtualenv, not in ~/.cache: built once by `make install`, found by the
# demo, the tests and their Ray workers whatever HOME is, and gone with the virtualenv.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
DS_OPS := $(TORCH_EXTENSIONS_DIR)/.built
PYTEST_ARGS ?=
DEMO_ARGS ?=
# The local cluster of `make cluster-up`: its directory (state, logs, env.sh) and Ray worker nodes.
CLUSTER_DIR ?= .cluster
CLUSTER_WORKERS ?= 2

.PHONY: install demo test test-fast bench cluster-up cluster-down constraints clean

install: $(STAMP) $(DS_OPS)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, from the pinned pair (torchvision must match torch exactly).
	$(PIP) install --quiet -c constraints.txt torch torchvision
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Prebuild DeepSpeed's CPU shared-memory comm op: otherwise the first deepspeed.initialize on CPU JIT-compiles it
# for about a minute inside a test or a training worker.
$(DS_OPS): $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
	touch $(DS_OPS)

demo: install
	$(PY) jobs/demo.py $(DEMO_ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) -m bench.unet_step --preset tiny
	$(PY) -m bench.unet_step --preset small --batch 2 --steps 6
	$(PY) -m bench.train_throughput --preset tiny --batch 32
	$(PY) -m bench.gpu_train --device cpu --preset tiny --res 64 --batch 4 --phases flops,eager,channels_last,mask,checkpointing,job --out $${TMPDIR:-/tmp}/bench-gpu-train-cpu.json

# A cluster on 127.0.0.1 made of real parts (S3 object store, MLflow server, Ray head + worker nodes), left
# running: then `source .cluster/env.sh` and `ray job submit` (docs/cluster.md). `make cluster-down` stops it.
cluster-up: install
	$(PY) -m pipelines.core.local_cluster up --dir $(CLUSTER_DIR) --workers $(CLUSTER_WORKERS)

cluster-down: install
	$(PY) -m pipelines.core.local_cluster down --dir $(CLUSTER_DIR)

# Re-pin constraints.txt to what is installed now (after a deliberate upgrade).
constraints: install
	{ echo "# Versions tested together (python 3.11, x86_64). Regenerate with: make constraints"; \
	  $(PIP) freeze --exclude-editable | grep -v -E "^(latentforge|-e )"; } > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
