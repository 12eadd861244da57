"""The committed out-of-line cffi module (_kvm_ffi.py) is exactly what its cdef generates."""

from __future__ import annotations

import zlib

import pytest

from pytest_ignition.vmm import _kvm_ffi, _kvm_ffi_build, kvm
from pytest_ignition.vmm._kvm_cdef import CDEF, EXPECTED_SIZES


def test_committed_module_matches_a_fresh_generation():
    committed = _kvm_ffi_build.TARGET.read_text()
    assert committed == _kvm_ffi_build.generate(), (
        "pytest_ignition/vmm/_kvm_ffi.py is stale: run python -m pytest_ignition.vmm._kvm_ffi_build"
    )


def test_check_mode_agrees(capsys):
    assert _kvm_ffi_build.main(["--check"]) == 0


def test_kvm_uses_the_pre_parsed_declarations():
    assert _kvm_ffi.CDEF_CRC32 == zlib.crc32(CDEF.encode())
    assert kvm.ffi is _kvm_ffi.ffi


def test_a_different_cdef_gives_a_different_module():
    changed = CDEF.replace("__u32 slot;", "__u64 slot;", 1)
    assert changed != CDEF
    assert _kvm_ffi_build.generate(changed) != _kvm_ffi_build.generate()


@pytest.mark.parametrize("ctype,size", sorted(EXPECTED_SIZES.items()))
def test_pre_parsed_and_run_time_parsed_layouts_agree(ctype, size):
    import cffi

    parsed = cffi.FFI()
    parsed.cdef(CDEF)
    assert _kvm_ffi.ffi.sizeof(ctype) == parsed.sizeof(ctype) == size


def test_stale_module_falls_back_to_parsing(monkeypatch, caplog):
    monkeypatch.setattr(_kvm_ffi, "CDEF_CRC32", _kvm_ffi.CDEF_CRC32 ^ 1)
    with caplog.at_level("WARNING"):
        ffi = kvm._load_ffi()
    assert ffi is not _kvm_ffi.ffi
    assert ffi.sizeof("struct kvm_run") == _kvm_ffi.ffi.sizeof("struct kvm_run")
    assert "out of date" in caplog.text
