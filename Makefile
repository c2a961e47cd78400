# Every target sets itself up: a local .venv with torch 2.13.0 (CPU build) and this package.
# GPU users: `pip install -e .[dev]` into an environment that already has your CUDA torch instead.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-gpu lab bench train clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m longcat_ref.demo $(ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

# On a GPU machine whose python3 already has CUDA torch (no venv): the tests of the GPU paths (kernels, FP8 kept,
# fast decoding, MTP), without the notebooks; each GPU-only test skips elsewhere
test-gpu:
	python3 -m pytest -o addopts="" -q -ra -p no:cacheprovider tests/test_kernel_moe.py tests/test_kernel_mla.py \
		tests/test_kernel_grouped.py tests/test_kernel_router.py tests/test_kernel_gemv.py tests/test_kernel_rope.py \
		tests/test_fp8.py tests/test_fp8_keep.py tests/test_cli_errors.py tests/test_fast.py tests/test_mtp.py \
		tests/test_core.py $(ARGS)

# ARGS go to jupyter (e.g. ARGS='--no-browser --port 8889'); as root jupyter refuses to start without --allow-root
lab: $(VENV)/.installed-dev
	$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS) notebooks/

bench: $(VENV)/.installed-dev
	$(BIN)/python -m longcat_ref.tools.bench $(ARGS)

train: $(VENV)/.installed-dev
	$(BIN)/python -m longcat_ref.tools.train --ship --plot docs/training_dynamics.png $(ARGS)
	$(BIN)/python -m longcat_ref.tools.train_mtp --ship  # then the MTP head on top (the model frozen)

clean:
	rm -rf $(VENV) .pytest_cache
