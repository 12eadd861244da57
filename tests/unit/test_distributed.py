"""Remote xdist workers' per-host run directories and host labels (no VM, no ssh)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_ignition import distributed as dist


def _config(uid: str = "abc123", remote: bool = True) -> SimpleNamespace:
    wi = {"workerid": "gw3", "testrunuid": uid, dist.REMOTE_KEY: remote, dist.TX_KEY: "ssh=me@h"}
    return SimpleNamespace(workerinput=wi, stash=pytest.Stash())


@pytest.fixture
def tmpdir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TMPDIR", str(tmp_path / "t"))
    monkeypatch.setenv("IGNITION_CACHE_DIR", str(tmp_path / "cache-a"))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    (tmp_path / "t").mkdir()
    return tmp_path


def test_labels_only_on_remote_workers() -> None:
    assert dist.where(_config(remote=False)) == ""  # type: ignore[arg-type]
    label = dist.host_label(_config())  # type: ignore[arg-type]
    assert label.endswith("(ssh=me@h, gw3)")
    assert dist.where(_config()).startswith("on host ")  # type: ignore[arg-type]


def test_workers_of_one_run_on_one_host_share_a_dir_others_do_not(
    tmpdir_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = dist.join_run(_config("run1"))  # type: ignore[arg-type]
    again = dist.join_run(_config("run1"))  # type: ignore[arg-type]
    other_run = dist.join_run(_config("run2"))  # type: ignore[arg-type]
    monkeypatch.setenv("IGNITION_CACHE_DIR", str(tmpdir_env / "cache-b"))  # "another host"
    other_host = dist.join_run(_config("run1"))  # type: ignore[arg-type]
    assert a == again
    assert len({a, other_run, other_host}) == 3
    assert (a.parent.stat().st_mode & 0o777) == 0o700


def test_the_last_worker_out_removes_the_run_dir_and_dead_runs_are_pruned(
    tmpdir_env: Path,
) -> None:
    run = dist.join_run(_config("live"))  # type: ignore[arg-type]
    (run / "ignition-snapshots").mkdir()
    # A run whose only worker was another process that has died (never left).
    code = (
        "import sys; from types import SimpleNamespace; import pytest\n"
        "from pytest_ignition import distributed as d\n"
        "wi = {'testrunuid': 'dead', d.REMOTE_KEY: True}\n"
        "print(d.join_run(SimpleNamespace(workerinput=wi, stash=pytest.Stash())))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    dead = Path(out.stdout.strip())
    assert dead.is_dir()
    again = dist.join_run(_config("live"))  # joining prunes runs with no live worker
    assert not dead.exists() and again == run and run.is_dir()
    dist.leave_run(run)  # this process was registered once (same pid): now gone
    assert not run.exists()


def test_a_foreign_runs_dir_is_refused(tmpdir_env: Path) -> None:
    base = dist.runs_dir()
    base.parent.mkdir(parents=True, exist_ok=True)
    target = tmpdir_env / "elsewhere"
    target.mkdir()
    base.symlink_to(target)
    with pytest.raises(pytest.UsageError, match="not a directory owned by this user"):
        dist.join_run(_config())  # type: ignore[arg-type]


def test_a_worker_leaves_at_sessionfinish_before_xdist_reports_it_done(tmpdir_env: Path) -> None:
    # The controller may end (and sshd hang up on this worker) as soon as xdist's sessionfinish
    # wrapper reports the worker finished, so unconfigure can be too late to remove the dir.
    cfg = _config("finish")
    run = dist.run_dir(cfg)  # type: ignore[arg-type]
    assert run.is_dir()
    dist.pytest_sessionfinish(SimpleNamespace(config=cfg))  # type: ignore[arg-type]
    assert not run.exists()
    with pytest.raises(RuntimeError, match="already left"):
        dist.run_dir(cfg)  # type: ignore[arg-type]
    assert not run.exists()  # ...and nothing recreated it
    dist.pytest_unconfigure(cfg)  # type: ignore[arg-type]  (a second leave is a no-op)
    impl = dist.pytest_sessionfinish
    assert getattr(impl, "pytest_impl", {}).get("trylast") or getattr(impl, "trylast", False), (
        "must run after the plugin's own sessionfinish closed the VMs"
    )
