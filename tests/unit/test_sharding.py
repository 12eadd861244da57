"""CI sharding with pytest-split (docs/usage.md "Running on many machines"): two shards of a
suite, one of them with ``-n 2`` inside, together run every test exactly once. No VM."""

from __future__ import annotations

import json
from collections import Counter

import pytest

pytest.importorskip(
    "pytest_split", reason="pytest-split is in the test extra: pip install -e .[test]"
)

CONFTEST = """
import os

def pytest_runtest_call(item):
    # One line per test body run, from whichever process ran it (xdist workers included).
    with open(os.environ.get("RAN_LOG", os.devnull), "a") as f:
        f.write(item.nodeid + "\\n")
"""


def _suite(pytester: pytest.Pytester) -> list[str]:
    pytester.makeconftest(CONFTEST)
    ids = []
    for m in range(3):
        body = []
        for t in range(7):
            body.append(f"def test_{t}():\n    assert {t} == {t}\n")
            ids.append(f"test_mod{m}.py::test_{t}")
        pytester.makepyfile(**{f"test_mod{m}": "\n".join(body)})
    return ids


def test_two_shards_run_every_test_exactly_once(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = _suite(pytester)
    # Recorded durations (as `pytest --store-durations` writes them), uneven on purpose, and
    # missing two tests: new tests get the average and must still land in exactly one shard.
    durations = {nid: 0.1 + (i % 5) * 0.7 for i, nid in enumerate(ids[:-2])}
    (pytester.path / ".test_durations").write_text(json.dumps(durations))
    log = pytester.path / "ran.log"
    monkeypatch.setenv("RAN_LOG", str(log))
    per_group: list[list[str]] = []
    for group, extra in ((1, ()), (2, ("-n", "2"))):
        start = len(log.read_text().splitlines()) if log.exists() else 0
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "--splits", "2", "--group", str(group), *extra
        )
        assert result.ret == 0, result.stdout.str()[-2000:]
        per_group.append(log.read_text().splitlines()[start:])
    ran = Counter(per_group[0] + per_group[1])
    assert set(ran) == set(ids)
    assert all(n == 1 for n in ran.values()), [k for k, n in ran.items() if n != 1]
    assert per_group[0] and per_group[1]  # both shards did work
    assert not set(per_group[0]) & set(per_group[1])
