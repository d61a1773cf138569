# The two commands from the README: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: all demo demo-serve test test-vm lint typecheck unit bench soak powercut fuzz clean sysdeps venv

all: test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python sysdeps
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

# The demo, then its server's admin listener with the web dashboard until Ctrl-C (docs/dashboard.md).
demo-serve: venv sysdeps
	$(BIN)/otaguard demo --out demo-out --serve

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

soak: venv sysdeps powercut
	OTAGUARD_SOAK_EXAMPLES=$${OTAGUARD_SOAK_EXAMPLES:-20000} $(BIN)/pytest -q -n $(PYTEST_WORKERS) -m soak tests/test_soak.py

# Power cuts at every operation of every scenario, on both backends (docs/reliability.md):
# the simulated NOR flash (24 KiB and 1 MiB slots) and the Linux backend's files. `make test`
# runs a sample of the same cut points; this runs all of them (about 34,000 cut cases: half an
# hour of CPU on 2 cores) and prints the totals. OTAGUARD_POWERCUT_STRIDE_INSTALL / _DELTA=k
# cut at every k-th operation of the two long 1 MiB scenarios only.
POWERCUT_REPORT ?= powercut-totals.txt
powercut: venv sysdeps
	rm -f $(POWERCUT_REPORT)
	OTAGUARD_POWERCUT_FULL=1 OTAGUARD_POWERCUT_REPORT=$(abspath $(POWERCUT_REPORT)) \
	  OTAGUARD_POWERCUT_SHARDS=$${OTAGUARD_POWERCUT_SHARDS:-4} \
	  $(BIN)/pytest -q -n $(PYTEST_WORKERS) tests/test_device_powercut.py \
	  tests/test_device_powercut_scale.py tests/test_linux_powercut.py
	@sort $(POWERCUT_REPORT)
	@awk '{split($$5,p,"="); split($$6,c,"="); split($$7,b,"="); P+=p[2]; C+=c[2]; B+=b[2]} \
	  END {print "powercut total: " P " cut points, " C " cut cases, bricked " B}' $(POWERCUT_REPORT)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache demo-out powercut-totals.txt
