"""``python -m pytest_ignition``: see :mod:`pytest_ignition.cli`."""

import sys

from pytest_ignition.cli import main

sys.exit(main())
