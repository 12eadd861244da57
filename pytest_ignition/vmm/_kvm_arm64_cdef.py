"""The C declarations of the arm64 part of the KVM layer (:mod:`.kvm_arm64`), from
``linux/kvm.h`` and ``arch/arm64/include/uapi/asm/kvm.h`` of Linux 6.1; pre-parsed into
:mod:`._kvm_arm64_ffi` by :mod:`._kvm_ffi_build`."""

CDEF = """
struct kvm_vcpu_init { uint32_t target; uint32_t features[7]; };
struct kvm_one_reg { uint64_t id; uint64_t addr; };
struct kvm_reg_list { uint64_t n; uint64_t reg[]; };
struct kvm_create_device { uint32_t type; uint32_t fd; uint32_t flags; };
struct kvm_device_attr { uint32_t flags; uint32_t group; uint64_t attr; uint64_t addr; };
struct kvm_irq_level { uint32_t irq; uint32_t level; };
int ioctl(int fd, unsigned long request, ...);
"""
