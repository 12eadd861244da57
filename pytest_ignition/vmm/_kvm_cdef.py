"""cffi declarations of the x86_64 KVM ABI (``linux/kvm.h`` + ``asm/kvm.h``, Linux 6.1 uapi).

Only the layout matters here: the structs are declared exactly as the kernel's uapi headers
declare them (unions the VMM never reads are reduced to padding of the same size), and
``tests/vmm/test_kvm.py`` checks every ``sizeof`` and the ``kvm_run`` field offsets against
numbers taken from the kernel headers with a C compiler.
"""

from __future__ import annotations

CDEF = r"""
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
typedef int64_t __s64;

int ioctl(int fd, unsigned long request, ...);

struct kvm_userspace_memory_region {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
};

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx;
    __u64 rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11;
    __u64 r12, r13, r14, r15;
    __u64 rip, rflags;
};

struct kvm_segment {
    __u64 base;
    __u32 limit;
    __u16 selector;
    __u8 type;
    __u8 present, dpl, db, s, l, g, avl;
    __u8 unusable;
    __u8 padding;
};

struct kvm_dtable {
    __u64 base;
    __u16 limit;
    __u16 padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 interrupt_bitmap[4];
};

struct kvm_fpu {
    __u8 fpr[8][16];
    __u16 fcw;
    __u16 fsw;
    __u8 ftwx;
    __u8 pad1;
    __u16 last_opcode;
    __u64 last_ip;
    __u64 last_dp;
    __u8 xmm[16][16];
    __u32 mxcsr;
    __u32 pad2;
};

struct kvm_msr_entry {
    __u32 index;
    __u32 reserved;
    __u64 data;
};

struct kvm_msrs {
    __u32 nmsrs;
    __u32 pad;
    struct kvm_msr_entry entries[];
};

struct kvm_msr_list {
    __u32 nmsrs;
    __u32 indices[];
};

struct kvm_cpuid_entry2 {
    __u32 function;
    __u32 index;
    __u32 flags;
    __u32 eax;
    __u32 ebx;
    __u32 ecx;
    __u32 edx;
    __u32 padding[3];
};

struct kvm_cpuid2 {
    __u32 nent;
    __u32 padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_lapic_state {
    char regs[1024];
};

struct kvm_mp_state {
    __u32 mp_state;
};

struct kvm_xsave {
    __u32 region[1024];
    __u32 extra[];
};

struct kvm_xcr {
    __u32 xcr;
    __u32 reserved;
    __u64 value;
};

struct kvm_xcrs {
    __u32 nr_xcrs;
    __u32 flags;
    struct kvm_xcr xcrs[16];
    __u64 padding[16];
};

struct kvm_vcpu_events {
    struct {
        __u8 injected;
        __u8 nr;
        __u8 has_error_code;
        __u8 pending;
        __u32 error_code;
    } exception;
    struct {
        __u8 injected;
        __u8 nr;
        __u8 soft;
        __u8 shadow;
    } interrupt;
    struct {
        __u8 injected;
        __u8 pending;
        __u8 masked;
        __u8 pad;
    } nmi;
    __u32 sipi_vector;
    __u32 flags;
    struct {
        __u8 smm;
        __u8 pending;
        __u8 smm_inside_nmi;
        __u8 latched_init;
    } smi;
    struct {
        __u8 pending;
    } triple_fault;
    __u8 reserved[26];
    __u8 exception_has_payload;
    __u64 exception_payload;
};

struct kvm_debugregs {
    __u64 db[4];
    __u64 dr6;
    __u64 dr7;
    __u64 flags;
    __u64 reserved[9];
};

struct kvm_clock_data {
    __u64 clock;
    __u32 flags;
    __u32 pad0;
    __u64 realtime;
    __u64 host_tsc;
    __u32 pad[4];
};

struct kvm_irqchip {
    __u32 chip_id;
    __u32 pad;
    union {
        char dummy[512];
    } chip;
};

struct kvm_pit_channel_state {
    __u32 count;
    __u16 latched_count;
    __u8 count_latched;
    __u8 status_latched;
    __u8 status;
    __u8 read_state;
    __u8 write_state;
    __u8 write_latch;
    __u8 rw_mode;
    __u8 mode;
    __u8 bcd;
    __u8 gate;
    __s64 count_load_time;
};

struct kvm_pit_state2 {
    struct kvm_pit_channel_state channels[3];
    __u32 flags;
    __u32 reserved[9];
};

struct kvm_pit_config {
    __u32 flags;
    __u32 pad[15];
};

struct kvm_irq_level {
    union {
        __u32 irq;
        int32_t status;
    };
    __u32 level;
};

struct kvm_irqfd {
    __u32 fd;
    __u32 gsi;
    __u32 flags;
    __u32 resamplefd;
    __u8 pad[16];
};

struct kvm_dirty_log {
    __u32 slot;
    __u32 padding1;
    union {
        void *dirty_bitmap;
        __u64 padding2;
    };
};

struct kvm_signal_mask {
    __u32 len;
    __u8 sigset[];
};

struct kvm_enable_cap {
    __u32 cap;
    __u32 flags;
    __u64 args[4];
    __u8 pad[64];
};

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u8 padding1[6];
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;
    __u64 cr8;
    __u64 apic_base;
    union {
        struct {
            __u64 hardware_exit_reason;
        } hw;
        struct {
            __u64 hardware_entry_failure_reason;
            __u32 cpu;
        } fail_entry;
        struct {
            __u32 exception;
            __u32 error_code;
        } ex;
        struct {
            __u8 direction;
            __u8 size;
            __u16 port;
            __u32 count;
            __u64 data_offset;
        } io;
        struct {
            __u64 phys_addr;
            __u8 data[8];
            __u32 len;
            __u8 is_write;
        } mmio;
        struct {
            __u32 suberror;
            __u32 ndata;
            __u64 data[16];
        } internal;
        struct {
            __u32 type;
            __u32 ndata;
            __u64 data[16];
        } system_event;
        char padding[256];
    };
    __u64 kvm_valid_regs;
    __u64 kvm_dirty_regs;
    union {
        char padding[2048];
    } s;
};
"""

