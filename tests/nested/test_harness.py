"""The nested harness driven from outside: exit codes, output, shares, isolation, timeouts.

These boot the hypervisor host under QEMU TCG (tens of seconds each), so one boot checks many
things at once.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pytest_ignition import nested
from pytest_ignition._testing import require

RUNS_OUTSIDE = True  # see conftest.py: these run outside the harness and skip inside it

PROBE = r"""
echo to-stdout; echo to-stderr >&2
[ "$IGNITION_NESTED" = 1 ] || exit 11
[ "$IGNITION_PROBE" = 'a b $c' ] || exit 12
[ "$(pwd)" = "$1" ] || exit 13
echo written-inside > result.txt || exit 14
head -c 1048576 /dev/urandom > big.bin && sha256sum big.bin > big.sha256 || exit 18
echo leak > /etc/ignition-nested-leak || exit 15
[ -c /dev/kvm ] || exit 16
grep -q ' / 9p \| / overlay ' /proc/mounts || exit 17
printf 'no newline at the end'
exit 7
"""


@pytest.fixture(scope="module")
def usable() -> None:
    ok, reason = nested.available()
    require(ok, f"nested harness not usable: {reason}")


def test_run_probe(usable: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctl_parent = tmp_path / "tmp"
    ctl_parent.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(ctl_parent))
    work = tmp_path / "work dir"
    work.mkdir()
    streamed: list[bytes] = []
    res = nested.run(
        ["sh", "-c", PROBE, "probe", str(work)],
        cwd=work,
        env={"IGNITION_PROBE": "a b $c"},
        timeout=600,
        stream=streamed.append,
    )
    assert res.exit_code == 7, res.output
    assert res.output.endswith("no newline at the end")
    assert "to-stdout\n" in res.output and "to-stderr\n" in res.output
    assert b"".join(streamed).decode() == res.output
    assert (work / "result.txt").read_text() == "written-inside\n"
    big = (work / "big.bin").read_bytes()
    assert len(big) == 1 << 20
    digest = (work / "big.sha256").read_text().split()[0]
    assert hashlib.sha256(big).hexdigest() == digest
    assert not Path("/etc/ignition-nested-leak").exists()
    assert 0 < res.boot_time < res.duration
    assert list(ctl_parent.iterdir()) == []  # the control directory is gone


def test_timeout_kills_the_host(
    usable: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # A command that outlives any timeout: the host itself boots in ~2.7 s here when quiet, so
    # `true` under a 2 s timeout could finish in time (it once did in a CI dry run).
    t0 = time.monotonic()
    with pytest.raises(nested.NestedTimeout) as e:
        nested.run(["sleep", "600"], cwd=tmp_path, timeout=5)
    assert "timed out after 5 s" in str(e.value)
    assert time.monotonic() - t0 < 60
    assert list(tmp_path.iterdir()) == []


def test_cli_returns_the_command_exit_code(usable: None, tmp_path: Path) -> None:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest_ignition.nested",
            "run",
            "--",
            "sh",
            "-c",
            "echo hi; exit 3",
        ],
        cwd=tmp_path,
        capture_output=True,
        timeout=600,
    )
    assert p.returncode == 3, p.stderr.decode(errors="replace")
    assert p.stdout == b"hi\n"


# Resets the host the first time (sysrq b: an immediate reset, no panic, nothing on the console),
# and exits 4 in the second host; the shared working directory remembers the first try.
RESET_ONCE = (
    "if [ -e tried ]; then exit 4; fi; : > tried && sync && echo b > /proc/sysrq-trigger; sleep 600"
)


def test_a_host_reset_under_the_command_is_retried_in_a_new_host(
    usable: None, tmp_path: Path
) -> None:
    def run(*opts: str) -> tuple[int, str]:
        p = subprocess.run(
            [sys.executable, "-m", "pytest_ignition.nested", "run", "--timeout", "600", *opts]
            + ["--", "sh", "-c", RESET_ONCE],
            cwd=tmp_path,
            capture_output=True,
            timeout=900,
        )
        return p.returncode, p.stderr.decode(errors="replace")

    rc, err = run()
    assert "(QEMU status 0): the command never ended (the host reset itself" in err, err
    assert rc == nested.EXIT_HARNESS, err  # no --retries: the harness's failure
    rc, err = run("--retries", "1")
    assert "the host's machine reset (not the command)" not in err, err  # tried exists already
    assert rc == 4, err
    (tmp_path / "tried").unlink()
    rc, err = run("--retries", "1")
    assert "the host's machine reset (not the command); running the command again" in err, err
    assert rc == 4, err  # the second host's answer
