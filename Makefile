# The two commands of the quick start (demo, test), and lint, fmt, proto, bench.
# Each creates .venv and installs what it needs: the extras the tests use included (the torch and jax
# drop-ins; torch's CPU wheels when their index is reachable, else PyPI's).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint fmt venv proto bench bench-peers clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH (or: make PY=python3)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --timeout 15 --retries 1 --index-url $(TORCH_CPU_INDEX) torch \
		|| $(BIN)/python -m pip install -q torch
	$(BIN)/python -m pip install -q -e '.[server,demo,test,torch,jax]'
	rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/optserve demo

# CI runs this (.ci/run): lint first, so that a finding fails fast, then the suite, a file per
# pytest-xdist worker (--dist loadfile keeps each module's shared servers in one process). Most tests
# wait on servers and subprocesses, so two workers use two cores where one leaves them half idle.
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The configuration of all three is in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Fixes first (their edits may need formatting), then the formatter; `make lint` shows what is left.
fmt: $(STAMP)
	$(BIN)/ruff check --fix --exit-zero .
	$(BIN)/ruff format .

# Regenerate the Python modules from the contract (tests fail when they are stale).
proto: $(STAMP)
	$(BIN)/python proto/generate.py

bench: $(STAMP)
	$(BIN)/python bench/run.py

# bench/peers.py: optserve beside a Ray actor parameter server and a torch.distributed.rpc one. Ray
# and torch are heavy and never the package's dependencies: they live in their own environment,
# .venv-bench, with optserve installed editable. torch's CPU wheels when their index is reachable,
# else PyPI's. Flags for the script: make bench-peers PEERS_ARGS="--rounds 3 --workers 1".
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
PEERS_ARGS ?=

$(BENCH_STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH (or: make PY=python3)"; exit 1; }
	test -x $(BENCH_VENV)/bin/python || $(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q --timeout 15 --retries 1 --index-url $(TORCH_CPU_INDEX) torch \
		|| $(BENCH_VENV)/bin/python -m pip install -q torch
	$(BENCH_VENV)/bin/python -m pip install -q ray -e '.[server]'
	rm -f $(BENCH_VENV)/.installed-*; touch $(BENCH_STAMP)

bench-peers: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python bench/peers.py $(PEERS_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) build *.egg-info
