# The two commands from the README: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: all demo test test-vm lint typecheck unit bench soak fuzz clean sysdeps venv

all: test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

sysdeps:
	@bash scripts/system-deps.sh

lint: venv
	$(BIN)/ruff check src tests bench fuzz
	$(BIN)/ruff format --check src tests bench fuzz

typecheck: venv
	$(BIN)/mypy --strict src

unit: venv sysdeps
	$(BIN)/pytest -n $(PYTEST_WORKERS) -q

test: venv sysdeps lint typecheck unit

# The Linux agent in QEMU: OVMF, GRUB, Debian's kernel, A/B partitions, real reboots and
# power cuts (tests/vm/). KVM when a probe boot works, TCG otherwise. Disk images are built
# at run time and cached in ~/.cache/otaguard-vm.
VM_WORKERS ?= 2
test-vm: venv sysdeps
	$(BIN)/pytest -n $(VM_WORKERS) -q -m vm tests/vm

demo: venv sysdeps
	$(BIN)/otaguard demo --out demo-out

bench: venv sysdeps
	$(BIN)/python bench/crypto.py
	$(BIN)/python bench/manifest.py
	$(BIN)/python bench/device.py
	$(BIN)/python bench/delta.py
	$(BIN)/python bench/server.py
	$(BIN)/python bench/fleet.py
	$(BIN)/python bench/agent.py
	$(BIN)/python bench/vm.py

# Atheris (libFuzzer) on the CBOR reader, manifest verifier, key-list parser and delta applier:
# 2.5 million executions per target by default (FUZZ_RUNS), from the committed corpus in
# fuzz/corpus/; findings land in fuzz/findings/. `python fuzz/run.py --update-corpus` re-minimises.
fuzz: venv
	$(BIN)/python fuzz/run.py

soak: venv sysdeps
	OTAGUARD_SOAK_EXAMPLES=$${OTAGUARD_SOAK_EXAMPLES:-20000} $(BIN)/pytest -q -n $(PYTEST_WORKERS) -m soak tests/test_soak.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache demo-out
