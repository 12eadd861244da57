"""tests/nested_arm64/: tests that run INSIDE the arm64 nested harness, on real arm64 KVM::

    python -m pytest_ignition.nested run --arch aarch64 -- python3 -m pytest tests/nested_arm64 -q
    make test-nested-arm64      # the same, with -p no:hypothesispytest (its import costs seconds)

(``python3`` there is the arm64 interpreter of the harness's root; the virtualenv's pure-Python
packages are on its path.) Anywhere else they are collected and skipped.
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from pytest_ignition.nested import inside


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    arm64 = inside() and platform.machine() == "aarch64"
    for item in items:
        if here in item.path.parents and not arm64:
            item.add_marker(
                pytest.mark.skip(
                    reason="runs only inside the arm64 nested harness (python -m "
                    "pytest_ignition.nested run --arch aarch64 -- python3 -m pytest "
                    "tests/nested_arm64)"
                )
            )
