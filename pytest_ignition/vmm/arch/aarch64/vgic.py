"""Saving and loading the in-kernel vGICv3 (what a snapshot of the aarch64 machine records).

KVM exposes the GIC's state as device attributes of the ``KVM_DEV_TYPE_ARM_VGIC_V3`` device
(Linux ``Documentation/virt/kvm/devices/arm-vgic-v3.rst``):

- ``GRP_DIST_REGS``: distributor registers by offset, 32 bits each (64-bit ``GICD_IROUTER``
  as two halves). Only the SPI part is state: with affinity routing the private interrupts
  (INTID 0-31) live in the redistributors.
- ``GRP_REDIST_REGS``: per vCPU (``attr = mpidr << 32 | offset``), the SGI/PPI frame
  (``SGI_base`` = +64 KiB): groups, enables, pending, active, priorities, configuration.
- ``GRP_CPU_SYSREGS``: per vCPU, the ``ICC_*_EL1`` CPU interface (64-bit values,
  ``attr = mpidr << 32 | sysreg encoding``); the active-priority registers that exist depend
  on the implemented priority bits (``ICC_CTLR_EL1.PRIbits``, :func:`apr_count`).
- ``GRP_LEVEL_INFO``: the input line level of level-sensitive SPIs (a 32-bit bitmap per 32
  INTIDs), which the pending bits alone do not carry.

Set/clear register pairs are loaded by clearing every bit and then setting the saved ones, so
loading over a VM that ran (an in-place rollback) leaves nothing of its later state. The vGIC
must be initialised (``KVM_DEV_ARM_VGIC_CTRL_INIT``) and the vCPU registers (MPIDR) loaded
first; no vCPU may be running. Firecracker (``arch/aarch64/gic/gicv3/regs``) and QEMU
(``hw/intc/arm_gicv3_kvm.c``) save the same registers.
"""

from __future__ import annotations

from typing import Any

from ... import kvm_arm64 as k
from ...hypervisor.kvm import KvmError

# -- distributor ------------------------------------------------------------------------
GICD_CTLR = 0x0000
GICD_IGROUPR = 0x0080
GICD_ISENABLER = 0x0100
GICD_ICENABLER = 0x0180
GICD_ISPENDR = 0x0200
GICD_ICPENDR = 0x0280
GICD_ISACTIVER = 0x0300
GICD_ICACTIVER = 0x0380
GICD_IPRIORITYR = 0x0400
GICD_ICFGR = 0x0C00
GICD_IGRPMODR = 0x0D00
GICD_IROUTER = 0x6000

# -- redistributor (SGI_base frame) ------------------------------------------------------
SGI_BASE = 0x1_0000
GICR_CTLR = 0x0000
GICR_IGROUPR0 = SGI_BASE + 0x0080
GICR_ISENABLER0 = SGI_BASE + 0x0100
GICR_ICENABLER0 = SGI_BASE + 0x0180
GICR_ISPENDR0 = SGI_BASE + 0x0200
GICR_ICPENDR0 = SGI_BASE + 0x0280
GICR_ISACTIVER0 = SGI_BASE + 0x0300
GICR_ICACTIVER0 = SGI_BASE + 0x0380
GICR_IPRIORITYR0 = SGI_BASE + 0x0400
GICR_ICFGR0 = SGI_BASE + 0x0C00
GICR_IGRPMODR0 = SGI_BASE + 0x0D00


def _icc(crn: int, crm: int, op2: int) -> int:
    """The sysreg encoding of ``ICC_*_EL1`` (op0 3, op1 0) as the CPU_SYSREGS attr wants it."""
    return 3 << 14 | 0 << 11 | crn << 7 | crm << 3 | op2


# In load order: SRE before the rest (it selects the system-register interface), CTLR before
# the priority state, enables last.
ICC_REGS: tuple[tuple[str, int], ...] = (
    ("sre", _icc(12, 12, 5)),
    ("ctlr", _icc(12, 12, 4)),
    ("pmr", _icc(4, 6, 0)),
    ("bpr0", _icc(12, 8, 3)),
    ("bpr1", _icc(12, 12, 3)),
    *((f"ap0r{n}", _icc(12, 8, 4 + n)) for n in range(4)),
    *((f"ap1r{n}", _icc(12, 9, n)) for n in range(4)),
    ("igrpen0", _icc(12, 12, 6)),
    ("igrpen1", _icc(12, 12, 7)),
)


