"""The HVF backend's logic that needs no Mac: ESR_EL2 data-abort decoding, PSCI, the vtimer mask
protocol and WFI deadline, 16 KiB mapping rules, the snapshot state's round trip, the codesign
command; and HvfVcpu's exit dispatch driven by a fake framework (a stand-in for hv_* calls only,
no guest: the real framework has not been run)."""

from __future__ import annotations

import json
import plistlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_ignition.vmm.hypervisor import arm64_exits as ax
from pytest_ignition.vmm.hypervisor import hvf, hvf_sign


def dabt(
    *, sas: int, srt: int, wnr: bool, sse: bool = False, sf: bool = True, isv: bool = True
) -> int:
    """An ESR_EL2 for a lower-EL data abort, built from the Arm ARM's field positions."""
    esr = ax.EC_DABT_LOWER << 26 | 1 << 25  # IL: 32-bit instruction
    esr |= int(isv) << 24 | sas << 22 | int(sse) << 21 | srt << 16 | int(sf) << 15 | int(wnr) << 6
    return esr


@pytest.mark.parametrize("sas,size", [(0, 1), (1, 2), (2, 4), (3, 8)])
@pytest.mark.parametrize("wnr", [False, True])
def test_data_abort_every_size_and_register(sas: int, size: int, wnr: bool) -> None:
    for srt in range(32):
        a = ax.decode_data_abort(dabt(sas=sas, srt=srt, wnr=wnr))
        assert (a.size, a.srt, a.write, a.sixty_four) == (size, srt, wnr, True)


def test_store_value_is_truncated_and_xzr_stores_zero() -> None:
    reg = 0x1122_3344_5566_7788
    for sas, want in [(0, 0x88), (1, 0x7788), (2, 0x5566_7788), (3, reg)]:
        a = ax.decode_data_abort(dabt(sas=sas, srt=3, wnr=True))
        assert ax.mmio_write_value(a, reg) == want
    xzr = ax.decode_data_abort(dabt(sas=3, srt=31, wnr=True))
    assert ax.mmio_write_value(xzr, reg) == 0


def test_load_result_sign_extension_and_width() -> None:
    ldrb = ax.decode_data_abort(dabt(sas=0, srt=1, wnr=False))
    assert ax.mmio_read_result(ldrb, 0x1FF) == 0xFF  # truncated to the access size
    ldrsb_x = ax.decode_data_abort(dabt(sas=0, srt=1, wnr=False, sse=True, sf=True))
    assert ax.mmio_read_result(ldrsb_x, 0x80) == 0xFFFF_FFFF_FFFF_FF80
    assert ax.mmio_read_result(ldrsb_x, 0x7F) == 0x7F
    ldrsh_w = ax.decode_data_abort(dabt(sas=1, srt=1, wnr=False, sse=True, sf=False))
    assert ax.mmio_read_result(ldrsh_w, 0x8000) == 0xFFFF_8000  # W register: upper half zero
    ldrsw = ax.decode_data_abort(dabt(sas=2, srt=1, wnr=False, sse=True))
    assert ax.mmio_read_result(ldrsw, 0x8000_0000) == 0xFFFF_FFFF_8000_0000
    ldr_x = ax.decode_data_abort(dabt(sas=3, srt=30, wnr=False))
    assert ax.mmio_read_result(ldr_x, 0xDEAD_BEEF_0BAD_F00D) == 0xDEAD_BEEF_0BAD_F00D
    assert ax.mmio_read_result(ax.decode_data_abort(dabt(sas=2, srt=31, wnr=False)), 5) is None


def test_undecodable_aborts_are_refused() -> None:
    with pytest.raises(ax.GuestFault, match="valid syndrome"):
        ax.decode_data_abort(dabt(sas=2, srt=0, wnr=False, isv=False))
    with pytest.raises(ax.GuestFault, match="cache maintenance"):
        ax.decode_data_abort(dabt(sas=2, srt=0, wnr=True) | 1 << 8)
    with pytest.raises(ax.GuestFault, match="not a data abort"):
        ax.decode_data_abort(ax.EC_HVC64 << 26)


