"""Per-architecture machine models of the bundled VMM (boot layout, vCPU state, interrupt
controller and timer, what a snapshot records), one package per guest architecture.

``aarch64/`` and ``x86_64/`` (boot layout and, in ``x86_64/state.py``, the vCPU/VM state bundles;
its legacy-device wiring still lives in ``vmm/machine.py``, see docs/architecture.md). Nothing in
these packages opens ``/dev/kvm``: plain data and pure functions, unit-tested without a VM, and
state code that calls the ioctls of a VM or vCPU it is given.
"""
