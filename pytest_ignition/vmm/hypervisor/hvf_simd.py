"""A C shim for the SIMD/FP registers Q0-Q31 of an HVF vCPU (and a memory fence), built at first use.

``hv_vcpu_set_simd_fp_reg(hv_vcpu_t, hv_simd_fp_reg_t, hv_simd_fp_uchar16_t)`` takes the register
value *by value*: a 16-byte vector type, which AAPCS64 passes in the SIMD register ``v0``, not in
``x`` registers as it would a struct of two ``uint64_t``. cffi's ABI mode (and ctypes) cannot make
that call, and no struct declaration imitates it. The getter takes a pointer and would be
callable from ABI mode, but both go through the shim so they are symmetric. QEMU
(``target/arm/hvf``) is C and calls both directly; the shim is that C: three functions taking
pointers, compiled by the Mac's ``clang`` against Apple's SDK header into a dylib under the cache
(``<cache>/hvf/simd-<hash>.dylib``, the hash of :data:`SOURCE` and the command), then opened by
the same ABI-mode cffi as the framework. ``ign_fence`` is a full barrier (``dmb ish``), because
``vmm/barrier.py`` cannot make an executable page on Apple silicon (W^X without ``MAP_JIT``).

``python -m pytest_ignition.vmm doctor`` reports whether a compiler is there (the Xcode
command-line tools: ``xcode-select --install``). EXPERIMENTAL: the shim has never been compiled
against Apple's SDK or run on a Mac. Here (Linux, gcc) a unit test compiles :data:`SOURCE` with a
stand-in header (:data:`STANDIN_HEADER`: the SDK's types with gcc's ``vector_size`` in place of
clang's ``ext_vector_type``) and a fake ``hv_vcpu_*_simd_fp_reg`` that keeps registers in an
array, and round-trips values through the shim's functions with cffi.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

NUM_Q_REGS = 32
Q_BYTES = 16
HV_SIMD_FP_REG_Q0 = 0  # hv_simd_fp_reg_t: Q0..Q31 are 0..31

SOURCE = r"""
/* pytest-ignition: SIMD/FP register access for Hypervisor.framework vCPUs, by pointer.
 * hv_vcpu_set_simd_fp_reg takes a 16-byte vector by value (passed in v0), which an FFI
 * without a C compiler cannot call; these wrappers take a pointer instead. */
#include <stdint.h>
#include <string.h>
#include <Hypervisor/Hypervisor.h>

_Static_assert(sizeof(hv_simd_fp_uchar16_t) == 16, "a Q register is 16 bytes");

int32_t ign_hvf_get_simd_fp_reg(uint64_t vcpu, uint32_t reg, uint8_t *out16)
{
    hv_simd_fp_uchar16_t value;
    hv_return_t rc = hv_vcpu_get_simd_fp_reg((hv_vcpu_t)vcpu, (hv_simd_fp_reg_t)reg, &value);
    if (rc == HV_SUCCESS)
        memcpy(out16, &value, sizeof value);
    return (int32_t)rc;
}

int32_t ign_hvf_set_simd_fp_reg(uint64_t vcpu, uint32_t reg, const uint8_t *in16)
{
    hv_simd_fp_uchar16_t value;
    memcpy(&value, in16, sizeof value);
    return (int32_t)hv_vcpu_set_simd_fp_reg((hv_vcpu_t)vcpu, (hv_simd_fp_reg_t)reg, value);
}

