"""The entitled interpreter copy the HVF backend runs in.

``hv_vm_create`` returns HV_DENIED unless the process's *main executable* carries the
``com.apple.security.hypervisor`` entitlement; entitlements on extension modules or dylibs do
nothing. So the VMM runs in a copy of the real interpreter binary, ad-hoc signed with that
entitlement (``codesign -s - --entitlements PLIST -f COPY``; needs the Xcode command-line tools).
Framework builds (python.org, Homebrew) have a ``bin/python3`` stub that re-executes
``Python.app/Contents/MacOS/Python``: the copy is made of the latter. Written, not run on a Mac.
"""

from __future__ import annotations

import importlib
import os
import plistlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ENTITLEMENT = "com.apple.security.hypervisor"
COPY_NAME = "python3-hvf"
# What the aarch64 VMM imports outside the standard library.
VMM_IMPORTS = ("pytest_ignition", "cffi", "_cffi_backend", "pycparser")
IMPORT_CHECK = "import pytest_ignition.vmm.machine_aarch64, cffi, _cffi_backend"


def import_roots(names: tuple[str, ...] = VMM_IMPORTS) -> list[str]:
    """The sys.path directories this process imports ``names`` from (a package's parent, a
    module's directory), in order, without repeats."""
    roots: list[str] = []
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        where = getattr(mod, "__file__", None)
        if not where:
            continue
        path = Path(where).resolve()
        root = path.parent.parent if path.name == "__init__.py" else path.parent
        if str(root) not in roots:
            roots.append(str(root))
    return roots


def vmm_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """``PYTHONPATH`` for the VMM run by the signed copy: the copy is of the *base* interpreter,
    which sees no virtualenv (no ``pyvenv.cfg`` beside it), so it is told where this process
    imports pytest_ignition and cffi from (ahead of any PYTHONPATH already set)."""
    old = (os.environ if environ is None else environ).get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join(import_roots() + ([old] if old else []))}


def plist_text() -> str:
    """The entitlements plist: just the hypervisor entitlement."""
    return plistlib.dumps({ENTITLEMENT: True}, fmt=plistlib.FMT_XML).decode("utf-8")


def codesign_command(copy: Path, plist: Path) -> list[str]:
    """Ad-hoc sign ``copy`` with the entitlements in ``plist`` (replacing any signature)."""
    return ["codesign", "-s", "-", "--entitlements", str(plist), "-f", str(copy)]


def entitlements_command(binary: Path) -> list[str]:
    """Print ``binary``'s entitlements as an XML plist on stdout."""
    return ["codesign", "-d", "--entitlements", "-", "--xml", str(binary)]


def has_entitlement(codesign_output: bytes) -> bool:
    """Whether ``codesign -d --entitlements - --xml`` output grants the hypervisor entitlement."""
    start = codesign_output.find(b"<?xml")
    if start < 0:
        start = codesign_output.find(b"<plist")
    if start < 0:
        return False
    try:
        ents = plistlib.loads(codesign_output[start:])
    except Exception:
        return False
    return isinstance(ents, dict) and ents.get(ENTITLEMENT) is True


def interpreter_to_sign(
    base_executable: str, prefix: str, exists: Callable[[str], bool] = os.path.exists
) -> Path:
    """The binary that really runs: a framework build's Python.app executable, else the resolved
    base interpreter (a venv's ``bin/python`` is a link to it)."""
    app = os.path.join(prefix, "Resources", "Python.app", "Contents", "MacOS", "Python")
    if exists(app):
        return Path(app)
    return Path(os.path.realpath(base_executable))


def signed_copy_path(cache_dir: Path) -> Path:
    return cache_dir / "hvf" / COPY_NAME


def sign(
    cache_dir: Path,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> Path:
    """Copy the interpreter into ``cache_dir`` and sign the copy; returns the copy's path.
    Raises RuntimeError (with codesign's message) when signing or the signed copy's start fails."""
    src = interpreter_to_sign(getattr(sys, "_base_executable", sys.executable), sys.base_prefix)
    copy = signed_copy_path(cache_dir)
    copy.parent.mkdir(parents=True, exist_ok=True)
    tmp = copy.with_suffix(".tmp")
    shutil.copy2(src, tmp)
    plist = copy.parent / "hypervisor.entitlements"
    plist.write_text(plist_text(), encoding="utf-8")
    res = run(codesign_command(tmp, plist), capture_output=True, timeout=60)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"codesign failed ({res.returncode}): {res.stderr.decode(errors='replace').strip()} "
            "(install the Xcode command-line tools: xcode-select --install)"
        )
    os.replace(tmp, copy)
    # A copy outside its install tree may not find libpython (@executable_path builds): check.
    res = run([str(copy), "-c", "import sys; print(sys.prefix)"], capture_output=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(
            f"the signed copy {copy} does not start: {res.stderr.decode(errors='replace')[-300:]}"
        )
    return copy
