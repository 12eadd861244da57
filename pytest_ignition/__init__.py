"""pytest-ignition: every test gets its own Linux microVM.

The public names users import live here; the plugin itself is registered
through the ``pytest11`` entry point (:mod:`pytest_ignition.plugin`).
"""

__version__ = "0.1.0"
