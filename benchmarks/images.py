"""Benchmark: root image build time, cold and on a cache hit (``pytest_ignition.guest.image``).

Records (``benchmarks/results/images.json``, part ``build``: a run replaces that part's records,
the other parts stay: :mod:`benchmarks.image_boot`, :mod:`benchmarks.kernel_cost`), metric
``image_build_time``, engine ``builder``, where ``host`` (this machine, no VM), params ``image``
and ``cache``:

* ``debian:bookworm`` + ``python3``, ``cache=cold``: ``ensure_image`` into an empty cache dir
  (mmdebstrap from the mirror, then mke2fs -d). Minutes; ``--debian-cold`` repeats (default 1).
* the same, ``cache=hit``: ``ensure_image`` again with the per-process memos cleared (what a
  new pytest session pays: mmdebstrap/mke2fs version probes for the key, image.json read).
* ``oci-archive`` (two layers the script writes itself from this host's Python standard
  library, one whiteout), ``cache=cold`` and ``cache=hit`` (a hit hashes the archive).

Usage: ``python -m benchmarks.images [--debian-cold 1] [--oci-cold 3] [--hits 10] [--quick]``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks import common

RESULTS = common.RESULTS_DIR / "images.json"
METRIC = "image_build_time"


def _add(t: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime = len(data), 1_700_000_000
    t.addfile(ti, io.BytesIO(data))


def make_oci(path: Path) -> dict:
    """A docker-save archive: layer 1 = this host's Python stdlib under usr/lib/pythonX.Y,
    layer 2 = one file replaced, one whited out. Returns its params."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    base = io.BytesIO()
    with tarfile.open(fileobj=base, mode="w", format=tarfile.PAX_FORMAT) as t:

        def skip(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
            return None if "__pycache__" in ti.name or "site-packages" in ti.name else ti

        t.add(stdlib, arcname=f"usr/lib/{stdlib.name}", filter=skip)
    upper = io.BytesIO()
    with tarfile.open(fileobj=upper, mode="w", format=tarfile.PAX_FORMAT) as t:
        _add(t, f"usr/lib/{stdlib.name}/this.py", b"print('replaced')\n")
        _add(t, f"usr/lib/{stdlib.name}/.wh.antigravity.py", b"")
    layers = [base.getvalue(), upper.getvalue()]
    cfg = json.dumps(
        {
            "architecture": "amd64" if os.uname().machine == "x86_64" else "arm64",
            "os": "linux",
            "config": {"Env": ["PATH=/usr/bin:/bin"], "WorkingDir": "/"},
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(b).hexdigest() for b in layers],
            },
        }
    ).encode()
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    names = [f"{i}/layer.tar" for i in range(len(layers))]
    with tarfile.open(path, "w") as t:
        _add(t, "manifest.json", json.dumps([{"Config": cfg_name, "Layers": names}]).encode())
        _add(t, cfg_name, cfg)
        for n, b in zip(names, layers, strict=True):
            _add(t, n, b)
    return {"layers": 2, "archive_mib": round(path.stat().st_size / 2**20, 1)}


def _clear_memos() -> None:
    from pytest_ignition.guest import image

    image._version_memo.clear()
    image._digest_memo.clear()


def time_hits(spec: str, packages: tuple[str, ...], hits: int) -> list[float]:
    """``hits`` cache hits of an image already in the cache (memos cleared each time, as a new
    pytest session finds them); seconds each."""
    from pytest_ignition.guest.image import ensure_image

    out = []
    for _ in range(hits):
        _clear_memos()
        t0 = time.perf_counter()
        img = ensure_image(spec, packages)
        out.append(time.perf_counter() - t0)
        assert img.path.is_file()
    return out


def measure(spec: str, packages: tuple[str, ...], cold: int, hits: int, cache_root: Path):
    """(cold seconds list, hit seconds list); each cold build in its own empty cache dir."""
    from pytest_ignition.guest.image import ensure_image

    colds = []
    last = None
    for i in range(max(cold, 1 if hits else 0)):
        d = cache_root / f"cold{i}"
        os.environ["IGNITION_CACHE_DIR"] = str(d)
        _clear_memos()
        t0 = time.perf_counter()
        ensure_image(spec, packages, progress=lambda m: print(f"  {m}", file=sys.stderr))
        colds.append(time.perf_counter() - t0)
        if last is not None:
            shutil.rmtree(last, ignore_errors=True)  # keep one image on disk, not n
        last = d
    return colds[:cold], time_hits(spec, packages, hits)


def _records(params: dict, cold: list[float], hit: list[float]) -> list[dict]:
    return [
        common.record(METRIC, "builder", "host", {**params, "cache": kind}, [s * 1000 for s in ss])
        for kind, ss in (("cold", cold), ("hit", hit))
        if ss
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--debian-cold", type=int, default=1, help="cold debian builds (minutes each)")
    ap.add_argument("--oci-cold", type=int, default=3, help="cold OCI builds")
    ap.add_argument("--hits", type=int, default=10, help="cache hits per image")
    ap.add_argument("--quick", action="store_true", help="no cold debian build, fewer repeats")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.quick:
        args.debian_cold, args.oci_cold, args.hits = 0, 1, 3

    records = []
    saved = os.environ.get("IGNITION_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="ignition-bench-images-", dir="/var/tmp") as tmpd:
        tmp = Path(tmpd)
        arc = tmp / "bench-oci.tar"
        oparams = make_oci(arc)
        spec = f"oci-archive:{arc}"
        cold, hit = measure(spec, (), args.oci_cold, args.hits, tmp / "oci")
        records += _records({"image": "oci-archive", **oparams}, cold, hit)
        shutil.rmtree(tmp / "oci", ignore_errors=True)
        dp = {"image": "debian:bookworm", "packages": "python3"}
        if shutil.which("mmdebstrap") is None:
            why = "mmdebstrap is not installed (apt-get install mmdebstrap)"
            records += [
                common.absent_record(METRIC, "builder", "host", why, **dp, cache=k)
                for k in ("cold", "hit")
            ]
        elif args.debian_cold:
            cold, hit = measure("debian:bookworm", ("python3",), args.debian_cold, args.hits,
                                tmp / "debian")  # fmt: skip
            records += _records(dp, cold, hit)
        else:
            # --quick: hits against the user's cache (the e2e tests' image), no cold build
            if saved is None:
                os.environ.pop("IGNITION_CACHE_DIR", None)
            else:
                os.environ["IGNITION_CACHE_DIR"] = saved
            from pytest_ignition.guest.image import ensure_image

            ensure_image("debian:bookworm", ("python3",))
            why = "no cold build under --quick"
            records.append(common.absent_record(METRIC, "builder", "host", why, **dp, cache="cold"))
            records += _records(dp, [], time_hits("debian:bookworm", ("python3",), args.hits))
    for r in records:
        print(json.dumps(r))
    if not args.no_write:
        common.replace_part(args.results, "build", records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