def test_pc_advance_hvc_not_smc_and_aborts_yes() -> None:
    assert ax.pc_advance(ax.EC_HVC64) == 0
    for ec in (ax.EC_SMC64, ax.EC_DABT_LOWER, ax.EC_WFX, ax.EC_SYSREG):
        assert ax.pc_advance(ec) == 4
    with pytest.raises(ax.GuestFault):
        ax.pc_advance(ax.EC_BRK64)


CPUS = {0x000: True, 0x100: False}  # MPIDR Aff1 = vCPU index
NEG = lambda c: c & (1 << 64) - 1  # noqa: E731


def test_psci_calls() -> None:
    call = lambda fn, a=0, b=0, c=0: ax.psci_call(fn, a, b, c, dict(CPUS))  # noqa: E731
    assert call(ax.PSCI_VERSION).x0 == 0x10000
    assert call(ax.PSCI_FEATURES, ax.PSCI_CPU_ON_64).x0 == 0
    assert call(ax.PSCI_FEATURES, ax.PSCI_CPU_SUSPEND_64).x0 == NEG(-1)
    assert call(ax.PSCI_SYSTEM_OFF).action == "system-off"
    assert call(ax.PSCI_SYSTEM_RESET).action == "system-reset"
    assert call(ax.PSCI_CPU_OFF).action == "off"
    on = call(ax.PSCI_CPU_ON_64, 0x100, 0x8020_0000, 0x1234)
    assert (on.x0, on.action, on.target, on.entry, on.context) == (
        0,
        "cpu-on",
        0x100,
        0x8020_0000,
        0x1234,
    )
    assert call(ax.PSCI_CPU_ON_64, 0x000, 0x8020_0000).x0 == NEG(ax.PSCI_ALREADY_ON)
    assert call(ax.PSCI_CPU_ON_64, 0x200, 0x8020_0000).x0 == NEG(ax.PSCI_INVALID_PARAMETERS)
    on32 = call(ax.PSCI_CPU_ON_32, 0x100, 0xFFFF_FFFF_8000_0000, 0)
    assert on32.entry == 0x8000_0000
    assert call(ax.PSCI_AFFINITY_INFO_64, 0x000).x0 == ax.AFFINITY_ON
    assert call(ax.PSCI_AFFINITY_INFO_64, 0x100).x0 == ax.AFFINITY_OFF
    assert call(ax.PSCI_AFFINITY_INFO_64, 0x100, 1).x0 == NEG(ax.PSCI_INVALID_PARAMETERS)
    assert call(ax.PSCI_MIGRATE_INFO_TYPE).x0 == 2
    assert call(0x8400_0042).x0 == NEG(ax.PSCI_NOT_SUPPORTED)
    # The upper 32 bits of x0 are not part of an SMC32 function id.
    assert call(0xFFFF_FFFF_0000_0000 | ax.PSCI_VERSION).x0 == 0x10000


def test_vtimer_mask_protocol() -> None:
    t = ax.Vtimer()
    firing = ax.CNTV_ENABLE | ax.CNTV_ISTATUS
    assert t.sync(firing) == []  # nothing masked yet: nothing to do
    assert t.activated() == [("irq", True)] and t.masked and t.line
    assert t.sync(firing) == []  # guest has not serviced it: stays masked, line high
    assert t.sync(firing | ax.CNTV_IMASK) == [("irq", False), ("mask", False)]
    assert not t.masked and not t.line
    t.activated()
    assert t.sync(ax.CNTV_ENABLE) == [("irq", False), ("mask", False)]  # re-armed (ISTATUS 0)
    t.activated()
    assert t.sync(0) == [("irq", False), ("mask", False)]  # disabled


def test_wfi_sleeps_until_the_deadline_or_a_kick() -> None:
    on = ax.CNTV_ENABLE
    assert ax.wfi_ticks(on, cval=1_000, now=400) == 600
    assert ax.wfi_ticks(on, cval=1_000, now=2_000) == 0
    assert ax.wfi_ticks(0, cval=1_000, now=0) is None  # no timer: until an interrupt (kick)
    assert ax.wfi_ticks(on | ax.CNTV_IMASK, cval=1_000, now=0) is None


