"""Per-architecture machine models of the bundled VMM (boot layout, vCPU state, interrupt
controller and timer, what a snapshot records), one package per guest architecture.

``aarch64/`` is here; the x86_64 model still lives in ``vmm/x86_64/`` and ``vmm/machine.py``
until the hypervisor/arch seam refactor moves it (see docs/architecture.md). Nothing in these
packages opens ``/dev/kvm``: they are plain data and pure functions, unit-tested without a VM.
"""
