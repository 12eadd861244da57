"""``python -m pytest_ignition.vmm.doctor``: what the bundled VMM would use on this host, and why.

On macOS (Apple silicon) it checks what the EXPERIMENTAL Hypervisor.framework backend needs: the
framework, an interpreter with the ``com.apple.security.hypervisor`` entitlement (``--sign`` makes
the signed copy), macOS 15+ for the in-kernel GIC (``hv_gic``), and a C compiler for the SIMD/FP
register shim (:mod:`.hypervisor.hvf_simd`, built on first use). Elsewhere it reports /dev/kvm, PVM
and what ``--ignition-engine=auto`` picks. Decisions (:func:`diagnose`) are pure over
:class:`Facts`, so they are unit-tested with injected facts; :func:`gather` probes the real host.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pytest_ignition.vmm.hypervisor import hvf_sign, hvf_simd

FRAMEWORK = "/System/Library/Frameworks/Hypervisor.framework"
GIC_MACOS = (15, 0)


@dataclass(frozen=True)
class Facts:
    system: str
    machine: str
    macos_version: tuple[int, ...] | None = None
    framework_present: bool = False
    codesign_present: bool = False
    interpreter: str = ""
    interpreter_entitled: bool = False
    signed_copy: str | None = None  # path, if it exists
    signed_copy_entitled: bool = False
    c_compiler: str | None = None  # the SIMD shim's compiler command ("xcrun clang"), if any
    # the entitled interpreter imports the VMM and cffi with the engine's PYTHONPATH: None =
    # not checked (no entitled interpreter), else the error's last line ("" when it worked)
    vmm_import_error: str | None = None
    kvm_present: bool = False
    kvm_usable: bool = False
    kvm_pvm: bool = False
    qemu_x86_64: str | None = None
    qemu_aarch64: str | None = None
    ignition_available: bool = True


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    hvf_problem: str | None = None  # None: the HVF backend's checks passed (macOS only)
    interpreter: str | None = None  # what the HVF VMM would run in


def hvf_problem(f: Facts) -> str | None:
    """Why the HVF backend cannot run here, or None when every check passed."""
    if f.system != "Darwin":
        return f"Hypervisor.framework is macOS-only (this is {f.system})"
    if f.machine not in ("arm64", "aarch64"):
        return f"the HVF backend is for Apple silicon (arm64), this Mac is {f.machine}"
    if not f.framework_present:
        return f"{FRAMEWORK} is missing"
    if f.macos_version is None or f.macos_version < GIC_MACOS:
        have = ".".join(map(str, f.macos_version or ())) or "unknown"
        return f"macOS {have}: the in-kernel GIC (hv_gic) needs macOS 15 or later"
    if not (f.interpreter_entitled or f.signed_copy_entitled):
        return (
            "no interpreter with the com.apple.security.hypervisor entitlement "
            "(run python -m pytest_ignition.vmm.doctor --sign)"
        )
    if f.vmm_import_error:
        return (
            "the entitled interpreter cannot import the VMM with the engine's PYTHONPATH "
            f"({f.vmm_import_error}); install pytest-ignition and cffi for that Python"
        )
    if not f.c_compiler:
        return (
            "no C compiler for the SIMD/FP register shim (hv_vcpu_set_simd_fp_reg takes a "
            "vector by value; install the Xcode command-line tools: xcode-select --install)"
        )
    return None


def diagnose(f: Facts) -> Report:
    r = Report()
    say = r.lines.append
    say(f"host: {f.system} {f.machine}")
    if f.system == "Darwin":
        v = ".".join(map(str, f.macos_version or ())) or "unknown"
        say(f"macOS {v}; Hypervisor.framework {'present' if f.framework_present else 'MISSING'}")
        gic = f.macos_version is not None and f.macos_version >= GIC_MACOS
        say(f"in-kernel GICv3 (hv_gic, macOS 15+): {'yes' if gic else 'no'}")
        say(f"interpreter {f.interpreter}: entitled={'yes' if f.interpreter_entitled else 'no'}")
        if f.signed_copy:
            say(
                f"signed copy {f.signed_copy}: entitled={'yes' if f.signed_copy_entitled else 'no'}"
            )
        elif not f.interpreter_entitled:
            say(
                "no signed copy: --sign makes one"
                + ("" if f.codesign_present else " (needs codesign: xcode-select --install)")
            )
        say(
            "C compiler for the SIMD/FP register shim: "
            + (f.c_compiler or "MISSING (xcode-select --install)")
        )
        if f.vmm_import_error is not None:
            say(
                "the entitled interpreter imports the VMM: "
                + ("yes" if not f.vmm_import_error else f"NO ({f.vmm_import_error})")
            )
        r.hvf_problem = hvf_problem(f)
        if r.hvf_problem is None:
            r.interpreter = f.interpreter if f.interpreter_entitled else f.signed_copy
            say(f"--ignition-engine=ignition: EXPERIMENTAL HVF backend, run in {r.interpreter}")
        else:
            say(f"--ignition-engine=ignition: not available: {r.hvf_problem}")
        say(
            "--ignition-engine=auto: QEMU with -accel hvf "
            + (
                f"({f.qemu_aarch64})"
                if f.qemu_aarch64
                else "(qemu-system-aarch64 not found: brew install qemu)"
            )
            + "; the HVF backend has never been run on a Mac, so auto does not pick it"
        )
        return r
    r.hvf_problem = hvf_problem(f)
    if f.system == "Linux":
        if not f.kvm_present:
            say("/dev/kvm: absent (load kvm_intel/kvm_amd, or enable virtualization)")
        else:
            say(
                f"/dev/kvm: present, {'usable' if f.kvm_usable else 'NOT usable by this user (add it to the kvm group)'}"
            )
            if f.kvm_pvm:
                say(
                    "KVM is PVM (kvm_pvm): guest kernel code is emulated, the bundled VMM would be slow"
                )
    say(f"Hypervisor.framework: does not apply ({r.hvf_problem})")
    from pytest_ignition.engines.base import EngineUnavailable
    from pytest_ignition.engines.select import HostProbe, decide

    probe = HostProbe(
        system=f.system,
        machine=f.machine,
        kvm_usable=f.kvm_usable,
        kvm_pvm=f.kvm_pvm,
        qemu_path=f.qemu_x86_64,
        ignition_available=f.ignition_available,
        qemu_aarch64_path=f.qemu_aarch64,
    )
    try:
        d = decide("auto", probe)
        say(f"--ignition-engine=auto: {d.engine} ({d.accelerator}): {d.reason}")
    except EngineUnavailable as e:
        say(f"--ignition-engine=auto: nothing can run here: {e}")
    return r


def _macos_version() -> tuple[int, ...] | None:
    v = platform.mac_ver()[0]
    try:
        return tuple(int(x) for x in v.split(".")) if v else None
    except ValueError:
        return None


def _entitled(path: str | None) -> bool:
    if not path or not shutil.which("codesign"):
        return False
    try:
        res = subprocess.run(
            hvf_sign.entitlements_command(Path(path)), capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and hvf_sign.has_entitlement(res.stdout)


def _import_error(python: str | None) -> str | None:
    """Run ``python`` as the engine runs the HVF VMM (with hvf_sign.vmm_env) and import what the
    VMM imports: "" when that works, else the error's last line; None when there is no python."""
    if not python:
        return None
    try:
        res = subprocess.run(
            [python, "-c", hvf_sign.IMPORT_CHECK],
            env={**os.environ, **hvf_sign.vmm_env()},
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if res.returncode == 0:
        return ""
    lines = res.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {res.returncode}"


def cache_dir() -> Path:
    return Path(os.environ.get("IGNITION_CACHE_DIR") or Path.home() / ".cache" / "pytest-ignition")


def gather() -> Facts:
    """Probe this host (macOS: runs codesign -d on the interpreter and the signed copy)."""
    system, machine = platform.system(), platform.machine()
    interp = sys.executable
    copy = hvf_sign.signed_copy_path(cache_dir())
    kvm_usable = False
    if os.path.exists("/dev/kvm"):
        try:
            os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
            kvm_usable = True
        except OSError:
            pass
    darwin = system == "Darwin"
    interp_entitled = darwin and _entitled(interp)
    copy_entitled = darwin and copy.exists() and _entitled(str(copy))
    runner = interp if interp_entitled else str(copy) if copy_entitled else None
    return Facts(
        system=system,
        machine=machine,
        macos_version=_macos_version() if darwin else None,
        framework_present=darwin and os.path.isdir(FRAMEWORK),
        codesign_present=shutil.which("codesign") is not None,
        interpreter=interp,
        interpreter_entitled=interp_entitled,
        signed_copy=str(copy) if copy.exists() else None,
        signed_copy_entitled=copy_entitled,
        vmm_import_error=_import_error(runner) if darwin else None,
        c_compiler=" ".join(cc) if darwin and (cc := hvf_simd.compiler()) else None,
        kvm_present=os.path.exists("/dev/kvm"),
        kvm_usable=kvm_usable,
        kvm_pvm=Path("/sys/module/kvm_pvm").exists(),
        qemu_x86_64=shutil.which("qemu-system-x86_64"),
        qemu_aarch64=shutil.which("qemu-system-aarch64"),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytest_ignition.vmm.doctor", description=__doc__)
    ap.add_argument("--sign", action="store_true", help="macOS: make the entitled interpreter copy")
    args = ap.parse_args(argv)
    facts = gather()
    if args.sign:
        if facts.system != "Darwin":
            print("--sign: only on macOS (Hypervisor.framework entitlement)", file=sys.stderr)
            return 2
        try:
            copy = hvf_sign.sign(cache_dir())
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            print(f"--sign failed: {e}", file=sys.stderr)
            return 1
        print(f"signed {copy}")
        facts = gather()
    report = diagnose(facts)
    print("\n".join(report.lines))
    return 0 if facts.system != "Darwin" or report.hvf_problem is None else 1


if __name__ == "__main__":
    sys.exit(main())
