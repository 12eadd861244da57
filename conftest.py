"""Root conftest: makes pytest's own ``pytester`` fixture available to this project's tests."""

pytest_plugins = ["pytester"]
