"""The bundled VMM's thin hypervisor layer: what a VM and a vCPU can be asked to do
(:mod:`.base`), the arm64 exit logic a userspace-PSCI hypervisor needs (:mod:`.arm64_exits`) and the
Hypervisor.framework backend (:mod:`.hvf`, macOS on Apple silicon; written, never run on a Mac)
with its SIMD register shim (:mod:`.hvf_simd`) and entitled interpreter (:mod:`.hvf_sign`). The
machine on this seam is ``vmm/machine_aarch64.py``.

KVM's implementation still lives in ``vmm/kvm.py`` + ``vmm/kvm_arm64.py``; the seam refactor moves it
here (docs/architecture.md, "Two architectures").
"""
