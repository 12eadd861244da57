"""Per-architecture machine models of the bundled VMM (boot layout, vCPU state, interrupt
controller and timer, what a snapshot records), one package per guest architecture.

``aarch64/`` and ``x86_64/`` (boot layout; in ``x86_64/state.py`` the vCPU/VM state bundles, in
``x86_64/vm.py``, ``vcpu.py`` and ``devices.py`` the VM setup, a new vCPU's boot configuration and
the legacy devices that ``vmm/machine.py`` calls, see docs/architecture.md). Nothing in these
packages opens ``/dev/kvm``: plain data and pure functions, unit-tested without a VM, and code
that calls the ioctls of a VM or vCPU it is given.
"""
