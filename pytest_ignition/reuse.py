"""Prepared snapshots kept between runs (``--ignition-reuse``): their key, their store, and why
a run reuses one or makes a new one.

A reusable snapshot lives in ``<cache dir>/snapshots/<key>/`` (``$IGNITION_CACHE_DIR`` or
``~/.cache/pytest-ignition``) and is made under the file lock ``locks/snapshot-<key>.lock``, so
xdist workers and concurrent runs make it once. Its key is a sha256 over everything that made it
(:func:`key_inputs`): the configuration key (:meth:`VMConfig.key`: kernel, initrd, rootfs and
image files by path, size and mtime, and the machine's shape), the engine's name, version,
accelerator and snapshot format, pytest-ignition's version, the source of every module that
implements ``pytest_ignition_prepare`` and of every project-local module those import
(transitively: ``import x`` / ``from . import y`` resolved to files under the rootdir, outside
site-packages), and the strings ``pytest_ignition_snapshot_key(config)`` implementations return.

Each entry keeps ``inputs.json`` (those inputs); ``last-<id>.json`` remembers the inputs of the
last run for one project and configuration, so that a new snapshot can say what changed.
``python -m pytest_ignition.guest clean`` removes entries whose kernel, initrd, rootfs or image
changed or vanished, or that went unused for 14 days (``--all``: every entry).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ReuseKey", "compute", "explain", "plan_snapshots", "snapshot_locks", "store_dir"]

MAX_FILES = 2000  # project modules followed for one key: a bound, not a limit anyone should hit
UNUSED_DAYS = 14
INPUTS_FILE = "inputs.json"
READY_FILE = "READY"


def store_dir() -> Path:
    from pytest_ignition.guest.build import cache_dir

    return cache_dir() / "snapshots"


def lock_name(key: str) -> str:
    return f"snapshot-{key}"


@dataclass(frozen=True)
class ReuseKey:
    key: str  # 32 hex digits: the entry's directory name
    inputs: dict[str, Any]
    identity: str  # project + configuration + engine: whose "last run" this is

    @property
    def directory(self) -> Path:
        return store_dir() / self.key

    @property
    def lock_path(self) -> Path:
        from pytest_ignition.guest.build import _lock_path

        return _lock_path(lock_name(self.key))


# ------------------------------------------------------------------------------ inputs


def _excluded_roots() -> list[str]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    for name in ("purelib", "platlib", "stdlib", "platstdlib"):
        with contextlib.suppress(KeyError):
            roots.add(sysconfig.get_paths()[name])
    return [os.path.realpath(r) + os.sep for r in roots if r]


def _is_project_file(path: str, rootdir: str, excluded: list[str]) -> bool:
    real = os.path.realpath(path)
    if not real.startswith(rootdir + os.sep):
        return False
    if any(real.startswith(x) for x in excluded):
        return False
    parts = Path(real).parts
    return not any(p in ("site-packages", "dist-packages") or p.startswith(".venv") for p in parts)


def _module_file(name: str) -> str | None:
    mod = sys.modules.get(name)
    f = getattr(mod, "__file__", None) if mod is not None else None
    if f:
        return str(f)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        return None
    return spec.origin


def _imports(path: str, module_name: str | None) -> set[str]:
    """Module names ``path`` imports (``from a import b`` yields ``a`` and ``a.b``)."""
    try:
        tree = ast.parse(Path(path).read_bytes(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return set()
    is_pkg = os.path.basename(path) == "__init__.py"
    package = module_name if is_pkg else (module_name or "").rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                if not package:
                    continue
                try:
                    base = importlib.util.resolve_name("." * node.level + base, package)
                except (ImportError, ValueError):
                    continue
            if base:
                names.add(base)
            for a in node.names:
                if a.name != "*":
                    names.add(f"{base}.{a.name}" if base else a.name)
    return names


def _name_of(path: str) -> str | None:
    real = os.path.realpath(path)
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and os.path.realpath(f) == real:
            return name
    return None


def project_sources(start_files: list[str], rootdir: Path) -> dict[str, str]:
    """sha256 of each start file and of every project-local module they import, transitively;
    keyed by path relative to ``rootdir`` (absolute for start files outside it)."""
    root = os.path.realpath(rootdir)
    excluded = _excluded_roots()
    out: dict[str, str] = {}
    todo: list[tuple[str, bool, str | None]] = [
        (os.path.realpath(f), True, None) for f in start_files
    ]
    seen: set[str] = set()
    while todo and len(seen) < MAX_FILES:
        path, is_start, mod_name = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if not is_start and not _is_project_file(path, root, excluded):
            continue
        try:
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError:
            digest = "unreadable"
        rel = os.path.relpath(path, root) if path.startswith(root + os.sep) else path
        out[rel] = digest
        for name in sorted(_imports(path, mod_name or _name_of(path))):
            f = _module_file(name)
            if f and f.endswith(".py"):
                todo.append((os.path.realpath(f), False, name))
    return dict(sorted(out.items()))


def _hook_files(config: Any) -> list[str]:
    files = []
    for impl in config.pluginmanager.hook.pytest_ignition_prepare.get_hookimpls():
        f = getattr(impl.plugin, "__file__", None)
        if not f:
            with contextlib.suppress(TypeError, OSError):
                import inspect

                f = inspect.getsourcefile(impl.function)
        if f:
            files.append(str(f))
    return files


def _extra(config: Any) -> list[str]:
    hook = getattr(config.pluginmanager.hook, "pytest_ignition_snapshot_key", None)
    if hook is None:
        return []
    out: list[str] = []
    for value in hook(config=config):
        if value is None:
            continue
        items = [value] if isinstance(value, str) else list(value)
        for v in items:
            if not isinstance(v, str):
                raise TypeError(
                    f"pytest_ignition_snapshot_key must return a str or a list of str, got {v!r}"
                )
            out.append(v)
    return out


def key_inputs(config: Any, engine: Any, vmcfg: Any) -> dict[str, Any]:
    """Everything a reusable snapshot of ``vmcfg`` depends on, as plain data."""
    import pytest_ignition

    files = {name: str(p) for name, p in vmcfg.files().items()}
    stamps = {}
    for name, p in vmcfg.files().items():
        try:
            st = Path(p).stat()
            stamps[name] = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamps[name] = None
    return {
        "config_key": vmcfg.key(),
        "files": files,
        "stamps": stamps,
        "engine": engine.name,
        "engine_version": str(getattr(engine, "version", "")),
        "accelerator": engine.accelerator,
        "snapshot_format": engine.snapshot_format,
        "pytest_ignition": pytest_ignition.__version__,
        "rootdir": str(config.rootpath),  # projects never share (their sources are relative)
        "prepare_sources": project_sources(_hook_files(config), Path(config.rootpath)),
        "snapshot_key": _extra(config),
    }


def compute(config: Any, engine: Any, vmcfg: Any) -> ReuseKey:
    inputs = key_inputs(config, engine, vmcfg)
    blob = json.dumps(inputs, sort_keys=True).encode()
    # Whose "last snapshot" this is: the project, the engine and the machine's shape, not the
    # file identities (a rebuilt initramfs is the same configuration, changed).
    shape = {
        k: v
        for k, v in sorted(vars(vmcfg).items())
        if k not in ("kernel", "initrd", "rootfs", "image", "boot_timeout")
    }
    ident = json.dumps([str(config.rootpath), engine.name, shape], default=str).encode()
    return ReuseKey(
        hashlib.sha256(blob).hexdigest()[:32], inputs, hashlib.sha256(ident).hexdigest()[:16]
    )


# ------------------------------------------------------------------------------ reused or new


def _what_changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    why = []
    if old.get("config_key") != new.get("config_key"):
        why.append("the configuration or a kernel/initrd/rootfs/image file changed")
    for k, label in (
        ("engine_version", "engine version"),
        ("accelerator", "accelerator"),
        ("snapshot_format", "snapshot format"),
        ("pytest_ignition", "pytest-ignition version"),
    ):
        if old.get(k) != new.get(k):
            why.append(f"{label} {old.get(k)!r} -> {new.get(k)!r}")
    a, b = old.get("prepare_sources", {}), new.get("prepare_sources", {})
    changed = sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))
    if changed:
        shown = ", ".join(changed[:4]) + (
            f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        )
        why.append(f"prepare hook sources changed: {shown}")
    if old.get("snapshot_key") != new.get("snapshot_key"):
        why.append("pytest_ignition_snapshot_key returned other strings")
    return why


def explain(rk: ReuseKey) -> tuple[str, str]:
    """("reused" | "new", why) for ``rk`` as the store has it now."""
    d = rk.directory
    last = store_dir() / f"last-{rk.identity}.json"
    if (d / READY_FILE).exists():
        try:  # inputs.json is written when the snapshot is made; READY is touched on each use
            age = time.time() - (d / INPUTS_FILE).stat().st_mtime
        except OSError:
            age = 0.0
        state, why = "reused", f"same key {rk.key[:12]}, made {_age(age)} ago"
        with contextlib.suppress(OSError):
            os.utime(d / READY_FILE)  # used: clean's "unused for N days" counts from here
    else:
        state = "new"
        try:
            old = json.loads(last.read_text())
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict):
            why = "no snapshot of this configuration in the cache yet"
        else:
            changes = _what_changed(old, rk.inputs)
            why = "; ".join(changes) if changes else "the cached snapshot was removed"
    return state, why


def write_inputs(rk: ReuseKey) -> None:
    """Record a snapshot just made: its inputs, and as the project's last one (for explain)."""
    (rk.directory / INPUTS_FILE).write_text(json.dumps(rk.inputs, indent=1, sort_keys=True) + "\n")
    last = store_dir() / f"last-{rk.identity}.json"
    tmp = last.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rk.inputs, sort_keys=True))
    os.replace(tmp, last)


