"""The aarch64 machine's state code without arm64 KVM: the vGIC register walk against a fake
device, vCPU register loading order and refusals, memory barriers, the pre-parsed arm64 cdef."""

from __future__ import annotations

import zlib

import pytest

from pytest_ignition.vmm import _kvm_arm64_ffi, _kvm_ffi_build, barrier, kvm
from pytest_ignition.vmm import kvm_arm64 as k
from pytest_ignition.vmm._kvm_arm64_cdef import CDEF
from pytest_ignition.vmm.arch.aarch64 import machine as am
from pytest_ignition.vmm.arch.aarch64 import vgic
from pytest_ignition.vmm.hypervisor import kvm_aarch64


class FakeGic:
    """A vGIC whose attributes are a dict; set/clear pairs behave as the hardware's."""

    def __init__(self, missing: set[int] = frozenset()) -> None:
        self.regs: dict[tuple[int, int], int] = {}
        self.writes: list[tuple[int, int, int]] = []
        self.missing = missing

    def _clear_target(self, group: int, attr: int) -> tuple[int, int] | None:
        off = attr & 0xFFFF_FFFF
        hi = attr & ~0xFFFF_FFFF
        pairs = (
            vgic._DIST_PAIRS if group == k.KVM_DEV_ARM_VGIC_GRP_DIST_REGS else vgic._REDIST_PAIRS
        )
        for s, c in pairs:
            if group == k.KVM_DEV_ARM_VGIC_GRP_DIST_REGS and c <= off < c + 0x80:
                return group, s + (off - c)
            if group == k.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS and off == c:
                return group, hi | s
        return None

    def _is_set_reg(self, group: int, attr: int) -> bool:
        off = attr & 0xFFFF_FFFF
        pairs = (
            vgic._DIST_PAIRS if group == k.KVM_DEV_ARM_VGIC_GRP_DIST_REGS else vgic._REDIST_PAIRS
        )
        if group == k.KVM_DEV_ARM_VGIC_GRP_DIST_REGS:
            return any(s <= off < s + 0x80 for s, _ in pairs)
        return group == k.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS and any(off == s for s, _ in pairs)

    def set_attr_u32(self, group: int, attr: int, value: int) -> None:
        self.writes.append((group, attr, value))
        target = self._clear_target(group, attr)
        if target is not None:  # a write-1-to-clear register
            self.regs[target] = self.regs.get(target, 0) & ~value
        elif self._is_set_reg(group, attr):  # write-1-to-set
            self.regs[(group, attr)] = self.regs.get((group, attr), 0) | value
        else:
            self.regs[(group, attr)] = value

    set_attr_u64 = set_attr_u32

    def get_attr_u32(self, group: int, attr: int) -> int:
        return self.regs.get((group, attr), 0)

    get_attr_u64 = get_attr_u32

    def has_attr(self, group: int, attr: int) -> bool:
        return (attr & 0xFFFF) not in self.missing


def _fill(gic: FakeGic, seed: int) -> None:
    """Give every register vgic.save reads a distinct value."""
    state = vgic.save(gic, [0, 1], 128)
    n = seed
    for off, _ in state["dist"]:
        n += 1
        gic.regs[(k.KVM_DEV_ARM_VGIC_GRP_DIST_REGS, off)] = n * 2654435761 & 0xFFFF_FFFF
    for mpidr in (0, 1):
        for off, _ in state["cpus"][mpidr]["redist"]:
            n += 1
            attr = k.redist_attr(mpidr, off)
            gic.regs[(k.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, attr)] = n * 40503 & 0xFFFF_FFFF
        for _, enc in vgic.ICC_REGS:
            n += 1
            gic.regs[(k.KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, k.redist_attr(mpidr, enc))] = n
    for base in (32, 64, 96):
        n += 1
        gic.regs[(k.KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, k.redist_attr(0, base))] = n


def test_vgic_state_round_trips_over_a_gic_that_ran() -> None:
    src = FakeGic()
    _fill(src, 1)
    saved = vgic.save(src, [0, 1], 128)
    dst = FakeGic()
    _fill(dst, 999)  # later state of the same VM (an in-place rollback target)
    vgic.load(dst, saved)
    assert vgic.save(dst, [0, 1], 128) == saved


def test_vgic_state_covers_the_spis_and_each_vcpu() -> None:
    saved = vgic.save(FakeGic(), [0, 0x101], 128)
    dist_offsets = {off for off, _ in saved["dist"]}
    # SPIs 32..127: one enable word per 32, priority bytes 4 per register, two router halves each
    assert {vgic.GICD_ISENABLER + 4, vgic.GICD_ISENABLER + 12} <= dist_offsets
    assert vgic.GICD_ISENABLER not in dist_offsets  # INTIDs 0-31 live in the redistributors
    assert vgic.GICD_IROUTER + 8 * 127 + 4 in dist_offsets
    assert [c["mpidr"] for c in saved["cpus"]] == [0, 0x101]
    assert [b for b, _ in saved["levels"]] == [32, 64, 96]


