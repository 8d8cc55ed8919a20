# Set-up and entry points. `make demo` and `make test` each create the environment when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned to the releases the project's machines install from local disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv demo test lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e '.[dev]'
	touch $@

demo: venv
	rm -rf runs/demo
	$(PY) -m training.run --config configs/demo.yaml

test: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check training serving clients tests benchmarks

bench: venv
	$(PY) -m benchmarks.train_throughput

clean:
	rm -rf $(VENV) runs .pytest_cache
