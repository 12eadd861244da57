"""Engine selection: which engine and accelerator to use here, and why.

Owns the decision logic (:func:`decide`, pure, driven by a :class:`HostProbe`) and
:func:`select_engine`, which probes the real host and builds the engine. ``auto`` picks the
bundled VMM (``ignition``) only where KVM runs guest kernels at native speed: real VT-x /
AMD-V (``/dev/kvm`` usable and not PVM, which emulates guest CPL0 code instruction by
instruction). Everywhere else it picks QEMU, whose accelerator is KVM under the same
condition, HVF on macOS, else TCG.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

from pytest_ignition.engines.base import Engine, EngineUnavailable

__all__ = ["Decision", "HostProbe", "decide", "probe_host", "select_engine"]

ENGINE_NAMES = ("auto", "ignition", "qemu")
QEMU_HINT = "apt-get install qemu-system-x86 (Debian/Ubuntu), or brew install qemu (macOS)"


@dataclass(frozen=True)
class HostProbe:
    """Facts about the host that the decision depends on."""

    system: str  # platform.system(): "Linux", "Darwin", ...
    machine: str  # platform.machine(): "x86_64", "arm64", ...
    kvm_usable: bool  # /dev/kvm exists and can be opened read-write
    kvm_pvm: bool  # the KVM is PVM (/sys/module/kvm_pvm exists)
    qemu_path: str | None  # qemu-system-x86_64, if found
    ignition_available: bool  # pytest_ignition.engines.ignition can be imported


@dataclass(frozen=True)
class Decision:
    engine: str  # "ignition" or "qemu"
    accelerator: str  # "kvm", "hvf" or "tcg"
    reason: str


def probe_host() -> HostProbe:
    """Probe this machine."""
    kvm_usable = False
    if os.path.exists("/dev/kvm"):
        try:
            fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            pass
        else:
            os.close(fd)
            kvm_usable = True
    return HostProbe(
        system=platform.system(),
        machine=platform.machine(),
        kvm_usable=kvm_usable,
        kvm_pvm=Path("/sys/module/kvm_pvm").exists(),
        qemu_path=shutil.which("qemu-system-x86_64"),
        ignition_available=importlib.util.find_spec("pytest_ignition.engines.ignition") is not None,
    )


def _native_kvm(p: HostProbe) -> bool:
    return p.system == "Linux" and p.kvm_usable and not p.kvm_pvm


def _qemu_accel(p: HostProbe) -> tuple[str, str]:
    if p.system == "Linux":
        if p.kvm_usable and p.kvm_pvm:
            return "tcg", "/dev/kvm is PVM (guest kernel code would be emulated), so TCG"
        if p.kvm_usable:
            return "kvm", "/dev/kvm is usable"
        return "tcg", "no usable /dev/kvm, so TCG"
    if p.system == "Darwin":
        if p.machine in ("x86_64", "AMD64"):
            return "hvf", "macOS on x86_64: Hypervisor.framework"
        return "tcg", f"macOS on {p.machine}: an x86_64 guest needs TCG"
    return "tcg", f"{p.system}: no known hardware accelerator, so TCG"


def decide(name: str, p: HostProbe) -> Decision:
    """Choose the engine and accelerator for ``name`` (auto|ignition|qemu) on host ``p``.

    Raises :class:`EngineUnavailable` when the requested engine cannot run here.
    """
    if name not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
    native = _native_kvm(p)
    if name == "ignition":
        if not p.ignition_available:
            raise EngineUnavailable(
                "the bundled VMM (ignition engine) is not part of this installation",
                hint="use --ignition-engine=qemu or auto",
            )
        if not p.kvm_usable:
            raise EngineUnavailable(
                "the ignition engine needs a usable /dev/kvm",
                hint="load kvm_intel/kvm_amd and give this user access to /dev/kvm, "
                "or use --ignition-engine=qemu",
            )
        why = "requested with --ignition-engine=ignition"
        if p.kvm_pvm:
            why += " (warning: /dev/kvm is PVM, guest kernel code runs emulated and slowly)"
        return Decision("ignition", "kvm", why)
    if name == "auto" and native and p.ignition_available:
        return Decision("ignition", "kvm", "auto: /dev/kvm runs guests natively (not PVM)")
    if p.qemu_path is None:
        raise EngineUnavailable("qemu-system-x86_64 was not found on PATH", hint=QEMU_HINT)
    accel, accel_why = _qemu_accel(p)
    if name == "qemu":
        return Decision("qemu", accel, f"requested with --ignition-engine=qemu; {accel_why}")
    if native:
        # Only reached when the bundled VMM is absent.
        why = "auto: the bundled VMM is not available; " + accel_why
    elif p.kvm_usable and p.kvm_pvm:
        why = "auto: /dev/kvm is PVM, so the bundled VMM would be slow; QEMU with TCG"
    else:
        why = f"auto: the bundled VMM needs native KVM; QEMU with {accel_why}"
    return Decision("qemu", accel, why)


def select_engine(name: str = "auto", probe: HostProbe | None = None) -> tuple[Engine, str]:
    """The engine to use and why it was chosen (for the pytest header)."""
    d = decide(name, probe if probe is not None else probe_host())
    if d.engine == "ignition":
        mod = importlib.import_module("pytest_ignition.engines.ignition")
        return mod.IgnitionEngine(), d.reason
    from pytest_ignition.engines.qemu import QemuEngine

    return QemuEngine(accelerator=d.accelerator), d.reason
