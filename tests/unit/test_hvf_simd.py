"""The HVF SIMD/FP register shim (vmm/hypervisor/hvf_simd.py) without a Mac.

Executed here: the shim's C source compiled by this host's gcc (x86_64 Linux) against a stand-in
for <Hypervisor/Hypervisor.h> (the SDK's types, gcc's ``vector_size`` for clang's
``ext_vector_type``) together with a fake ``hv_vcpu_get/set_simd_fp_reg`` that keeps Q registers
in an array, and every register round-tripped through the shim's pointer-taking functions with
cffi in ABI mode, as the HVF backend calls them. The by-value vector argument is therefore passed
by gcc's x86_64 ABI here (in xmm0), not AAPCS64's v0: what this checks is the C, not Apple's ABI.
NOT executed: clang, Apple's SDK header, the framework. The build command and its cache are
tested with an injected runner.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cffi
import pytest

from pytest_ignition.vmm.hypervisor import hvf_simd

FAKE_HV = r"""
#include <Hypervisor/Hypervisor.h>
static hv_simd_fp_uchar16_t regs[32];
hv_return_t hv_vcpu_get_simd_fp_reg(hv_vcpu_t vcpu, hv_simd_fp_reg_t reg,
                                    hv_simd_fp_uchar16_t *value)
{
    if (vcpu != 7 || reg >= 32) return (hv_return_t)0xfae94003;
    *value = regs[reg];
    return HV_SUCCESS;
}
hv_return_t hv_vcpu_set_simd_fp_reg(hv_vcpu_t vcpu, hv_simd_fp_reg_t reg,
                                    hv_simd_fp_uchar16_t value)
{
    if (vcpu != 7 || reg >= 32) return (hv_return_t)0xfae94003;
    regs[reg] = value;
    return HV_SUCCESS;
}
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> tuple[cffi.FFI, object]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc on this host to compile the shim's C with")
    d: Path = tmp_path_factory.mktemp("hvf-simd")
    (d / "Hypervisor").mkdir()
    (d / "Hypervisor" / "Hypervisor.h").write_text(hvf_simd.STANDIN_HEADER)
    (d / "shim.c").write_text(hvf_simd.SOURCE)
    (d / "fake_hv.c").write_text(FAKE_HV)
    out = d / "libshim.so"
    cmd = [gcc, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
           "-I", str(d), "-o", str(out), str(d / "shim.c"), str(d / "fake_hv.c")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    ffi = cffi.FFI()
    ffi.cdef(hvf_simd.CDEF)
    return ffi, ffi.dlopen(str(out))


def test_every_q_register_round_trips_through_the_compiled_shim(shim) -> None:
    ffi, lib = shim
    values = [bytes((n * 7 + i * 13) & 0xFF for i in range(16)) for n in range(32)]
    for n, v in enumerate(values):
        buf = ffi.new("uint8_t[16]", v)
        assert lib.ign_hvf_set_simd_fp_reg(7, n, buf) == 0
    for n, v in enumerate(values):
        out = ffi.new("uint8_t[16]")
        assert lib.ign_hvf_get_simd_fp_reg(7, n, out) == 0
        assert bytes(ffi.buffer(out, 16)) == v, f"Q{n}"


def test_errors_pass_through_and_leave_the_buffer_alone(shim) -> None:
    ffi, lib = shim
    out = ffi.new("uint8_t[16]", b"\x5a" * 16)
    assert lib.ign_hvf_get_simd_fp_reg(7, 32, out) & 0xFFFFFFFF == 0xFAE94003
    assert bytes(ffi.buffer(out, 16)) == b"\x5a" * 16
    assert lib.ign_hvf_set_simd_fp_reg(8, 0, out) & 0xFFFFFFFF == 0xFAE94003
    lib.ign_fence()  # links and returns


def test_build_command_and_cache(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def run(cmd, **kw):
        calls.append(cmd)
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"dylib")
        return subprocess.CompletedProcess(cmd, 0, b"", b"")

    which = {"xcrun": "/usr/bin/xcrun"}.get
    path = hvf_simd.build(tmp_path, run=run, which=which)
    assert path.parent == tmp_path / "hvf" and path.name.startswith("simd-")
    assert path.suffix == ".dylib" and path.read_bytes() == b"dylib"
    (cmd,) = calls
    assert cmd[:2] == ["xcrun", "clang"]
    assert cmd[2:8] == ["-arch", "arm64", "-O2", "-Wall", "-Werror", "-dynamiclib"]
    assert cmd[8:10] == ["-framework", "Hypervisor"]
    assert cmd[-1].endswith(".c") and Path(cmd[-1]).parent == path.parent
    assert not Path(cmd[-1]).exists()  # the source is removed after the build
    assert hvf_simd.build(tmp_path, run=run, which=which) == path and len(calls) == 1  # cached
    # another compiler (or source) is another cache entry
    other = hvf_simd.shim_path(tmp_path, ["/opt/llvm/bin/clang"])
    assert other != path


def test_build_failures_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(hvf_simd.ShimError, match="xcode-select --install"):
        hvf_simd.build(tmp_path, which=lambda name: None)

    def failing(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, b"", b"shim.c:3: error: no Hypervisor.h")

    with pytest.raises(hvf_simd.ShimError, match="no Hypervisor.h"):
        hvf_simd.build(tmp_path, run=failing, which={"clang": "/usr/bin/clang"}.get)
    assert list((tmp_path / "hvf").iterdir()) == []  # nothing half-built is left


def test_compiler_prefers_xcrun() -> None:
    assert hvf_simd.compiler({"xcrun": "/usr/bin/xcrun", "clang": "/x"}.get) == ["xcrun", "clang"]
    assert hvf_simd.compiler({"clang": "/usr/local/bin/clang"}.get) == ["/usr/local/bin/clang"]
    assert hvf_simd.compiler(lambda n: None) is None


def test_check_q_refuses_bad_register_files() -> None:
    good = [bytes(16)] * 32
    assert hvf_simd.check_q(good) == good
    with pytest.raises(ValueError, match="32 Q registers"):
        hvf_simd.check_q(good[:5])
    with pytest.raises(ValueError, match="Q1 is not 16 bytes"):
        hvf_simd.check_q([bytes(16), bytes(17)] + good[2:])