void ign_fence(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
"""

# What the Python side declares (ABI mode): pointers only.
CDEF = """
int32_t ign_hvf_get_simd_fp_reg(uint64_t vcpu, uint32_t reg, uint8_t *out16);
int32_t ign_hvf_set_simd_fp_reg(uint64_t vcpu, uint32_t reg, const uint8_t *in16);
void ign_fence(void);
"""

# For the syntax check and the round trip off a Mac (tests/unit/test_hvf_simd.py): the SDK's
# declarations as far as the shim uses them. Apple's header spells the vector type with clang's
# ext_vector_type; gcc has only vector_size, which gives the same 16-byte vector.
STANDIN_HEADER = """
#include <stdint.h>
typedef int32_t hv_return_t;
typedef uint64_t hv_vcpu_t;
typedef uint32_t hv_simd_fp_reg_t;
typedef uint8_t hv_simd_fp_uchar16_t __attribute__((vector_size(16)));
#define HV_SUCCESS 0
hv_return_t hv_vcpu_get_simd_fp_reg(hv_vcpu_t vcpu, hv_simd_fp_reg_t reg,
                                    hv_simd_fp_uchar16_t *value);
hv_return_t hv_vcpu_set_simd_fp_reg(hv_vcpu_t vcpu, hv_simd_fp_reg_t reg,
                                    hv_simd_fp_uchar16_t value);
"""


def compiler(which: Callable[[str], str | None] = shutil.which) -> list[str] | None:
    """The C compiler command on this Mac: ``xcrun clang`` (the command-line tools' driver,
    which finds the SDK), else a ``clang`` on PATH; None when there is none."""
    if which("xcrun"):
        return ["xcrun", "clang"]
    cc = which("clang")
    return [cc] if cc else None


def build_command(cc: list[str], source: Path, output: Path) -> list[str]:
    """Compile ``source`` into the dylib ``output`` for arm64, linked to the framework."""
    return [
        *cc,
        "-arch",
        "arm64",
        "-O2",
        "-Wall",
        "-Werror",
        "-dynamiclib",
        "-framework",
        "Hypervisor",
        "-o",
        str(output),
        str(source),
    ]


def shim_path(cache_dir: Path, cc: list[str]) -> Path:
    """Where the dylib built from :data:`SOURCE` with ``cc`` is cached (a new source, flags or
    compiler gets a new file, so a stale build is never loaded)."""
    key = hashlib.sha256(
        (SOURCE + "\0" + " ".join(build_command(cc, Path("s.c"), Path("o")))).encode()
    ).hexdigest()[:16]
    return cache_dir / "hvf" / f"simd-{key}.dylib"


class ShimError(RuntimeError):
    """The shim could not be built or loaded (the message says what to install)."""


def build(
    cache_dir: Path,
    *,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    which: Callable[[str], str | None] = shutil.which,
) -> Path:
    """The cached shim dylib, compiled first if it is not there yet. Raises :class:`ShimError`."""
    cc = compiler(which)
    if cc is None:
        raise ShimError(
            "no C compiler for the HVF SIMD register shim (install the Xcode command-line "
            "tools: xcode-select --install)"
        )
    out = shim_path(cache_dir, cc)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.with_suffix(f".{os.getpid()}.c")
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    src.write_text(SOURCE, encoding="utf-8")
    try:
        res = run(build_command(cc, src, tmp), capture_output=True, timeout=120)
        if res.returncode != 0:
            err = res.stderr.decode(errors="replace").strip()[-800:]
            raise ShimError(f"compiling the HVF SIMD register shim failed: {err}")
        os.replace(tmp, out)  # atomic: concurrent first uses each build, one file wins
    finally:
        src.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return out


_shim: Any = None


def load(ffi: Any, cache_dir: Path) -> Any:
    """The shim's functions (``ign_hvf_get_simd_fp_reg``, ``..._set_...``, ``ign_fence``) on
    ``ffi``, building the dylib on first use."""
    global _shim
    if _shim is None:
        path = build(cache_dir)
        ffi.cdef(CDEF)
        try:
            _shim = ffi.dlopen(str(path))
        except OSError as e:
            raise ShimError(f"cannot load the HVF SIMD register shim {path}: {e}") from e
    return _shim


def check_q(values: Any, what: str = "simd") -> list[bytes]:
    """Validate a list of 32 register values of 16 bytes each (snapshot data is hostile)."""
    if not isinstance(values, list) or len(values) != NUM_Q_REGS:
        raise ValueError(f"{what}: expected {NUM_Q_REGS} Q registers")
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, bytes | bytearray) or len(v) != Q_BYTES:
            raise ValueError(f"{what}: Q{i} is not {Q_BYTES} bytes")
        out.append(bytes(v))
    return out