def test_vgic_load_enables_the_distributor_last_and_clears_before_setting() -> None:
    src = FakeGic()
    _fill(src, 5)
    saved = vgic.save(src, [0], 128)
    dst = FakeGic()
    vgic.load(dst, saved)
    g = k.KVM_DEV_ARM_VGIC_GRP_DIST_REGS
    assert dst.writes[0] == (g, vgic.GICD_CTLR, 0)
    assert dst.writes[-1][:2] == (g, vgic.GICD_CTLR)
    i_clear = dst.writes.index((g, vgic.GICD_ICPENDR + 4, 0xFFFF_FFFF))
    i_set = next(i for i, w in enumerate(dst.writes) if w[:2] == (g, vgic.GICD_ISPENDR + 4))
    assert i_clear < i_set


@pytest.mark.parametrize("pri_bits,count", [(5, 1), (6, 2), (7, 4)])
def test_vgic_saves_the_active_priority_registers_the_cpu_has(pri_bits: int, count: int) -> None:
    gic = FakeGic()
    ctlr = dict(vgic.ICC_REGS)["ctlr"]
    gic.regs[(k.KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, ctlr)] = (pri_bits - 1) << 8
    saved = vgic.save(gic, [0], 128)
    names = [n for n, _ in saved["cpus"][0]["icc"]]
    assert [n for n in names if n.startswith("ap0")] == [f"ap0r{i}" for i in range(count)]
    assert [n for n in names if n.startswith("ap1")] == [f"ap1r{i}" for i in range(count)]
    assert names[0] == "sre"


def test_vgic_leaves_out_registers_kvm_lacks() -> None:
    pmr = dict(vgic.ICC_REGS)["pmr"]
    saved = vgic.save(FakeGic({pmr}), [0], 128)
    assert "pmr" not in [n for n, _ in saved["cpus"][0]["icc"]]


def test_vgic_load_rejects_a_state_of_another_shape() -> None:
    with pytest.raises(ValueError, match="vGIC state"):
        vgic.load(FakeGic(), {"dist": []})


def test_icc_encodings_match_the_architecture() -> None:
    enc = dict(vgic.ICC_REGS)
    assert enc["pmr"] == 0xC230  # ICC_PMR_EL1 (hv_sys_reg_t numbering, the same encoding)
    assert enc["igrpen1"] == 0xC667
    assert enc["sre"] == 0xC665


class FakeVcpu:
    index = 0
    fd = -1

    def __init__(self) -> None:
        self.mp = None

    def set_mp_state(self, state: int) -> None:
        self.mp = state


def test_vcpu_load_sets_mpidr_first_and_tolerates_unchanged_refusals(monkeypatch) -> None:
    order: list[int] = []
    refused = {k.core_reg("x3")}
    current = {k.core_reg("x3"): 9}

    def set_reg(fd: int, reg_id: int, value: int) -> None:
        if reg_id in refused:
            raise kvm.KvmError("KVM_SET_ONE_REG", 16)
        order.append(reg_id)

    monkeypatch.setattr(k, "set_one_reg", set_reg)
    monkeypatch.setattr(k, "get_one_reg", lambda fd, reg_id: current[reg_id])
    state = {
        "regs": [
            [f"{k.core_reg('pc'):#x}", 1],
            [f"{k.core_reg('x3'):#x}", 9],
            [f"{k.MPIDR_EL1:#x}", 0x8000_0000],
        ],  # fmt: skip
        "mp_state": 0,
    }
    v = FakeVcpu()
    assert kvm_aarch64.load_vcpu(v, state, during="test") == 2
    assert order == [k.MPIDR_EL1, k.core_reg("pc")]
    assert v.mp == 0
    current[k.core_reg("x3")] = 10  # a refusal of a different value is an error
    with pytest.raises(ValueError, match="refused register"):
        kvm_aarch64.load_vcpu(v, state, during="test")


def test_barriers_are_callable_and_a_real_fence_here() -> None:
    barrier.mb()
    barrier.rmb()
    barrier.wmb()
    if barrier.ARCH in ("x86_64", "aarch64"):
        assert barrier.HAVE_FENCE
    if barrier.ARCH == "x86_64":
        assert barrier.rmb is barrier.wmb is barrier._noop  # TSO: only store->load needs it


def test_arm64_cdef_is_pre_parsed_and_current() -> None:
    assert _kvm_arm64_ffi.CDEF_CRC32 == zlib.crc32(CDEF.encode())
    assert k.ffi is _kvm_arm64_ffi.ffi
    committed = _kvm_ffi_build.ARM64_TARGET.read_text()
    assert committed == _kvm_ffi_build.generate(CDEF, _kvm_ffi_build.ARM64_MODULE)


def test_arm64_check_kernel_file_says_what_the_file_is(tmp_path) -> None:
    p = tmp_path / "Image.gz"
    p.write_bytes(b"\x1f\x8b" + bytes(100))
    with pytest.raises(am.MachineError, match="gzip"):
        am.check_kernel_file(str(p))
