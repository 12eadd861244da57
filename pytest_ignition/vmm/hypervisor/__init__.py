"""The bundled VMM's thin hypervisor layer: what a VM and a vCPU can be asked to do
(:mod:`.base`), and its backends for the aarch64 machine (``vmm/arch/aarch64/machine.py``): KVM
(:mod:`.kvm_aarch64`, over the raw ioctls of :mod:`.kvm` + ``vmm/kvm_arm64.py``) and
Hypervisor.framework (:mod:`.hvf`, macOS on Apple silicon; written, never run on a Mac) with its
SIMD register shim (:mod:`.hvf_simd`) and entitled interpreter (:mod:`.hvf_sign`); the arm64 exit
logic a userspace-PSCI hypervisor needs (:mod:`.arm64_exits`).

The raw KVM ioctls (:mod:`.kvm`, x86 and shared) live here too; the x86_64 machine
(``vmm/machine.py``) still calls them directly, not through :mod:`.base` (docs/architecture.md,
"Two architectures").
"""
