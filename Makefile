# Set-up and entry points. `make demo` and `make test` each create the environment when needed: one
# venv with every role's extra (pip install -e '.[dev]' = train, serve, client and the test tools).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned to the releases the project's machines install from local disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# The real Triton server for the integration tests: nvidia-pytriton bundles tritonserver (python
# backend) and pins numpy<2, so it gets its own venv; onnxruntime runs inside its python-backend models
# (onnx prunes their graphs to the outputs a batch asks for).
TRITON_VENV ?= .venv-triton
TRITON_SPEC ?= nvidia-pytriton==0.7.0 'numpy<2' 'onnxruntime>=1.18' 'onnx>=1.16'
PYTEST_ARGS ?=

.PHONY: venv triton-venv demo test test-all deploy-check lint bench bench-triton bench-gateway bench-triton-gateway bench-final-graph bench-footprint gpu-check proto clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e '.[dev]'
	touch $@

triton-venv: $(TRITON_VENV)/.installed

$(TRITON_VENV)/.installed:
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install $(TRITON_SPEC)
	touch $@

# train, sparsify, compact and export; then convert, serve, call the gateway with the client, stop
demo: venv
	rm -rf runs/demo
	$(PY) -m training.run --config configs/demo.yaml
	$(PY) -m training.demo --run runs/demo --repository model_repository --name demo

# the fast tier (under 10 minutes on 2 cores): everything but the `slow`-marked long checks;
# `gpu`-marked tests skip themselves without CUDA
test: venv triton-venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# everything, the slow tier too (multi-process training, sweeps, big-model exports, soak runs) and
# more examples per property test
test-all: venv triton-venv
	PARSIMONY_PROPERTY_EXAMPLES=10 $(PY) -m pytest $(PYTEST_ARGS)

# deploy/: render and validate every kustomization, promtool on the alerts, metric names against a running gateway
deploy-check: venv
	$(PY) -m pytest -q tests/test_deploy*.py $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check parsimony training serving clients tests benchmarks

bench: venv
	$(PY) -m benchmarks.train_throughput

bench-triton: venv triton-venv
	$(PY) -m benchmarks.triton

bench-gateway: venv
	$(PY) -m benchmarks.gateway

bench-triton-gateway: venv triton-venv
	$(PY) -m benchmarks.triton_gateway

# final graphs against raw ones, side by side: bytes per hop, ONNX Runtime, the gateway's own CPU and p50
bench-final-graph: venv
	$(PY) -m benchmarks.final_graph

# installed size of each role's venv, the gateway's and the converter's start-up and peak RSS against
# BEFORE (a git revision, run with the full venv); venvs and results in runs/footprint. TORCH_WHEEL (a
# CPU torch wheel) adds the size of what the gateway image installed at BEFORE.
BEFORE ?= 3115934
TORCH_WHEEL ?=
bench-footprint: venv
	$(PY) -m benchmarks.footprint --before $(BEFORE) $(if $(TORCH_WHEEL),--torch-wheel $(TORCH_WHEEL))

# every GPU measurement in one call (training on CUDA with AMP, torchrun/nccl, CUDA compaction and
# proximal-step benchmarks, ORT's CUDA provider, the gpu-marked tests); report in runs/gpu-check.
# On a bare GPU host without this venv: python3 -m benchmarks.gpu_check (its docstring lists what to bring).
gpu-check: venv
	$(PY) -m benchmarks.gpu_check --out runs/gpu-check

# regenerate the committed gRPC/protobuf modules after editing serving/proto/parsimony/v1/*.proto
proto: venv
	$(PY) -m serving.proto.generate

clean:
	rm -rf $(VENV) $(TRITON_VENV) runs .pytest_cache