# sizeof / offsetof measured with gcc against Linux 6.1's uapi headers (see the module docstring).
EXPECTED_SIZES: dict[str, int] = {
    "struct kvm_run": 2352,
    "struct kvm_regs": 144,
    "struct kvm_sregs": 312,
    "struct kvm_segment": 24,
    "struct kvm_dtable": 16,
    "struct kvm_fpu": 416,
    "struct kvm_msr_entry": 16,
    "struct kvm_msrs": 8,
    "struct kvm_msr_list": 4,
    "struct kvm_cpuid_entry2": 40,
    "struct kvm_cpuid2": 8,
    "struct kvm_lapic_state": 1024,
    "struct kvm_mp_state": 4,
    "struct kvm_xsave": 4096,
    "struct kvm_xcrs": 392,
    "struct kvm_vcpu_events": 64,
    "struct kvm_debugregs": 128,
    "struct kvm_clock_data": 48,
    "struct kvm_irqchip": 520,
    "struct kvm_pit_state2": 112,
    "struct kvm_pit_config": 64,
    "struct kvm_irq_level": 8,
    "struct kvm_irqfd": 32,
    "struct kvm_dirty_log": 16,
    "struct kvm_userspace_memory_region": 32,
    "struct kvm_enable_cap": 104,
    "struct kvm_signal_mask": 4,
}
EXPECTED_RUN_OFFSETS: dict[str, int] = {
    "io": 32,
    "mmio": 32,
    "system_event": 32,
    "kvm_valid_regs": 288,
}

# Ioctl request numbers from the same headers, to check the _IOC arithmetic in kvm.py.
EXPECTED_IOCTLS: dict[str, int] = {
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_GET_IRQCHIP": 0xC208AE62,
    "KVM_SET_IRQCHIP": 0x8208AE63,
    "KVM_IRQFD": 0x4020AE76,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_GET_CLOCK": 0x8030AE7C,
    "KVM_SET_CLOCK": 0x4030AE7B,
    "KVM_GET_PIT2": 0x8070AE9F,
    "KVM_SET_PIT2": 0x4070AEA0,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_LAPIC": 0x4400AE8F,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_CPUID2": 0xC008AE91,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_GET_DEBUGREGS": 0x8080AEA1,
    "KVM_SET_DEBUGREGS": 0x4080AEA2,
    "KVM_GET_XSAVE": 0x9000AEA4,
    "KVM_SET_XSAVE": 0x5000AEA5,
    "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_SET_XCRS": 0x4188AEA7,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_RUN": 0xAE80,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_SET_TSC_KHZ": 0xAEA2,
    "KVM_GET_TSC_KHZ": 0xAEA3,
    "KVM_KVMCLOCK_CTRL": 0xAEAD,
    "KVM_GET_XSAVE2": 0x9000AECF,
    "KVM_GET_MSR_FEATURE_INDEX_LIST": 0xC004AE0A,
    "KVM_SET_SIGNAL_MASK": 0x4004AE8B,
}
