"""The host memory budget on real guests: with room for one VM, ``-n 2`` workers take turns
(no two tests hold a VM at once, none fails); a VM larger than the budget is an error that
names the setting, before any QEMU starts.

The inner runs get a cache dir of their own (hard links to the built guest) so their budget is
not shared with whatever else runs VMs on this machine.
"""

from __future__ import annotations

import itertools
import json
import shutil

import pytest

from pytest_ignition import _netns
from pytest_ignition._testing import require
from pytest_ignition.budget import vm_mib
from pytest_ignition.guest import find_guest

pytestmark = pytest.mark.vm

GUEST = find_guest()  # before pytester moves HOME

SUITE = """
import json, os, time

def _log(**kw):
    with open(os.environ["SPANS"], "a") as f:
        f.write(json.dumps(kw) + "\\n")

import pytest

@pytest.mark.parametrize("i", range(4))
def test_turns(ignition_vm, i):
    t0 = time.time()
    assert ignition_vm.run("echo $((40 + 2))").stdout.strip() == "42"
    time.sleep(0.5)  # long enough that a second VM, had it been let in, would overlap
    _log(worker=os.environ.get("PYTEST_XDIST_WORKER"), start=t0, end=time.time())
"""


@pytest.fixture
def own_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    require(shutil.which("qemu-system-x86_64"), "qemu-system-x86_64 not found")
    require(GUEST is not None, "guest not built (python -m pytest_ignition.guest build)")
    assert GUEST is not None
    cache = tmp_path_factory.mktemp("budget-cache")
    _netns.seed_cache(cache, GUEST.kernel, GUEST.initrd)
    monkeypatch.setenv("IGNITION_CACHE_DIR", str(cache))
    for var in ("IGNITION_MEMORY_BUDGET", "IGNITION_MEMORY", "IGNITION_PREFETCH"):
        monkeypatch.delenv(var, raising=False)
    return cache


def test_workers_take_turns_when_the_budget_fits_one_vm(
    pytester: pytest.Pytester, own_cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans = pytester.path / "spans.jsonl"
    monkeypatch.setenv("SPANS", str(spans))
    pytester.makepyfile(test_turns=SUITE)
    one_vm = vm_mib(256, "qemu")
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-n",
        "2",
        "--ignition-engine=qemu",
        "--ignition-memory=256M",
        f"--ignition-memory-budget={one_vm + 16}M",
        timeout=900,
    )
    result.assert_outcomes(passed=4)
    rows = [json.loads(line) for line in spans.read_text().splitlines()]
    assert len(rows) == 4 and {r["worker"] for r in rows} == {"gw0", "gw1"}, rows
    rows.sort(key=lambda r: r["start"])
    for a, b in itertools.pairwise(rows):
        assert b["start"] >= a["end"], f"two VMs held at once past the budget: {a} {b}"
    budget_dir = next(own_cache.glob("budget-*"))
    assert not list(budget_dir.glob("*.json"))  # every reservation was given back


def test_a_vm_larger_than_the_budget_is_an_error_naming_the_setting(
    pytester: pytest.Pytester, own_cache
) -> None:
    pytester.makepyfile("def test_big(ignition_vm):\n    pass\n")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--ignition-engine=qemu", "--ignition-memory-budget=300M"
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*boot of a 512 MiB guest (main) needs 576 MiB, more than the whole host memory "
            "budget of 300 MiB (memory_budget=300M (--ignition-memory-budget)); raise it with "
            "--ignition-memory-budget*"
        ]
    )