def apr_count(icc_ctlr: int) -> int:
    """How many ``ICC_AP0R<n>``/``ICC_AP1R<n>`` exist, from ``ICC_CTLR_EL1.PRIbits`` (bits 10:8,
    priority bits - 1): 1 for 5 bits, 2 for 6, 4 for 7. KVM lists all four (``HAS_DEVICE_ATTR``)
    but refuses the ones past the implemented priority bits (EINVAL)."""
    pri_bits = ((icc_ctlr >> 8) & 7) + 1
    return 1 if pri_bits <= 5 else 2 if pri_bits == 6 else 4


LEVEL_INFO_SHIFT = 10  # KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT; VGIC_LEVEL_INFO_LINE_LEVEL = 0


def _bit_regs(base: int, nr_irqs: int, first_irq: int = 32) -> list[int]:
    """Offsets of a one-bit-per-INTID register array from ``first_irq`` up to ``nr_irqs``."""
    return [base + 4 * (irq // 32) for irq in range(first_irq, nr_irqs, 32)]


def _dist_plain(nr_irqs: int) -> list[int]:
    """Distributor registers saved and loaded as they are (no set/clear pair)."""
    regs = _bit_regs(GICD_IGROUPR, nr_irqs)
    regs += [GICD_ICFGR + 4 * (irq // 16) for irq in range(32, nr_irqs, 16)]
    regs += [GICD_IPRIORITYR + irq for irq in range(32, nr_irqs, 4)]
    regs += [GICD_IROUTER + 8 * irq + half for irq in range(32, nr_irqs) for half in (0, 4)]
    regs += _bit_regs(GICD_IGRPMODR, nr_irqs)
    return regs


# (set register, clear register) pairs
_DIST_PAIRS = (
    (GICD_ISENABLER, GICD_ICENABLER),
    (GICD_ISPENDR, GICD_ICPENDR),
    (GICD_ISACTIVER, GICD_ICACTIVER),
)
_REDIST_PLAIN = (
    GICR_IGROUPR0,
    *(GICR_IPRIORITYR0 + 4 * n for n in range(8)),
    GICR_ICFGR0,
    GICR_ICFGR0 + 4,
    GICR_IGRPMODR0,
)
_REDIST_PAIRS = (
    (GICR_ISENABLER0, GICR_ICENABLER0),
    (GICR_ISPENDR0, GICR_ICPENDR0),
    (GICR_ISACTIVER0, GICR_ICACTIVER0),
)


def _get(gic: k.VgicV3, group: int, attr: int, wide: bool = False) -> int:
    try:
        return gic.get_attr_u64(group, attr) if wide else gic.get_attr_u32(group, attr)
    except KvmError as e:
        raise KvmError(e.ioctl, e.errno, f"vGIC group {group} attr {attr:#x}") from None


def _present(gic: k.VgicV3, group: int, attrs: list[int]) -> list[int]:
    """The attributes of ``attrs`` this vGIC has (``KVM_HAS_DEVICE_ATTR``), asked once per
    vGIC and group: which registers exist depends on the emulated GIC, not on its state."""
    cache: dict[tuple[int, tuple[int, ...]], list[int]] = gic.__dict__.setdefault(
        "_ignition_present", {}
    )
    key = (group, tuple(attrs))
    if key not in cache:
        cache[key] = [a for a in attrs if gic.has_attr(group, a)]
    return cache[key]


def save(gic: k.VgicV3, mpidrs: list[int], nr_irqs: int) -> dict[str, Any]:
    """The vGIC's state as plain data (ints, lists): distributor, per-vCPU redistributor and
    CPU interface, SPI line levels. The vCPUs must be paused. Registers KVM does not have
    (``KVM_HAS_DEVICE_ATTR``) are left out, and :func:`load` then leaves them alone."""
    g_dist, g_redist = k.KVM_DEV_ARM_VGIC_GRP_DIST_REGS, k.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS
    offsets = [GICD_CTLR, *_dist_plain(nr_irqs)]
    offsets += [off for set_off, _ in _DIST_PAIRS for off in _bit_regs(set_off, nr_irqs)]
    dist = [[off, _get(gic, g_dist, off)] for off in _present(gic, g_dist, offsets)]
    cpus = []
    for mpidr in mpidrs:
        attrs = [
            k.redist_attr(mpidr, off) for off in (*_REDIST_PLAIN, *(s for s, _ in _REDIST_PAIRS))
        ]
        redist = [[a & 0xFFFF_FFFF, _get(gic, g_redist, a)] for a in _present(gic, g_redist, attrs)]
        g_icc = k.KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS
        ctlr = _get(gic, g_icc, k.redist_attr(mpidr, dict(ICC_REGS)["ctlr"]), wide=True)
        names = {
            k.redist_attr(mpidr, enc): name
            for name, enc in ICC_REGS
            if not name.startswith("ap") or int(name[-1]) < apr_count(ctlr)
        }
        icc = [
            [names[a], _get(gic, g_icc, a, wide=True)] for a in _present(gic, g_icc, list(names))
        ]
        cpus.append({"mpidr": mpidr, "redist": redist, "icc": icc})
    g_lvl = k.KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO
    # SPIs are not per vCPU: any valid mpidr will do
    lvl_attrs = [k.redist_attr(mpidrs[0], base) for base in range(32, nr_irqs, 32)]
    levels = [[a & 0x3FF, _get(gic, g_lvl, a)] for a in _present(gic, g_lvl, lvl_attrs)]
    return {"nr_irqs": nr_irqs, "dist": dist, "cpus": cpus, "levels": levels}


def load(gic: k.VgicV3, state: dict[str, Any]) -> None:
    """Load :func:`save`'s output into an initialised vGIC whose vCPUs exist (and hold their
    MPIDRs). Raises ValueError for a state of another shape, KvmError when KVM refuses."""
    try:
        nr_irqs = int(state["nr_irqs"])
        dist = {int(o): int(v) for o, v in state["dist"]}
        cpus = [
            (
                int(c["mpidr"]),
                {int(o): int(v) for o, v in c["redist"]},
                {str(n): int(v) for n, v in c["icc"]},
            )
            for c in state["cpus"]
        ]
        levels = [(int(b), int(v)) for b, v in state["levels"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"vGIC state: {e!r}") from None

    def put(group: int, attr: int, value: int, wide: bool = False) -> None:
        try:
            if wide:
                gic.set_attr_u64(group, attr, value)
            else:
                gic.set_attr_u32(group, attr, value)
        except KvmError as e:
            raise KvmError(e.ioctl, e.errno, f"vGIC group {group} attr {attr:#x}") from None

    g_dist, g_redist = k.KVM_DEV_ARM_VGIC_GRP_DIST_REGS, k.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS
    # the distributor disabled while it is rewritten, enabled (CTLR) last
    if GICD_CTLR in dist:
        put(g_dist, GICD_CTLR, 0)
    for off in _dist_plain(nr_irqs):
        if off in dist:
            put(g_dist, off, dist[off])
    for set_off, clear_off in _DIST_PAIRS:
        for s, c in zip(_bit_regs(set_off, nr_irqs), _bit_regs(clear_off, nr_irqs), strict=True):
            if s in dist:
                put(g_dist, c, 0xFFFF_FFFF)
                put(g_dist, s, dist[s])
    for mpidr, redist, icc in cpus:
        for off in _REDIST_PLAIN:
            if off in redist:
                put(g_redist, k.redist_attr(mpidr, off), redist[off])
        for s, c in _REDIST_PAIRS:
            if s in redist:
                put(g_redist, k.redist_attr(mpidr, c), 0xFFFF_FFFF)
                put(g_redist, k.redist_attr(mpidr, s), redist[s])
        for name, enc in ICC_REGS:
            if name in icc:
                put(k.KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, k.redist_attr(mpidr, enc), icc[name], True)
    if cpus:
        for base, value in levels:
            put(k.KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, k.redist_attr(cpus[0][0], base), value)
    if GICD_CTLR in dist:
        put(g_dist, GICD_CTLR, dist[GICD_CTLR])


__all__ = ["ICC_REGS", "KvmError", "load", "save"]