def test_16k_granule_rules() -> None:
    g = 16 * 1024
    hvf.check_mapping(0x8000_0000, 0x1_0000_0000, 256 * 1024 * 1024)
    hvf.check_mapping(g, 2 * g, g)
    with pytest.raises(ValueError, match=r"16 KiB granules.*guest address 0x80001000"):
        hvf.check_mapping(0x8000_1000, 0x1_0000_0000, g)
    with pytest.raises(ValueError, match=r"host address 0x1000"):
        hvf.check_mapping(0, 0x1000, g)
    with pytest.raises(ValueError, match=r"size 0x1000"):
        hvf.check_mapping(0, 0, 0x1000)
    with pytest.raises(ValueError, match="size 0"):
        hvf.check_mapping(0, 0, 0)


def sample_state() -> hvf.HvfState:
    v0 = hvf.VcpuState(
        regs={n: i * 0x1111 for i, n in enumerate(hvf.CORE_REGS)},
        sys_regs={n: (1 << 63) | i for i, n in enumerate(hvf.SYS_REGS)},
        icc_regs={"ICC_PMR_EL1": 0xF0, "ICC_IGRPEN1_EL1": 1},
        vtimer_offset=123_456_789,
        vtimer_masked=True,
        simd=[bytes((n * 16 + i) & 0xFF for i in range(16)) for n in range(32)],
    )
    v1 = hvf.VcpuState(
        {"pc": 0, "fpcr": 0x0300_0000, "fpsr": 0x8000_0011},
        {"MPIDR_EL1": 0x1},
        {},
        5,
        False,
        powered_on=False,
        simd=[b"\xff" * 15 + bytes([n]) for n in range(32)],
    )
    return hvf.HvfState([v0, v1], counter_at_save=10**12, gic_blob=bytes(range(256)) * 3)


def test_snapshot_state_round_trip_through_json() -> None:
    s = sample_state()
    text = json.dumps(s.to_dict())
    back = hvf.HvfState.from_dict(json.loads(text))
    assert back == s
    assert back.gic_blob == bytes(range(256)) * 3 and back.vcpus[1].powered_on is False
    # Q0-Q31 and FPCR/FPSR, byte for byte (format 2)
    assert back.vcpus[0].simd[31] == bytes((31 * 16 + i) & 0xFF for i in range(16))
    assert back.vcpus[1].simd[7] == b"\xff" * 15 + b"\x07"
    assert (back.vcpus[1].regs["fpcr"], back.vcpus[1].regs["fpsr"]) == (0x0300_0000, 0x8000_0011)
    assert back.format_version == 2


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.update(hypervisor="kvm"), "not an HVF"),
        (lambda d: d["vcpus"][0]["regs"].update(x99=1), "unknown register"),
        (lambda d: d["vcpus"][0]["sys_regs"].update(SCTLR_EL1=1 << 64), "64-bit"),
        (lambda d: d["vcpus"][0].update(vtimer_offset=-1), "vtimer_offset"),
        (lambda d: d.update(vcpus=[]), "no vCPUs"),
        (lambda d: d.update(gic_blob="not base64!"), None),
        (lambda d: d.update(format_version=1), "v2"),  # v1 had no SIMD registers
        (lambda d: d["vcpus"][0].update(simd=d["vcpus"][0]["simd"][:31]), "32 Q registers"),
        (lambda d: d["vcpus"][0]["simd"].__setitem__(3, "00" * 15), "Q3 is not 16 bytes"),
        (lambda d: d["vcpus"][1]["simd"].__setitem__(0, "zz" * 16), "simd"),
        (lambda d: d["vcpus"][1].pop("simd"), "simd"),
        (lambda d: d.update(vcpus=[7]), "not a mapping"),
    ],
)
def test_foreign_or_broken_state_is_refused(mutate, match: str | None) -> None:
    d = json.loads(json.dumps(sample_state().to_dict()))
    mutate(d)
    with pytest.raises(ValueError, match=match):
        hvf.HvfState.from_dict(d)


