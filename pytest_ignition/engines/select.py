"""Engine selection: which engine and accelerator to use here, and why.

Owns the decision logic (:func:`decide`, pure, driven by a :class:`HostProbe`) and
:func:`select_engine`, which probes the real host and builds the engine. ``auto`` picks the
bundled VMM (``ignition``) only where KVM runs guest kernels at native speed: real VT-x /
AMD-V (``/dev/kvm`` usable and not PVM, which emulates guest CPL0 code instruction by
instruction). Everywhere else it picks QEMU, whose accelerator is KVM under the same
condition, HVF on macOS, else TCG.

The guest's architecture (the ``arch`` setting, default the host's) takes part: hardware
acceleration needs a guest of the host's own architecture (an aarch64 guest on an arm64 Mac gets
HVF, on arm64 Linux KVM); any other guest runs under QEMU TCG, and the bundled VMM only runs
guests of the host's architecture.

On macOS ``auto`` keeps QEMU with HVF: the bundled VMM's Hypervisor.framework backend
(``vmm/hypervisor/hvf.py``) has not been run on a Mac. ``--ignition-engine=ignition`` selects it,
marked experimental in the header, only once ``vmm/doctor.py``'s checks pass.

Also the fallback rule (:func:`vmm_fault`): under ``auto``, a bundled-VMM boot that fails for a
reason of the VMM (it exited 1/2, crashed, or never got the guest to answer) rather than of the
guest (a kernel panic on the console, which QEMU would hit too) makes the run switch to QEMU.
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

__all__ = ["Decision", "HostProbe", "decide", "probe_host", "select_engine", "vmm_fault"]

ENGINE_NAMES = ("auto", "ignition", "qemu")
QEMU_HINT = "apt-get install qemu-system-x86 (Debian/Ubuntu), or brew install qemu (macOS)"
QEMU_AARCH64_HINT = "apt-get install qemu-system-arm (Debian/Ubuntu), or brew install qemu (macOS)"


@dataclass(frozen=True)
class HostProbe:
    """Facts about the host that the decision depends on."""

    system: str  # platform.system(): "Linux", "Darwin", ...
    machine: str  # platform.machine(): "x86_64", "arm64", ...
    kvm_usable: bool  # /dev/kvm exists and can be opened read-write
    kvm_pvm: bool  # the KVM is PVM (/sys/module/kvm_pvm exists)
    qemu_path: str | None  # qemu-system-x86_64, if found
    ignition_available: bool  # pytest_ignition.engines.ignition can be imported
    qemu_aarch64_path: str | None = None  # qemu-system-aarch64, if found
    # macOS: why the bundled VMM's (experimental) Hypervisor.framework backend cannot run, from
    # vmm/doctor.py's checks; None = they passed.
    hvf_problem: str | None = "the Hypervisor.framework checks were not run"
    # macOS, checks passed: the entitled interpreter the HVF VMM runs in (doctor's choice).
    hvf_interpreter: str | None = None
    assume_native: bool = False  # IGNITION_ASSUME_NATIVE_KVM=1 (a test hook): see decide()


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
    hvf_problem, hvf_interpreter = (
        _hvf_check() if platform.system() == "Darwin" else ("not macOS", None)
    )
    return HostProbe(
        system=platform.system(),
        machine=platform.machine(),
        kvm_usable=kvm_usable,
        kvm_pvm=Path("/sys/module/kvm_pvm").exists(),
        # Test hook: `auto` believes KVM is native and picks the bundled VMM (QEMU's accelerator
        # still follows the real KVM; tests/e2e/test_engine_fallback.py).
        assume_native=os.environ.get("IGNITION_ASSUME_NATIVE_KVM", "") == "1",
        qemu_path=shutil.which("qemu-system-x86_64"),
        ignition_available=importlib.util.find_spec("pytest_ignition.engines.ignition") is not None,
        qemu_aarch64_path=shutil.which("qemu-system-aarch64"),
        hvf_problem=hvf_problem,
        hvf_interpreter=hvf_interpreter,
    )


def _hvf_check() -> tuple[str | None, str | None]:
    """doctor's verdict on this Mac: (why the HVF backend cannot run, or None; the entitled
    interpreter it would run in)."""
    from pytest_ignition.vmm import doctor

    report = doctor.diagnose(doctor.gather())
    return report.hvf_problem, report.interpreter


GUEST_PANIC_MARKERS = ("Kernel panic - not syncing", "Kernel panic")


def vmm_fault(exit_code: int | None, console_tail: str, message: str = "") -> str | None:
    """Why a failed bundled-VMM boot is the VMM's fault (the reason ``auto`` falls back to QEMU),
    or None when the guest itself failed and QEMU would fail the same way.

    ``exit_code`` is the VMM process's status (None: still running when the boot gave up;
    negative: killed by that signal); ``message`` the engine's error text.
    """
    if any(m in console_tail for m in GUEST_PANIC_MARKERS):
        return None  # the guest kernel panicked: not the VMM's doing
    said = ""
    if "the VMM said:" in message:
        said = message.split("the VMM said:", 1)[1].strip().splitlines()[0][:300]
    if exit_code is None:
        return "the guest never answered under the bundled VMM (no kernel panic on its console)"
    if exit_code == 0:
        return None  # the guest rebooted or powered off by itself
    if exit_code < 0:
        import signal

        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"the bundled VMM crashed ({name})" + (f": {said}" if said else "")
    what = {1: "the VM broke", 2: "it could not set the VM up"}.get(exit_code, "it failed")
    return f"the bundled VMM exited with {exit_code} ({what})" + (f": {said}" if said else "")


def probe_arch(p: HostProbe) -> str:
    """The probed host's architecture in the ``arch`` setting's names."""
    m = p.machine.lower()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(m, m)


def _native_kvm(p: HostProbe) -> bool:
    return p.system == "Linux" and p.kvm_usable and not p.kvm_pvm


def _qemu_accel(p: HostProbe, arch: str) -> tuple[str, str]:
    host = probe_arch(p)
    if arch != host:
        return "tcg", f"an {arch} guest on an {host} host runs under TCG"
    if p.system == "Linux":
        if p.kvm_usable and p.kvm_pvm:
            return "tcg", "/dev/kvm is PVM (guest kernel code would be emulated), so TCG"
        if p.kvm_usable:
            return "kvm", "/dev/kvm is usable"
        return "tcg", "no usable /dev/kvm, so TCG"
    if p.system == "Darwin":
        return "hvf", f"macOS on {host}: Hypervisor.framework"
    return "tcg", f"{p.system}: no known hardware accelerator, so TCG"


def decide(name: str, p: HostProbe, arch: str | None = None) -> Decision:
    """Choose the engine and accelerator for ``name`` (auto|ignition|qemu) on host ``p`` for
    guests of ``arch`` (default: the host's).

    Raises :class:`EngineUnavailable` when the requested engine cannot run here.
    """
    if name not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
    host = probe_arch(p)
    arch = arch or host
    foreign = arch != host
    native = _native_kvm(p) and not foreign
    if name == "ignition" and foreign:
        raise EngineUnavailable(
            f"the bundled VMM runs guests of the host's architecture ({host}), not {arch}",
            hint="use --ignition-engine=qemu (TCG) or auto for this guest",
        )
    if name == "ignition":
        if not p.ignition_available:
            raise EngineUnavailable(
                "the bundled VMM (ignition engine) is not part of this installation",
                hint="use --ignition-engine=qemu or auto",
            )
        if p.system == "Darwin":
            if p.hvf_problem is not None:
                raise EngineUnavailable(
                    f"the bundled VMM's Hypervisor.framework backend cannot run: {p.hvf_problem}",
                    hint="see python -m pytest_ignition.vmm.doctor, or use auto (QEMU with HVF)",
                )
            return Decision(
                "ignition",
                "hvf",
                "requested with --ignition-engine=ignition: EXPERIMENTAL Hypervisor.framework "
                "backend, never run on a Mac before this (auto uses QEMU with HVF)",
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
    assumed = p.assume_native and p.kvm_usable and not foreign
    if name == "auto" and (native or assumed) and p.ignition_available:
        why = "auto: /dev/kvm runs guests natively (not PVM)"
        if not native:
            why = "auto: /dev/kvm runs guests natively (assumed: IGNITION_ASSUME_NATIVE_KVM=1)"
        return Decision("ignition", "kvm", why)
    if arch == "aarch64":
        if p.qemu_aarch64_path is None:
            raise EngineUnavailable(
                "qemu-system-aarch64 was not found on PATH", hint=QEMU_AARCH64_HINT
            )
    elif p.qemu_path is None:
        raise EngineUnavailable("qemu-system-x86_64 was not found on PATH", hint=QEMU_HINT)
    accel, accel_why = _qemu_accel(p, arch)
    if name == "qemu":
        return Decision("qemu", accel, f"requested with --ignition-engine=qemu; {accel_why}")
    if foreign:
        why = f"auto: {accel_why}, in QEMU"
    elif native:
        # Only reached when the bundled VMM is absent.
        why = "auto: the bundled VMM is not available; " + accel_why
    elif p.kvm_usable and p.kvm_pvm:
        why = "auto: /dev/kvm is PVM, so the bundled VMM would be slow; QEMU with TCG"
    else:
        why = f"auto: the bundled VMM needs native KVM; QEMU with {accel_why}"
    return Decision("qemu", accel, why)


def select_engine(
    name: str = "auto", probe: HostProbe | None = None, arch: str | None = None
) -> tuple[Engine, str]:
    """The engine to use for guests of ``arch`` and why it was chosen (for the pytest header)."""
    p = probe if probe is not None else probe_host()
    d = decide(name, p, arch)
    if d.engine == "ignition":
        mod = importlib.import_module("pytest_ignition.engines.ignition")
        if d.accelerator == "hvf":
            # the aarch64 machine on Hypervisor.framework, in the entitled interpreter copy
            return mod.IgnitionEngine(python=p.hvf_interpreter, hypervisor="hvf"), d.reason
        return mod.IgnitionEngine(), d.reason
    from pytest_ignition.engines.qemu import QemuEngine

    host = probe_arch(p)
    if arch is not None and arch != host:
        # The engine's accelerator serves host-architecture guests; this guest gets TCG.
        return QemuEngine(accelerator=_qemu_accel(p, host)[0], arch=host), d.reason
    return QemuEngine(accelerator=d.accelerator, arch=host), d.reason
