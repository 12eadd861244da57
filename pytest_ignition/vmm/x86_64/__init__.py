"""Old import path of the x86_64 boot layout, kept for callers outside the VMM: the package is
now :mod:`pytest_ignition.vmm.arch.x86_64`, and each of its modules is registered here under
its old name too (``vmm.x86_64.loader`` is ``vmm.arch.x86_64.loader``). Owns nothing."""

from __future__ import annotations

import importlib
import sys

from ..arch import x86_64 as _new

_MODULES = ("boot", "bootparams", "cpuid", "gdt", "layout", "loader", "mptable", "msrs", "paging")
_MODULES += ("regs",)

for _name in _MODULES:
    _module = importlib.import_module(f"{_new.__name__}.{_name}")
    sys.modules[f"{__name__}.{_name}"] = _module
    globals()[_name] = _module
