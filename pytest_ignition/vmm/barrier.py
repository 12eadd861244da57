"""Memory barriers for device code that shares guest RAM with running vCPUs.

A virtqueue is a lock-free protocol between the guest's driver (on a vCPU) and the device model
(on a VMM thread, possibly another physical CPU): the driver writes descriptors, then the
avail index; the device reads the avail index, then the ring and descriptors; the device
writes used elements, then the used index, then reads the driver's flags (virtio 1.x 2.7.7,
2.7.13). Python gives no ordering between those plain loads and stores of a shared mapping.
On x86-64 (TSO) loads are not reordered with loads nor stores with stores, so only the
store-then-load case needs a fence; arm64 is weakly ordered and needs all three.

Python cannot emit a fence, and libc exports none, so the fence is a two-instruction function
in an executable page (``dmb ish; ret`` on arm64, ``mfence; ret`` on x86-64) called through
ctypes (~1 us). Where the architecture needs nothing, :func:`rmb` and :func:`wmb` are no-ops.

- :func:`rmb`: loads before it complete before loads after it (avail idx, then the ring);
- :func:`wmb`: stores before it are visible before stores after it (used elem, then used idx);
- :func:`mb`: a full fence (used idx, then the driver's ``flags``/``used_event``).
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from collections.abc import Callable

# machine code of ``void fence(void)``
_CODE = {
    "aarch64": bytes.fromhex("bf3b03d5c0035fd6"),  # dmb ish; ret
    "x86_64": bytes.fromhex("0faef0c3"),  # mfence; ret
}


def _noop() -> None:
    return None


def _make_fence(arch: str) -> Callable[[], None] | None:
    """A callable running a full hardware fence on ``arch``, or None when it cannot be made
    (another architecture, or a host that forbids executable mappings)."""
    code = _CODE.get(arch)
    if code is None:
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        page.write(code)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.mprotect(addr, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            return None
    except (OSError, ValueError, AttributeError):
        return None
    fn = ctypes.CFUNCTYPE(None)(addr)
    fn._page = page  # type: ignore[attr-defined]  # keep the mapping alive with the function
    return fn


ARCH = platform.machine()
_fence = _make_fence(ARCH)
#: True when :func:`mb` is a real hardware fence here.
HAVE_FENCE = _fence is not None

mb: Callable[[], None] = _fence if _fence is not None else _noop
if ARCH == "x86_64":
    rmb: Callable[[], None] = _noop
    wmb: Callable[[], None] = _noop
else:
    rmb = mb
    wmb = mb
