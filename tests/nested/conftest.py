"""tests/nested/: tests that run INSIDE the nested harness (pytest_ignition.nested).

Run them with ``make test-nested``, i.e.::

    python -m pytest_ignition.nested run -- .venv/bin/python -m pytest tests/nested -q

Anywhere else they are collected and skipped (the harness sets IGNITION_NESTED=1 in there), except
modules that declare ``RUNS_OUTSIDE = True``: those drive the harness from outside and are skipped
inside it. Inside the harness, a missing piece (guest not built, QEMU absent) skips, or fails
under IGNITION_REQUIRE=1.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_ignition.nested import inside


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here not in item.path.parents:
            continue
        item.add_marker(pytest.mark.nested)
        outside_test = bool(getattr(item.module, "RUNS_OUTSIDE", False))
        if outside_test and inside():
            item.add_marker(pytest.mark.skip(reason="drives the nested harness from outside it"))
        elif not outside_test and not inside():
            item.add_marker(
                pytest.mark.skip(
                    reason="runs only inside the nested harness (make test-nested; "
                    "python -m pytest_ignition.nested run -- .venv/bin/python -m pytest tests/nested)"
                )
            )
