# The two commands of the README. Each builds .venv on a fresh machine and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
# 2.13.0 is the CPU wheel our machines carry; a looser pin would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# Tiny CPU models are dominated by thread start-up on 2 cores: one thread is several times faster.
export OMP_NUM_THREADS ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: quickstart test test-slow install clean

$(BIN)/.installed: pyproject.toml scripts/install_offline_data.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	PYTHON=$(BIN)/python bash scripts/install_offline_data.sh
	touch $@

install: $(BIN)/.installed

## Main job: IMP with late rewinding + both LTH controls on the embedded digits set; ends in runs/quickstart/ticket.
## backend=lockstep trains each level's ticket and controls in one pass (the recipe's header says why)
quickstart: install
	$(BIN)/hf-tickets run recipes/quickstart_digits.yaml backend=lockstep

## Layering contracts (pyproject [tool.importlinter]), then the test suite (slow and GPU tests are deselected; run
## them with `make test-slow` / `pytest -m gpu`)
test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-slow: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow

clean:
	rm -rf $(VENV) runs
