"""pytest-ignition's benchmarks: ``python -m benchmarks`` runs them all and writes
``benchmarks/results/latest.{json,md}`` and the plots; each ``benchmarks/<name>.py`` also runs
alone (``python -m benchmarks.<name>``) and writes ``benchmarks/results/<name>.json``."""
