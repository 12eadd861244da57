"""The reusable snapshots' key inputs (pytest_ignition.reuse) without a VM: which project files a
prepare hook's module pulls in, and what an explanation says changed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pytest_ignition import reuse


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "conftest.py").write_text(
        "import os\nimport pytest\nimport helpers\nfrom pkg import sub\n"
        "def pytest_ignition_prepare(vm):\n    helpers.setup(vm)\n"
    )
    (tmp_path / "helpers.py").write_text("from . import nothing_here\nimport deep\n")
    (tmp_path / "deep.py").write_text("X = 1\n")
    (tmp_path / "unrelated.py").write_text("Y = 2\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub.py").write_text("from .other import z\n")
    (tmp_path / "pkg" / "other.py").write_text("z = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("helpers", "deep", "pkg", "pkg.sub", "pkg.other"):
        sys.modules.pop(name, None)
    return tmp_path


def test_sources_follow_project_imports_transitively_and_skip_the_rest(project: Path) -> None:
    got = reuse.project_sources([str(project / "conftest.py")], project)
    assert set(got) == {
        "conftest.py",
        "helpers.py",
        "deep.py",
        "pkg/__init__.py",
        "pkg/sub.py",
        "pkg/other.py",
    }, got  # not unrelated.py, not os or pytest (outside the project)


def test_editing_a_helper_two_imports_away_changes_the_sources(project: Path) -> None:
    before = reuse.project_sources([str(project / "conftest.py")], project)
    (project / "deep.py").write_text("X = 2\n")
    after = reuse.project_sources([str(project / "conftest.py")], project)
    assert before["deep.py"] != after["deep.py"]
    assert {k for k in before if before[k] != after[k]} == {"deep.py"}
    changes = reuse._what_changed({"prepare_sources": before}, {"prepare_sources": after})
    assert changes == ["prepare hook sources changed: deep.py"]


def test_explanations_name_engine_and_key_changes() -> None:
    old = {"config_key": "a", "engine_version": "7.2", "snapshot_key": ["x"]}
    new = {"config_key": "b", "engine_version": "8.0", "snapshot_key": ["y"]}
    why = reuse._what_changed(old, new)
    assert "the configuration or a kernel/initrd/rootfs/image file changed" in why
    assert "engine version '7.2' -> '8.0'" in why
    assert "pytest_ignition_snapshot_key returned other strings" in why


def _entry(store: Path, name: str, files: dict[str, Path], ready: bool = True) -> Path:
    d = store / name
    d.mkdir(parents=True)
    stamps = {}
    for k, p in files.items():
        st = p.stat()
        stamps[k] = [st.st_size, st.st_mtime_ns]
    inputs = {"files": {k: str(p) for k, p in files.items()}, "stamps": stamps}
    (d / reuse.INPUTS_FILE).write_text(json.dumps(inputs))
    if ready:
        (d / reuse.READY_FILE).write_text("{}")
    return d


def test_clean_removes_stale_reusable_snapshots_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_ignition.guest.build import plan_clean

    monkeypatch.setenv("IGNITION_CACHE_DIR", str(tmp_path / "cache"))
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"k" * 10)
    other = tmp_path / "initrd"
    other.write_bytes(b"i")
    store = reuse.store_dir()
    good = _entry(store, "a" * 32, {"kernel": kernel})
    changed = _entry(store, "b" * 32, {"kernel": kernel, "initrd": other})
    half = _entry(store, "c" * 32, {"kernel": kernel}, ready=False)
    other.write_bytes(b"changed")
    remove, keep = reuse.plan_snapshots("stale")
    assert {p for p, _, _ in remove} == {changed, half}
    assert [p for p, _ in keep] == [good]
    assert all(locks == (f"snapshot-{p.name}",) for p, _, locks in remove)
    assert "changed" in dict((p, w) for p, w, _ in remove)[changed]
    remove, keep = reuse.plan_snapshots("all")
    assert {p for p, _, _ in remove} == {good, changed, half} and keep == []
    # the guest pipeline's clean plan includes them
    plan = plan_clean({}, "stale")
    assert {i.path for i in plan.remove} >= {changed, half}
    assert good in {p for p, _ in plan.keep}
    assert reuse.snapshot_locks() == tuple(sorted(f"snapshot-{c * 32}" for c in "abc"))
