"""pytest-xdist workers on other hosts: two hosts made here as network namespaces with sshd.

A controller (in its own namespace) runs a small VM suite with ``-d --tx ssh=...`` to both
hosts. Each host has its own sshd (its own hostname, keys, ``IGNITION_CACHE_DIR``), its cache
seeded with hard links to the guest built here (no host builds a kernel). Shown: every test
runs exactly once, each host makes one snapshot for all of its workers (two workers on one
host), a failure names the host it ran on, the per-host run directories are gone afterwards,
and a host whose sshd gives a PATH without QEMU reports that, with its name, as the skip
reason. Real QEMU, real guests, real ssh; nothing leaves the namespaces.
"""

from __future__ import annotations

import shutil
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_ignition import _netns
from pytest_ignition._testing import require

pytestmark = pytest.mark.vm

N = 6  # VM tests in the inner suite, plus one that fails on purpose

CONFTEST = """
import os, socket

def pytest_ignition_prepare(vm):
    # One line per snapshot made: the host's own cache dir is where its sshd points us.
    with open(os.path.join(os.environ["IGNITION_CACHE_DIR"], "prepared.log"), "a") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\\n")
"""

SUITE = f"""
import socket
import pytest

@pytest.mark.parametrize("n", range({N}))
def test_vm(ignition_vm, ignition_snapshot, record_property, n):
    record_property("host", socket.gethostname())
    record_property("snapshot", str(ignition_snapshot.directory))
    assert ignition_vm.run(f"echo $(( {{n}} * 7 ))").stdout.strip() == str(n * 7)

def test_fails_on_purpose(ignition_vm, record_property):
    record_property("host", socket.gethostname())
    out = ignition_vm.run("echo guest-was-here").stdout.strip()
    assert out == "something else", "deliberate failure"
"""


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_netns.Rig]:
    why = _netns.missing_tools()
    require(why is None, f"namespace hosts cannot be made here: {why}")
    require(shutil.which("qemu-system-x86_64"), "qemu-system-x86_64 not found")
    from pytest_ignition.guest import find_guest

    guest = find_guest()
    require(guest is not None, "guest not built (python -m pytest_ignition.guest build)")
    assert guest is not None
    try:
        r = _netns.Rig(tmp_path_factory.mktemp("rig"))
    except _netns.RigUnavailable as e:
        require(False, f"network namespaces cannot be made here: {e}")
        raise
    try:
        a = r.add_host("ign-a")
        b = r.add_host("ign-b")
        r.add_sshd(b, "ign-b-noqemu", 2222, path=_netns.path_without(r.workdir, "qemu-"))
        for h in (a, b):
            _netns.seed_cache(h.cache, guest.kernel, guest.initrd)
        yield r
    finally:
        r.close()


def _tx(rig: _netns.Rig, alias: str, here: Path, n: int = 1) -> list[str]:
    spec = f"ssh={alias}//ssh_config={rig.ssh_config}//python={sys.executable}//chdir={here}"
    return ["--tx", f"{n}*{spec}" if n > 1 else spec]


def _cases(xml: Path) -> list[tuple[str, str, dict[str, str]]]:
    """(name, outcome, properties) per testcase of a junit file."""
    out = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = tag
        props = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        out.append((case.get("name", ""), outcome, props))
    return out


def _run(pytester: pytest.Pytester, rig: _netns.Rig, *args: str) -> pytest.RunResult:
    cmd = rig.controller([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args])
    t0 = time.monotonic()
    result = pytester.run(*cmd, timeout=600)
    print(f"controller run took {time.monotonic() - t0:.1f} s")
    return result


def test_two_hosts_each_snapshot_once_every_test_once(
    pytester: pytest.Pytester, rig: _netns.Rig
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    here = pytester.path
    xml = here / "junit.xml"
    result = _run(
        pytester,
        rig,
        "-d",
        *_tx(rig, "ign-a", here, n=2),  # two workers on one host share its snapshot
        *_tx(rig, "ign-b", here),
        "--ignition-engine=qemu",
        f"--junitxml={xml}",
        "-o",
        "junit_family=xunit1",
        "-rf",
    )
    out = result.stdout.str()
    cases = _cases(xml)
    names = Counter(name for name, _, _ in cases)
    assert len(cases) == N + 1 and all(c == 1 for c in names.values()), (names, out[-3000:])
    outcomes = Counter(o for _, o, _ in cases)
    assert outcomes == {"passed": N, "failure": 1}, (outcomes, out[-3000:])
    hosts = Counter(p["host"] for _, _, p in cases)
    assert set(hosts) == {"ign-a", "ign-b"}, hosts  # both hosts ran tests
    # One snapshot per host: the prepare hook ran once in each host's own cache...
    for h in rig.hosts:
        lines = (h.cache / "prepared.log").read_text().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{h.name} "), (h.name, lines)
    # ...and every test on a host restored the same one, in a directory of that host's.
    snaps: dict[str, set[str]] = {}
    for _, _, p in cases:
        if "snapshot" in p:
            snaps.setdefault(p["host"], set()).add(p["snapshot"])
    assert all(len(s) == 1 for s in snaps.values()) and len(snaps) == 2, snaps
    assert len({next(iter(s)) for s in snaps.values()}) == 2
    # The failure names the host it ran on (hostname, how the controller reaches it, worker).
    fail_host = next(p["host"] for _, o, p in cases if o == "failure")
    result.stdout.fnmatch_lines(
        [
            "*- ignition host -*",
            f"{fail_host} (ssh={fail_host}, gw*)",
        ]
    )
    assert "2 snapshot(s) booted and prepared" in out, out[-2000:]
    # The last worker on each host removed its run directory (snapshots included).
    for s in snaps.values():
        run_dir = Path(next(iter(s))).parent.parent
        assert not run_dir.exists(), run_dir


def test_a_host_without_qemu_says_so_with_its_name(
    pytester: pytest.Pytester, rig: _netns.Rig
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    here = pytester.path
    result = _run(
        pytester,
        rig,
        "-d",
        *_tx(rig, "ign-b-noqemu", here),
        "--ignition-engine=qemu",
        "-k",
        "test_vm",
        "-rs",
    )
    result.assert_outcomes(skipped=N)
    result.stdout.fnmatch_lines(
        [
            f"SKIPPED [[]{N}] *on host ign-b (ssh=ign-b-noqemu, gw0): no usable VM engine (qemu): "
            "qemu-system-x86_64 was not found on PATH*"
        ]
    )


def test_a_path_only_the_controller_has_fails_on_the_worker_naming_it(
    pytester: pytest.Pytester, rig: _netns.Rig
) -> None:
    # A relative --ignition-kernel that exists in the controller's directory, not in the
    # directory the worker runs in: the controller does not insist on it, the worker's VM
    # tests fail with the host and the setting named (its plain tests still pass).
    (pytester.path / "bzImage").write_bytes(b"not really a kernel")
    elsewhere = pytester.mkdir("worker-side")
    (elsewhere / "test_suite.py").write_text(
        "def test_plain():\n    pass\n\ndef test_vm(ignition_vm):\n    pass\n"
    )
    result = _run(
        pytester,
        rig,
        "-d",
        *_tx(rig, "ign-a", elsewhere),
        "--ignition-engine=qemu",
        "--ignition-kernel=bzImage",
        "-rfE",
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*on host ign-a (ssh=ign-a, gw0): pytest-ignition: --ignition-kernel*bzImage*does not exist*"
        ]
    )
