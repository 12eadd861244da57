"""CPUID normalisation: KVM's supported list turned into what one vCPU of this VM reports.

Per vCPU: its APIC id and the logical processor count (leaf 1 EBX), the topology leaves
(0xb, 0x1f, 4, AMD 0x80000008 / 0x8000001e) for ``count`` single-threaded cores in one
package, the hypervisor bit and the KVM signature leaf, and zeroes for what this VMM does not
emulate (thermal/power management, the architectural PMU). :class:`CpuidEntry` is the one
plain-data ``struct kvm_cpuid_entry2`` of the VMM (``kvm.CpuidEntry`` is this class).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1

LEAF1_ECX_TSC_DEADLINE = 1 << 24
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_ECX_MONITOR = 1 << 3
LEAF1_EDX_HTT = 1 << 28
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_CPUID_FEATURES = 0x4000_0001

TOPO_TYPE_SMT = 1
TOPO_TYPE_CORE = 2


@dataclass(frozen=True)
class CpuidEntry:
    """The fields of ``struct kvm_cpuid_entry2``."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> CpuidEntry:
        return cls(**d)


def _shift_for(count: int) -> int:
    """Bits of APIC id needed to number ``count`` things (ceil(log2))."""
    return max(0, (count - 1).bit_length())


def _topology(function: int, cpu: int, count: int) -> list[CpuidEntry]:
    core_shift = _shift_for(count)
    flag = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return [
        CpuidEntry(function, 0, flag, 0, 1, (TOPO_TYPE_SMT << 8) | 0, cpu),
        CpuidEntry(function, 1, flag, core_shift, count, (TOPO_TYPE_CORE << 8) | 1, cpu),
        CpuidEntry(function, 2, flag, 0, 0, 2, cpu),
    ]


def normalise(
    supported: list[CpuidEntry],
    cpu: int,
    count: int,
    *,
    tsc_deadline: bool = True,
) -> list[CpuidEntry]:
    """The CPUID table for vCPU ``cpu`` of ``count``, from KVM_GET_SUPPORTED_CPUID's entries."""
    if not 0 <= cpu < count <= 255:
        raise ValueError(f"vCPU {cpu} of {count}")
    out: list[CpuidEntry] = []
    topo_done: set[int] = set()
    have_hypervisor_leaf = False
    for e in supported:
        f = e.function
        if f == 1:
            ebx = (e.ebx & 0xFFFF) & ~0xFF00 | (8 << 8)  # CLFLUSH line size: 8 quadwords
            ebx |= (cpu << 24) | (min(count, 255) << 16)
            ecx = e.ecx | LEAF1_ECX_HYPERVISOR
            ecx = ecx | LEAF1_ECX_TSC_DEADLINE if tsc_deadline else ecx & ~LEAF1_ECX_TSC_DEADLINE
            ecx &= ~LEAF1_ECX_MONITOR  # MONITOR/MWAIT are not offered to the guest
            edx = e.edx | LEAF1_EDX_HTT if count > 1 else e.edx & ~LEAF1_EDX_HTT
            e = replace(e, ebx=ebx, ecx=ecx, edx=edx)
        elif f == 4:
            # Intel cache parameters: EAX[31:26] cores per package - 1; EAX[25:14] threads
            # sharing this cache - 1 (only the last level, type 3, is shared here).
            eax = e.eax & 0x3FFF
            if e.eax & 0x1F:  # a real cache level (type != 0)
                level = (e.eax >> 5) & 0x7
                sharing = count - 1 if level >= 3 else 0
                eax |= ((count - 1) << 26) | (sharing << 14)
            e = replace(e, eax=eax)
        elif f in (6, 0xA):
            e = replace(e, eax=0, ebx=0, ecx=0, edx=0)
        elif f in (0xB, 0x1F):
            if f not in topo_done:
                topo_done.add(f)
                out.extend(_topology(f, cpu, count))
            continue
        elif f == 0x4000_0000:
            have_hypervisor_leaf = True
            sig = KVM_SIGNATURE
            e = replace(
                e,
                eax=max(e.eax, KVM_CPUID_FEATURES),
                ebx=int.from_bytes(sig[0:4], "little"),
                ecx=int.from_bytes(sig[4:8], "little"),
                edx=int.from_bytes(sig[8:12], "little"),
            )
        elif f == 0x8000_0008:
            # AMD: ECX[7:0] NC = cores - 1, ECX[15:12] ApicIdCoreIdSize.
            ecx = (e.ecx & ~0xF0FF) | ((count - 1) & 0xFF) | (_shift_for(count) << 12)
            e = replace(e, ecx=ecx)
        elif f == 0x8000_001E:
            # AMD extended APIC id / compute unit / node: one core per unit, node 0.
            e = replace(e, eax=cpu, ebx=cpu & 0xFF, ecx=0)
        out.append(e)
    if not have_hypervisor_leaf:
        sig = KVM_SIGNATURE
        out.append(
            CpuidEntry(
                0x4000_0000,
                eax=max([0x4000_0000] + [x.function for x in out if x.function >> 8 == 0x40_0000]),
                ebx=int.from_bytes(sig[0:4], "little"),
                ecx=int.from_bytes(sig[4:8], "little"),
                edx=int.from_bytes(sig[8:12], "little"),
            )
        )
    return out


def find(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    for e in entries:
        if e.function == function and (
            e.index == index or not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        ):
            return e
    return None
