"""Coverage-guided run of one fuzz target under atheris (libFuzzer for Python).

    python tests/fuzz/run.py TARGET SECONDS [libFuzzer flags...]

TARGET is a name in tests/fuzz/targets.py; the corpus lives in $FUZZ_CORPUS/TARGET (default
/tmp/pyfuzz-corpus/TARGET, outside git), seeded from tests/fuzz/seeds/TARGET. Crashes are
written there as crash-*. libFuzzer's final stats give the number of executed inputs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

with atheris.instrument_imports(include=["pytest_ignition", "targets"]):
    import targets


def main() -> None:
    name, seconds, *flags = sys.argv[1:]
    target = targets.TARGETS[name]
    corpus = Path(os.environ.get("FUZZ_CORPUS", "/tmp/pyfuzz-corpus")) / name
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = HERE / "seeds" / name
    argv = [sys.argv[0], f"-max_total_time={seconds}", "-print_final_stats=1", "-max_len=4096"]
    argv += [f"-artifact_prefix={corpus}/", *flags, str(corpus)]
    if seeds.is_dir():
        argv.append(str(seeds))
    atheris.Setup(argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
