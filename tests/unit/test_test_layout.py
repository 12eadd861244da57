"""The test tree's own rule: every test module's basename is unique across tests/.

The test folders are not packages, so pytest imports each module by its basename; two files
named alike in different folders fail collection of the whole run.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_basenames_are_unique() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