def test_restored_vtimer_offset_keeps_the_guest_counter() -> None:
    saved_offset, at_save, now = 1_000, 50_000, 90_000
    guest_at_save = at_save - saved_offset
    new = hvf.restored_vtimer_offset(saved_offset, at_save, now)
    assert now - new == guest_at_save


def test_sys_reg_encodings_match_the_research_notes() -> None:
    # hv_sys_reg_t values quoted in shared/research/arm64-and-hvf.md §5.1
    assert hvf.SYS_REGS["MPIDR_EL1"] == 0xC005
    assert hvf.SYS_REGS["SCTLR_EL1"] == 0xC080
    assert hvf.SYS_REGS["SP_EL1"] == 0xE208
    assert hvf.SYS_REGS["CNTV_CTL_EL0"] == 0xDF19
    assert hvf.SYS_REGS["CNTV_CVAL_EL0"] == 0xDF1A
    assert hvf.ICC_REGS["ICC_PMR_EL1"] == 0xC230 and hvf.ICC_REGS["ICC_IGRPEN1_EL1"] == 0xC667


def test_codesign_command_and_plist(tmp_path: Path) -> None:
    copy, plist = tmp_path / "python3-hvf", tmp_path / "hv.plist"
    assert hvf_sign.codesign_command(copy, plist) == [
        "codesign", "-s", "-", "--entitlements", str(plist), "-f", str(copy),
    ]  # fmt: skip
    text = hvf_sign.plist_text()
    assert "<key>com.apple.security.hypervisor</key>" in text and "<true/>" in text
    assert plistlib.loads(text.encode()) == {"com.apple.security.hypervisor": True}
    out = b"Executable=/x\n" + text.encode()
    assert hvf_sign.has_entitlement(out)
    assert not hvf_sign.has_entitlement(b"Executable=/x\n")
    no = plistlib.dumps({"com.apple.security.hypervisor": False})
    assert not hvf_sign.has_entitlement(no)


def test_interpreter_to_sign_prefers_the_framework_app(tmp_path: Path) -> None:
    app = "/Library/Frameworks/Python.framework/Versions/3.11/Resources/Python.app/Contents/MacOS/Python"
    got = hvf_sign.interpreter_to_sign(
        "/usr/local/bin/python3",
        "/Library/Frameworks/Python.framework/Versions/3.11",
        lambda p: p == app,
    )
    assert str(got) == app
    real = tmp_path / "python3.11"
    real.write_text("")
    link = tmp_path / "python"
    link.symlink_to(real)
    assert hvf_sign.interpreter_to_sign(str(link), str(tmp_path), lambda p: False) == real


def test_sign_runs_codesign_on_a_copy_and_checks_it_starts(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "python-real"
    src.write_bytes(b"\x7fELF fake")
    monkeypatch.setattr(hvf_sign, "interpreter_to_sign", lambda *a, **k: src)
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return SimpleNamespace(returncode=0, stdout=b"", stderr=b"")

    copy = hvf_sign.sign(tmp_path / "cache", run=run)
    assert copy.read_bytes() == src.read_bytes()
    assert calls[0][:5] == [
        "codesign",
        "-s",
        "-",
        "--entitlements",
        str(copy.parent / "hypervisor.entitlements"),
    ]
    assert calls[1][0] == str(copy)
    assert "com.apple.security.hypervisor" in (copy.parent / "hypervisor.entitlements").read_text()

    def failing(cmd, **kw):
        return SimpleNamespace(returncode=1, stdout=b"", stderr=b"codesign: not found")

    with pytest.raises(RuntimeError, match="xcode-select"):
        hvf_sign.sign(tmp_path / "cache2", run=failing)


def test_hv_denied_error_says_what_to_do() -> None:
    e = hvf.HvfError("hv_vm_create", 0xFAE94007 - (1 << 32))  # hv_return_t is signed
    assert "HV_DENIED" in str(e) and "--sign" in str(e)
