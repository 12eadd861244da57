"""hvf.py's cffi declarations (and the SIMD shim's stand-in header, hvf_simd.STANDIN_HEADER)
against Apple's published signatures (hvf_signatures.txt): every declared function exists there
with the same argument count, and every listed one is declared."""

from __future__ import annotations

import re
from pathlib import Path

import pycparser
from pycparser import c_ast

from pytest_ignition.vmm.hypervisor import hvf, hvf_simd

LIST = Path(__file__).with_name("hvf_signatures.txt")
# pycparser knows no stdint/stdbool: give it the basic types cffi provides implicitly.
PRELUDE = """
typedef int int32_t; typedef unsigned int uint32_t; typedef unsigned short uint16_t;
typedef unsigned long long uint64_t; typedef unsigned long size_t; typedef _Bool bool;
"""


def published() -> dict[str, int]:
    out = {}
    for line in LIST.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, argc = line.split()[:2]
            out[name] = int(argc)
    return out


def declared(cdef: str) -> dict[str, int]:
    ast = pycparser.CParser().parse(PRELUDE + cdef)
    out = {}
    for node in ast.ext:
        if isinstance(node, c_ast.Decl) and isinstance(node.type, c_ast.FuncDecl):
            params = node.type.args.params if node.type.args else []
            void = (
                len(params) == 1
                and isinstance(params[0], c_ast.Typename)
                and getattr(params[0].type.type, "names", None) == ["void"]
            )
            out[node.name] = 0 if void else len(params)
    return out


def shim_declarations() -> str:
    """hvf_simd.py's stand-in for the SDK header (the two SIMD register functions the C shim
    calls), without the preprocessor lines and gcc's vector attribute pycparser cannot read."""
    text = "\n".join(
        line for line in hvf_simd.STANDIN_HEADER.splitlines() if not line.startswith("#")
    )
    return "typedef unsigned char uint8_t;\n" + re.sub(
        r"__attribute__\(\(vector_size\(16\)\)\)", "", text
    )


def test_every_declared_function_matches_apples_signature() -> None:
    mine, apple = {**declared(hvf.CDEF), **declared(shim_declarations())}, published()
    assert len(mine) >= 32 and "hv_vcpu_set_simd_fp_reg" in mine
    wrong = {n: (c, apple.get(n)) for n, c in mine.items() if apple.get(n) != c}
    assert not wrong, f"(declared, published) argument counts differ: {wrong}"
    assert set(apple) == set(mine), f"listed but not declared: {set(apple) - set(mine)}"


def test_the_checker_sees_a_wrong_argument_count() -> None:
    broken = hvf.CDEF.replace(
        "hv_return_t hv_vm_unmap(hv_ipa_t ipa, size_t size);",
        "hv_return_t hv_vm_unmap(hv_ipa_t ipa);",
    )
    assert declared(broken)["hv_vm_unmap"] == 1 != published()["hv_vm_unmap"]


def test_cdef_is_accepted_by_cffi() -> None:
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(hvf.CDEF)
    ffi.cdef(hvf.LIBSYSTEM_CDEF)
    # The exit struct's layout is the header's: reason, then three u64 at offset 8.
    assert ffi.sizeof("hv_vcpu_exit_t") == 32
    assert ffi.offsetof("hv_vcpu_exit_t", "exception") == 8
    assert ffi.sizeof("hv_sys_reg_t") == 2 and ffi.sizeof("hv_vcpu_t") == 8


def test_loading_off_macos_says_why() -> None:
    import pytest

    with pytest.raises(hvf.HvfUnavailable, match="only on macOS"):
        hvf.load("Linux")
