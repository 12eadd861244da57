# pytest-ignition: two commands on a fresh Debian 12 machine as root:
#   make demo   installs what it needs, builds the guest, runs examples/
#   make test   the same setup, then the test suite
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
APT_PACKAGES := linux-source busybox-static musl-tools qemu-system-x86 qemu-utils e2fsprogs cpio \
	socat flex bison bc libelf-dev libssl-dev xz-utils make gcc python3-venv mmdebstrap passt \
	openssh-server openssh-client iproute2 \
	gcc-aarch64-linux-gnu qemu-system-arm linux-libc-dev-arm64-cross device-tree-compiler \
	musl-dev:arm64
PYTEST_ARGS ?=
FUZZ_SECONDS ?= 600

.PHONY: setup system-packages venv bytecode guest guest-aarch64 host-kernel demo test test-nested \
	test-nested-arm64 bench lint clean fuzz

setup: system-packages venv

system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "==> installing Debian packages:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install: $$missing" >&2; exit 1; fi; \
		case " $$missing " in *:arm64*) dpkg --print-foreign-architectures | grep -qx arm64 \
			|| dpkg --add-architecture arm64;; esac; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(VPY): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test,bench]'
	@touch $(VPY)

venv: $(VPY)

# The nested harness sees this tree read-only and its Python runs under TCG: without .pyc files
# (PYTHONDONTWRITEBYTECODE is common) every VMM start there compiles its modules again (~1 s).
bytecode: venv
	$(VPY) -m compileall -q pytest_ignition benchmarks tests

guest: setup
	$(VPY) -m pytest_ignition.guest build

# The arm64 guest (cross-built; tests/e2e/test_aarch64.py runs the e2e suite on it under TCG).
guest-aarch64: setup
	$(VPY) -m pytest_ignition.guest build --arch aarch64

host-kernel: setup
	$(VPY) -m pytest_ignition.guest build --host

demo: guest
	$(VPY) -m pytest examples/ -v $(PYTEST_ARGS)

test: guest guest-aarch64 host-kernel
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .
	$(VPY) -m pytest $(PYTEST_ARGS)

# Both architectures: the x86 tier, then the arm64 one (~3-4 min more: tests/nested_arm64 took
# 17.8 s of pytest without the e2e suite on the bundled VMM, which took 142 s beside another
# harness, plus the arm64 host's 7-21 s boot).
# --retries 1: when the TCG-emulated host's own kernel panics, the tier runs once more in a new
# host, after printing the oops; a test failure or timeout is never retried. Seen once in CI
# (2026-12-02, x86 tier): an interrupt on a secondary CPU's idle stack faulted on a user address
# (0x7f8f9d3b2ff0) and then found garbage for current->mm (lock_mm_and_find_vma, find_vma gave
# 0x18, "Fatal exception in interrupt"): the host kernel ran with a user value as its per-CPU
# (GS) base, which no user process can set; the suspect is TCG's emulation of the SVM world
# switch (VMRUN/VMLOAD), not the command. The same goes for a host that resets under the
# command without a panic (QEMU exits 0 under -no-reboot; its reset log, -d cpu_reset, tells a
# triple fault from a requested reset): seen twice in ~15 dry runs (sessions 3 and 10), silent.
test-nested: guest guest-aarch64 host-kernel bytecode
	$(VPY) -m pytest_ignition.nested run --retries 1 -- $(VPY) -m pytest tests/nested -v --color=no $(PYTEST_ARGS)
	$(NESTED_ARM64)

# The bundled VMM's aarch64 machine on real arm64 KVM: the arm64 nested harness (Debian's arm64
# kernel under qemu-system-aarch64 TCG at EL2; its root is fetched into the cache on first use).
# python3 there is the harness's arm64 interpreter; the built arm64 guest is passed in by path.
NESTED_ARM64 = $(VPY) -m pytest_ignition.nested run --arch aarch64 --retries 1 -- python3 -m pytest \
	tests/nested_arm64 -v --color=no -p no:hypothesispytest $(PYTEST_ARGS)
test-nested-arm64: guest-aarch64 bytecode
	$(NESTED_ARM64)

bench: guest host-kernel bytecode
	$(VPY) -m benchmarks --update-readme

# Long coverage-guided runs: the host parsers under atheris (pip install atheris), then the
# guest agent's parser under libFuzzer (apt-get install clang); FUZZ_SECONDS per target.
fuzz: venv
	for t in agent_frames agent_payloads snapshot_state; do \
		$(VPY) tests/fuzz/run.py $$t $(FUZZ_SECONDS) || exit 1; done
	$(MAKE) -C guest/agent/fuzz run FUZZ_SECONDS=$(FUZZ_SECONDS)

lint: venv
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist
