"""Old import path of the KVM layer, kept for callers outside the VMM: it re-exports the raw
ioctl wrappers of :mod:`.hypervisor.kvm` (``System``/``Vm``/``Vcpu``, the ioctl numbers, the
cffi ``ffi``) and the x86 state bundles of :mod:`.arch.x86_64.state`. New code imports those
modules; this one owns nothing.
"""

from __future__ import annotations

from .arch.x86_64.state import *  # noqa: F403
from .arch.x86_64.state import (  # noqa: F401
    _lapic_or_none,
    _tsc_deadline_mode,
)
from .hypervisor.kvm import *  # noqa: F403
from .hypervisor.kvm import (  # noqa: F401
    _ULONG_ZERO,
    _from_bytes,
    _get_struct,
    _ioctl,
    _libc,
    _load_ffi,
    _msrs_cdata,
    _open_kvm,
    _regs_cdata,
    _set_struct,
    _sregs_cdata,
    _to_bytes,
    _xsave_cdata,
)