def _age(seconds: float) -> str:
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400} d"
    if s >= 3600:
        return f"{s // 3600} h"
    if s >= 60:
        return f"{s // 60} min"
    return f"{s} s"


# ------------------------------------------------------------------------------ clean


def snapshot_locks() -> tuple[str, ...]:
    try:
        return tuple(sorted(lock_name(e.name) for e in store_dir().iterdir() if e.is_dir()))
    except OSError:
        return ()


def _stale(entry: Path, now: float) -> str | None:
    try:
        inputs = json.loads((entry / INPUTS_FILE).read_text())
    except (OSError, ValueError):
        return "incomplete snapshot (no inputs.json)"
    if not (entry / READY_FILE).exists():
        return "incomplete snapshot (an interrupted or failed prepare)"
    for name, path in (inputs.get("files") or {}).items():
        try:
            st = Path(path).stat()
        except OSError:
            return f"its {name} {path} is gone"
        if [st.st_size, st.st_mtime_ns] != (inputs.get("stamps") or {}).get(name):
            return f"its {name} {path} changed"
    try:
        unused = now - (entry / READY_FILE).stat().st_mtime
    except OSError:
        unused = 0
    if unused > UNUSED_DAYS * 86400:
        return f"unused for {int(unused // 86400)} days"
    return None


def plan_snapshots(
    level: str,
) -> tuple[list[tuple[Path, str, tuple[str, ...]]], list[tuple[Path, str]]]:
    """(remove, keep) for the entries under ``snapshots/``: (path, why, locks) / (path, why)."""
    remove: list[tuple[Path, str, tuple[str, ...]]] = []
    keep: list[tuple[Path, str]] = []
    now = time.time()
    try:
        items = sorted(store_dir().iterdir())
    except OSError:
        return remove, keep
    for e in items:
        if not e.is_dir():
            if e.name.startswith("last-") and level in ("all", "everything"):
                remove.append((e, "record of the last run's snapshot inputs", ()))
            continue
        locks = (lock_name(e.name),)
        if level in ("all", "everything"):
            remove.append((e, f"reusable snapshot (--{level})", locks))
            continue
        why = _stale(e, now)
        if why is not None:
            remove.append((e, f"stale reusable snapshot: {why}", locks))
        else:
            keep.append((e, "reusable snapshot (--ignition-reuse); --all removes it"))
    return remove, keep
