"""The image builder (``pytest_ignition.guest.image``): OCI archives the tests build themselves,
ext4 files used as is, the cache (hits, locks, nothing half-built), and real mmdebstrap builds.

Images are read back with ``debugfs`` (e2fsprogs): no mount, no loop device, no root needed to
check them. The real ``debian:bookworm`` build uses the user's cache (it is the image the e2e
tests boot, so it is normally warm); everything else gets a temporary ``IGNITION_CACHE_DIR``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from filelock import FileLock

from pytest_ignition._testing import require
from pytest_ignition.guest import build as gbuild
from pytest_ignition.guest import image as gimage
from pytest_ignition.guest.image import Image, ImageBuildError, ensure_image

IS_ROOT = os.geteuid() == 0
needs_tools = pytest.mark.usefixtures("_tools")


@pytest.fixture
def _tools() -> None:
    require(shutil.which("mke2fs") and shutil.which("debugfs"), "e2fsprogs not installed")
    require(IS_ROOT, "building images needs root (the image's files must be owned by root)")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("IGNITION_CACHE_DIR", str(root))
    return root


# --------------------------------------------------------------------------- archive makers


def layer(entries: list[tuple], *, compress: bool = False) -> bytes:
    """A layer tar. Entries: (name, "file", data[, mode]) | (name, "dir"[, mode]) |
    (name, "sym", target) | (name, "link", target) | (name, "chr", (major, minor))."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for e in entries:
            name, kind = e[0], e[1]
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            data = None
            if kind == "file":
                payload = e[2]
                ti.size = len(payload)
                ti.mode = e[3] if len(e) > 3 else 0o644
                data = io.BytesIO(payload)
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
                ti.mode = e[2] if len(e) > 2 else 0o755
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, e[2]
            elif kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, e[2]
            elif kind == "chr":
                ti.type, (ti.devmajor, ti.devminor), ti.mode = tarfile.CHRTYPE, e[2], 0o666
            else:
                raise ValueError(kind)
            t.addfile(ti, data)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def _config(layers_raw: list[bytes], env: list[str], workdir: str, arch: str = "amd64") -> bytes:
    diff_ids = [
        "sha256:" + hashlib.sha256(gzip.decompress(b) if b[:2] == b"\x1f\x8b" else b).hexdigest()
        for b in layers_raw
    ]
    cfg = {
        "architecture": arch,
        "os": "linux",
        "config": {"Env": env, "WorkingDir": workdir, "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    return json.dumps(cfg).encode()


def _add(t: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime = len(data), 1_700_000_000
    t.addfile(ti, io.BytesIO(data))


def docker_save(path: Path, layers_raw: list[bytes], env: list[str], workdir: str, **kw) -> Path:
    """What ``docker save`` writes (the classic layout): manifest.json, <id>/layer.tar."""
    cfg = _config(layers_raw, env, workdir, **kw)
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    names = [f"{hashlib.sha256(b).hexdigest()[:16]}/layer.tar" for b in layers_raw]
    manifest = [{"Config": cfg_name, "RepoTags": ["test:latest"], "Layers": names}]
    with tarfile.open(path, "w") as t:
        _add(t, "manifest.json", json.dumps(manifest).encode())
        _add(t, cfg_name, cfg)
        for n, b in zip(names, layers_raw, strict=True):
            _add(t, n, b)
    return path


def oci_layout(path: Path, layers_raw: list[bytes], env: list[str], workdir: str, **kw) -> Path:
    """An OCI image-layout archive (``skopeo copy ... oci-archive:``): index.json, blobs/."""
    cfg = _config(layers_raw, env, workdir, **kw)

    def desc(mt: str, data: bytes) -> dict:
        return {"mediaType": mt, "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                "size": len(data)}  # fmt: skip

    lt = "application/vnd.oci.image.layer.v1.tar"
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc("application/vnd.oci.image.config.v1+json", cfg),
        "layers": [desc(lt + ("+gzip" if b[:2] == b"\x1f\x8b" else ""), b) for b in layers_raw],
    }).encode()  # fmt: skip
    index = {"schemaVersion": 2,
             "manifests": [desc("application/vnd.oci.image.manifest.v1+json", manifest)]}  # fmt: skip
    with tarfile.open(path, "w") as t:
        _add(t, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _add(t, "index.json", json.dumps(index).encode())
        for blob in (cfg, manifest, *layers_raw):
            _add(t, "blobs/sha256/" + hashlib.sha256(blob).hexdigest(), blob)
    return path


LOWER = [
    ("etc", "dir"),
    ("etc/motd", "file", b"lower motd\n"),
    ("etc/gone", "file", b"whited out\n"),
    ("opt/old", "dir"),
    ("opt/old/stale", "file", b"from the lower layer\n"),
    ("bin/tool", "file", b"#!/bin/sh\necho tool\n", 0o4755),
    ("usr/lib", "dir"),
    ("lib", "sym", "usr/lib"),
    ("data", "dir", 0o700),
]
UPPER = [
    ("etc/motd", "file", b"upper motd\n"),
    ("etc/.wh.gone", "file", b""),
    ("opt/old/.wh..wh..opq", "file", b""),
    ("opt/old/fresh", "file", b"from the upper layer\n"),
    ("lib/libx.so", "file", b"through an inner symlink\n"),
    ("bin/tool2", "link", "bin/tool"),
]
ENV = ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=a=b c"]


def debugfs(img: Path, request: str) -> str:
    r = subprocess.run(
        ["debugfs", "-R", request, str(img)], capture_output=True, text=True, check=True
    )
    return r.stdout


def ls(img: Path, d: str) -> dict[str, tuple[int, int]]:
    """name -> (mode, uid) of a directory's entries (``ls -p``: /ino/mode/uid/gid/name/size/)."""
    out = {}
    for line in debugfs(img, f"ls -p {d}").splitlines():
        f = line.split("/")
        if len(f) >= 6 and f[5] not in (".", ".."):
            out[f[5]] = (int(f[2], 8), int(f[3]))
    return out


def entries(cache: Path) -> list[str]:
    d = cache / "images"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


# --------------------------------------------------------------------------- OCI


def _check_layered(img: Image) -> None:
    assert img.path.name == "rootfs.ext4"
    assert debugfs(img.path, "cat /etc/motd") == "upper motd\n"
    etc = ls(img.path, "/etc")
    assert "motd" in etc and "gone" not in etc and ".wh.gone" not in etc
    assert set(ls(img.path, "/opt/old")) == {"fresh"}  # the opaque dir dropped "stale"
    assert debugfs(img.path, "cat /usr/lib/libx.so") == "through an inner symlink\n"
    bins = ls(img.path, "/bin")
    assert bins["tool"][0] & 0o7777 == 0o4755 and bins["tool"][1] == 0
    assert debugfs(img.path, "cat /bin/tool2") == "#!/bin/sh\necho tool\n"
    assert "Links: 2" in debugfs(img.path, "stat /bin/tool")  # a hard link, not a copy
    assert ls(img.path, "/")["data"][0] & 0o777 == 0o700
    assert {"proc", "sys", "dev", "tmp", "run"} <= set(ls(img.path, "/"))
    assert img.env == (("PATH", "/usr/local/bin:/usr/bin:/bin"), ("GREETING", "a=b c"))
    assert img.workdir == "/data"
    meta = json.loads((img.path.parent / "image.json").read_text())
    assert meta["env"] == [list(kv) for kv in img.env] and meta["workdir"] == "/data"
    assert meta["key"] == img.key


@needs_tools
def test_docker_save_layers_whiteouts_env(cache: Path, tmp_path: Path) -> None:
    arc = docker_save(tmp_path / "img.tar", [layer(LOWER), layer(UPPER)], ENV, "/data")
    said: list[str] = []
    img = ensure_image(f"oci-archive:{arc}", progress=said.append)
    assert img.spec == f"oci-archive:{arc.resolve()}"
    assert img.path == cache / "images" / img.key / "rootfs.ext4"
    _check_layered(img)
    assert any("applying layer 2/2" in s for s in said)
    assert entries(cache) == [img.key]  # no temp dir left


@needs_tools
def test_oci_layout_gzip_layers(cache: Path, tmp_path: Path) -> None:
    raw = [layer(LOWER, compress=True), layer(UPPER, compress=True)]
    img = ensure_image(f"oci-archive:{oci_layout(tmp_path / 'img.oci', raw, ENV, '/data')}")
    _check_layered(img)


@needs_tools
def test_cache_hit_is_the_same_image_and_fast(cache: Path, tmp_path: Path) -> None:
    arc = docker_save(tmp_path / "img.tar", [layer(LOWER), layer(UPPER)], ENV, "/data")
    first = ensure_image(f"oci-archive:{arc}")
    before = first.path.stat().st_mtime_ns
    said: list[str] = []
    t0 = time.monotonic()
    again = ensure_image(f"oci-archive:{arc}", progress=said.append)
    assert time.monotonic() - t0 < 5  # generous: a hit hashes the archive and reads a JSON
    assert again == first and said == []
    assert first.path.stat().st_mtime_ns == before
    assert gimage.find_image(f"oci-archive:{arc}") == first
    # another archive (one byte of content differs) is another key
    other = docker_save(tmp_path / "o.tar", [layer(LOWER), layer(UPPER[:1])], ENV, "/data")
    assert gimage.image_key(f"oci-archive:{other}") != first.key


@needs_tools
def test_arch_mismatch_and_packages_refused(cache: Path, tmp_path: Path) -> None:
    arc = docker_save(tmp_path / "a.tar", [layer(LOWER)], ENV, "/", arch="arm64")
    with pytest.raises(ImageBuildError, match=r"a\.tar.*the image is for arm64"):
        ensure_image(f"oci-archive:{arc}", arch="x86_64")
    with pytest.raises(ImageBuildError, match="packages .*only apply to debian"):
        ensure_image(f"oci-archive:{arc}", packages=("python3",))
    assert entries(cache) == []


TRAVERSALS = {
    "dotdot": [("../escaped", "file", b"x")],
    "nested-dotdot": [("etc/../../escaped", "file", b"x")],
    "absolute": [("/escaped", "file", b"x")],
    "symlink-parent": [("up", "sym", "../../.."), ("up/escaped", "file", b"x")],
    "symlink-parent-deep": [("a/b", "dir"), ("a/b/up", "sym", "../../../x"), ("a/b/up/e", "file", b"")],
    "hardlink-out": [("pw", "link", "../../../../etc/passwd")],
    "hardlink-abs": [("pw", "link", "/etc/passwd")],
    "hardlink-via-symlink": [("h", "sym", "/etc"), ("pw", "link", "h/passwd")],
}  # fmt: skip


@needs_tools
@pytest.mark.parametrize("case", sorted(TRAVERSALS))
def test_path_traversal_refused(case: str, cache: Path, tmp_path: Path) -> None:
    outside = tmp_path / "escaped"
    arc = docker_save(tmp_path / "evil.tar", [layer(LOWER), layer(TRAVERSALS[case])], [], "/")
    with pytest.raises(ImageBuildError, match=r"evil\.tar|path traversal") as ei:
        ensure_image(f"oci-archive:{arc}")
    msg = str(ei.value)
    assert "\n" not in msg and "path traversal" in msg and "evil.tar" in msg
    assert not outside.exists() and not (tmp_path.parent / "escaped").exists()
    assert entries(cache) == []  # nothing half-built stays


@needs_tools
def test_truncated_and_corrupt_archives(cache: Path, tmp_path: Path) -> None:
    good = docker_save(tmp_path / "good.tar", [layer(LOWER), layer(UPPER)], ENV, "/data")
    data = good.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ImageBuildError, match=r"cut\.tar: (truncated or corrupt|not a usable)"):
        ensure_image(f"oci-archive:{cut}")
    # one byte of a layer's content changed: the diff_id no longer matches
    i = data.index(b"upper motd")
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data[:i] + b"U" + data[i + 1 :])
    with pytest.raises(ImageBuildError, match=r"bad\.tar.*does not match its diff_id"):
        ensure_image(f"oci-archive:{bad}")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x1f\x8b" + os.urandom(4000))
    with pytest.raises(ImageBuildError, match=r"junk\.tar: truncated or corrupt"):
        ensure_image(f"oci-archive:{junk}")
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as t:
        _add(t, "hello.txt", b"hi")
    with pytest.raises(ImageBuildError, match=r"empty\.tar.*neither manifest\.json"):
        ensure_image(f"oci-archive:{empty}")
    assert entries(cache) == []


@needs_tools
def test_interrupted_build_leaves_nothing(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arc = docker_save(tmp_path / "img.tar", [layer(LOWER)], [], "/")

    def ctrl_c(*a: object, **k: object) -> int:
        raise KeyboardInterrupt

    real = gimage._make_ext4
    monkeypatch.setattr(gimage, "_make_ext4", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        ensure_image(f"oci-archive:{arc}")
    assert entries(cache) == []
    monkeypatch.setattr(gimage, "_make_ext4", real)
    # a build killed with SIGKILL leaves its temp dir: the next build of that key removes it
    key = gimage.image_key(f"oci-archive:{arc}")
    dead = cache / "images" / f".{key}-killed"
    (dead / "root" / "etc").mkdir(parents=True)
    img = ensure_image(f"oci-archive:{arc}")
    assert entries(cache) == [img.key] == [key]


_BUILDER = """
import sys
from pytest_ignition.guest.image import ensure_image
said = []
def progress(msg):
    said.append(msg)
    with open(sys.argv[2], "a") as f:
        f.write(msg + "\\n")
img = ensure_image(sys.argv[1], progress=progress)
print(img.path)
print("BUILT" if any(s.startswith("building image") for s in said) else "FOUND")
print("WAITED" if any(s.startswith("waiting for another") for s in said) else "NOWAIT")
"""


@needs_tools
def test_concurrent_builders_one_builds_one_waits(cache: Path, tmp_path: Path) -> None:
    arc = docker_save(tmp_path / "img.tar", [layer(LOWER), layer(UPPER)], ENV, "/data")
    spec = f"oci-archive:{arc}"
    key = gimage.image_key(spec)
    lock = FileLock(str(gbuild._lock_path(f"image-{key}")))
    (cache / "locks").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "IGNITION_CACHE_DIR": str(cache)}
    said = [tmp_path / f"said{i}" for i in range(2)]
    with lock:  # both builders start while "someone" builds: they must wait, not build
        procs = [
            subprocess.Popen([sys.executable, "-c", _BUILDER, spec, str(s)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for s in said
        ]  # fmt: skip
        deadline = time.monotonic() + 120  # a busy machine starts Python slowly
        while not all(s.exists() and "waiting for another" in s.read_text() for s in said):
            assert all(p.poll() is None for p in procs), "a builder did not wait for the lock"
            assert time.monotonic() < deadline, "the builders never said they were waiting"
            time.sleep(0.1)
        assert entries(cache) == []
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = [o[0].split() for o in outs]
    assert lines[0][0] == lines[1][0] == str(cache / "images" / key / "rootfs.ext4")
    assert sorted(ln[1] for ln in lines) == ["BUILT", "FOUND"]  # exactly one built it
    assert [ln[2] for ln in lines] == ["WAITED", "WAITED"]
    assert entries(cache) == [key]


# --------------------------------------------------------------------------- ext4 as is


@needs_tools
def test_ext4_path_used_as_is(tmp_path: Path, cache: Path) -> None:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hello").write_text("hi\n")
    img = tmp_path / "mine.ext4"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(src), str(img)], check=True)
    digest = hashlib.sha256(img.read_bytes()).hexdigest()
    mtime = img.stat().st_mtime_ns
    got = ensure_image(str(img))
    assert got.path == img and got.spec == str(img) and got.env == () and got.workdir is None
    assert ensure_image(str(img)).key == got.key
    assert hashlib.sha256(img.read_bytes()).hexdigest() == digest
    assert img.stat().st_mtime_ns == mtime
    assert entries(cache) == []  # never copied into the cache


def test_not_ext4_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.img"
    bogus.write_bytes(b"\0" * 4096)
    with pytest.raises(ImageBuildError, match=r"bogus\.img.*not an ext2/3/4 filesystem") as ei:
        ensure_image(str(bogus))
    assert "\n" not in str(ei.value)
    with pytest.raises(ImageBuildError, match=r"nosuch\.img.*does not exist"):
        ensure_image(str(tmp_path / "nosuch.img"))


# --------------------------------------------------------------------------- missing tools


def _path_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tools: list[str]) -> None:
    d = tmp_path / "bin"
    d.mkdir()
    for t in tools:
        found = shutil.which(t)
        if found:
            (d / t).symlink_to(found)
    monkeypatch.setenv("PATH", str(d))
    gimage._version_memo.clear()


def test_missing_mmdebstrap_names_its_package(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _path_with(tmp_path, monkeypatch, ["mke2fs", "nice"])
    with pytest.raises(ImageBuildError, match=r"debian:bookworm.*apt-get install mmdebstrap"):
        ensure_image("debian:bookworm", ("python3",))
    assert entries(cache) == []


def test_missing_mke2fs_names_e2fsprogs(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _path_with(tmp_path, monkeypatch, ["mmdebstrap", "nice"])
    with pytest.raises(ImageBuildError, match=r"debian:bookworm.*apt-get install e2fsprogs"):
        ensure_image("debian:bookworm")
    arc = docker_save(tmp_path / "img.tar", [layer(LOWER)], [], "/")
    if IS_ROOT:
        with pytest.raises(ImageBuildError, match=r"img\.tar.*apt-get install e2fsprogs"):
            ensure_image(f"oci-archive:{arc}")
    assert entries(cache) == []


# --------------------------------------------------------------------------- debian (real)


def test_mmdebstrap_log_explained() -> None:
    """The messages apt prints inside mmdebstrap's log (taken from real failed runs)."""
    missing = (
        "I: installing remaining packages inside the chroot...\nReading package lists...\n"
        "E: Unable to locate package nosuchpkg-xyz\nE: setup failed: E: apt-get ... failed\n"
        "E: mmdebstrap failed to run\n"
    )
    e = gimage._StepFailed("mmdebstrap", 25, missing, "build.log")
    msg = gimage._explain_mmdebstrap(e, "bookworm", "http://m/debian", "debian:bookworm +x")
    assert msg.startswith("image debian:bookworm +x: no package nosuchpkg-xyz in Debian bookworm")
    suite = (
        "Err:2 http://m/debian nosuchsuite Release\n  404  Not Found [IP: 1.2.3.4 80]\n"
        "E: The repository 'http://m/debian nosuchsuite Release' does not have a Release file.\n"
    )
    e = gimage._StepFailed("mmdebstrap", 25, suite, "build.log")
    msg = gimage._explain_mmdebstrap(e, "nosuchsuite", "http://m/debian", "debian:nosuchsuite")
    assert "Debian has no suite 'nosuchsuite' at http://m/debian" in msg
    net = "E: Failed to fetch http://m/debian/dists/x/InRelease  Could not resolve 'm'\n"
    e = gimage._StepFailed("mmdebstrap", 25, net, "build.log")
    msg = gimage._explain_mmdebstrap(e, "bookworm", "http://m/debian", "debian:bookworm")
    assert "IGNITION_DEBIAN_MIRROR" in msg and "\n" not in msg


def test_mirror_from_host_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IGNITION_DEBIAN_MIRROR", "http://mirror.example/debian/")
    assert gimage._mirror() == "http://mirror.example/debian"
    monkeypatch.delenv("IGNITION_DEBIAN_MIRROR")
    assert gimage._mirror().startswith(("http://", "https://"))
    if shutil.which("mmdebstrap"):
        k1 = gimage.image_key("debian:bookworm", ("python3",))
        monkeypatch.setenv("IGNITION_DEBIAN_MIRROR", "http://mirror.example/debian")
        assert gimage.image_key("debian:bookworm", ("python3",)) != k1  # the mirror is keyed
        monkeypatch.delenv("IGNITION_DEBIAN_MIRROR")
        assert gimage.image_key("debian:bookworm", "python3 python3") == k1
        assert gimage.image_key("debian:bookworm", ("python3", "procps")) != k1


def _require_mmdebstrap() -> None:
    require(shutil.which("mmdebstrap"), "mmdebstrap not installed (apt-get install mmdebstrap)")
    require(shutil.which("debugfs"), "e2fsprogs not installed")
    require(IS_ROOT, "mmdebstrap builds need root here")


def test_debian_bookworm_python3() -> None:
    """The real build (minutes cold; the e2e tests' image, so normally a cache hit)."""
    _require_mmdebstrap()
    img = ensure_image("debian:bookworm", ("python3",))
    assert img.spec == "debian:bookworm" and img.env == () and img.workdir is None
    assert img.path == gbuild.cache_dir() / "images" / img.key / "rootfs.ext4"
    assert "VERSION_CODENAME=bookworm" in debugfs(img.path, "cat /usr/lib/os-release")
    assert "python3.11" in ls(img.path, "/usr/bin")
    assert debugfs(img.path, "cat /etc/machine-id") == ""
    assert debugfs(img.path, "cat /etc/hostname") == "ignition\n"
    assert "ignition-agent" not in ls(img.path, "/sbin")  # the init brings the agent
    meta = json.loads((img.path.parent / "image.json").read_text())
    assert meta["suite"] == "bookworm" and meta["packages"] == ["python3"]
    assert meta["mirror"] == gimage._mirror()
    t0 = time.monotonic()
    assert ensure_image("debian:bookworm", ["python3"]) == img
    assert time.monotonic() - t0 < 10


def test_debian_unknown_suite_fails_fast(cache: Path) -> None:
    _require_mmdebstrap()
    t0 = time.monotonic()
    with pytest.raises(ImageBuildError, match=r"debian:nosuchsuite: Debian has no suite") as ei:
        ensure_image("debian:nosuchsuite")
    assert "\n" not in str(ei.value)
    assert time.monotonic() - t0 < 120
    assert entries(cache) == []


def test_debian_nonexistent_package(cache: Path) -> None:
    _require_mmdebstrap()
    with pytest.raises(ImageBuildError, match=r"no package nosuchpkg-xyz in Debian bookworm") as e:
        ensure_image("debian:bookworm", ("python3", "nosuchpkg-xyz"))
    assert "\n" not in str(e.value)
    assert entries(cache) == []


def test_foreign_arch_without_emulation_is_explained(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require(shutil.which("mmdebstrap"), "mmdebstrap not installed")
    monkeypatch.setattr(gimage, "BINFMT", {"aarch64": "ignition-test-no-such-binfmt"})
    with pytest.raises(ImageBuildError, match="apt-get install qemu-user-static binfmt-support"):
        ensure_image("debian:bookworm", arch="aarch64")
    assert entries(cache) == []


# --------------------------------------------------------------------------- clean


def _fake_image(cache: Path, key: str, *, used_days_ago: float = 0, **meta: object) -> Path:
    d = cache / "images" / key
    d.mkdir(parents=True)
    (d / "rootfs.ext4").write_bytes(b"\0" * 8192)
    info = {"spec": "debian:bookworm", "packages": ["python3"], "key": key,
            "pipeline": gimage.IMAGE_PIPELINE_VERSION, **meta}  # fmt: skip
    (d / "image.json").write_text(json.dumps(info))
    (d / "last-used").touch()
    t = time.time() - used_days_ago * 86400
    for name in ("image.json", "last-used"):
        os.utime(d / name, (t, t))
    return d


def _clean(cache: Path, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "pytest_ignition.guest", "clean", *args],
        env={**os.environ, "IGNITION_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_clean_knows_images(cache: Path, tmp_path: Path) -> None:
    fresh = _fake_image(cache, "a" * 20, used_days_ago=1)
    old = _fake_image(cache, "b" * 20, used_days_ago=45)
    older_pipeline = _fake_image(cache, "c" * 20, pipeline="0")
    gone = _fake_image(cache, "d" * 20, spec="oci-archive:/nonexistent/x.tar",
                       archive="/nonexistent/x.tar")  # fmt: skip
    incomplete = cache / "images" / ("e" * 20)
    incomplete.mkdir()
    (incomplete / "rootfs.ext4").write_bytes(b"x")
    leftover = cache / "images" / (".f" + "f" * 19 + "-abc123")
    (leftover / "root").mkdir(parents=True)
    busy = cache / "images" / (".9" + "9" * 19 + "-xyz")
    busy.mkdir()
    (cache / "locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(gbuild._lock_path("image-" + "9" * 20))):  # a build in progress
        out = _clean(cache)
    assert fresh.is_dir() and busy.is_dir()
    for p in (old, older_pipeline, gone, incomplete, leftover):
        assert not p.exists(), out
    assert "unused for 45 days" in out and "image pipeline 0" in out and "is gone" in out
    assert f"skip     images/{busy.name}/" in out
    assert f"keep     images/{fresh.name}/" in out
    _clean(cache, "--all")
    assert sorted(p.name for p in (cache / "images").iterdir()) == []


# --------------------------------------------------------------------------- not root


NOBODY = 65534


def test_oci_as_a_user_under_fakeroot(tmp_path: Path) -> None:
    """Not root: layers are applied under fakeroot, so owners, setuid bits and device nodes
    still reach the image. Run as ``nobody`` (needs root to switch, and fakeroot)."""
    require(IS_ROOT and shutil.which("runuser"), "needs root to run a build as nobody")
    require(shutil.which("fakeroot"), "fakeroot not installed (apt-get install fakeroot)")
    require(shutil.which("mke2fs") and shutil.which("debugfs"), "e2fsprogs not installed")
    work = tmp_path / "nobody"
    work.mkdir()
    os.chown(work, NOBODY, NOBODY)
    for d in (tmp_path, tmp_path.parent, tmp_path.parent.parent):
        d.chmod(d.stat().st_mode | 0o711)  # nobody must reach its dir
    extra = [("dev", "dir"), ("dev/null", "chr", (1, 3)), ("home/u", "dir")]
    arc = docker_save(work / "img.tar", [layer(LOWER + extra), layer(UPPER)], ENV, "/data")
    os.chown(arc, NOBODY, NOBODY)
    cache = work / "cache"
    # this interpreter may live where nobody cannot go (a pyenv under /root): use the system's
    # with this checkout and the venv's packages on the path
    py = shutil.which("python3", path="/usr/bin:/bin")
    require(py, "no system python3 for nobody")
    site = [p for p in sys.path if p.endswith("site-packages")]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "IGNITION_CACHE_DIR": str(cache), "HOME": str(work),
           "PYTHONPATH": os.pathsep.join([str(root), *site])}  # fmt: skip
    r = subprocess.run(
        ["runuser", "-u", "nobody", "--", str(py), "-c", _BUILDER, f"oci-archive:{arc}",
         str(work / "said")],
        env=env, capture_output=True, text=True, timeout=300, cwd=work,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.split()[0])
    assert path.stat().st_uid == NOBODY  # built by nobody ...
    img = Image(path=path, spec="", key=path.parent.name, env=tuple(
        (k, v) for k, v in (e.split("=", 1) for e in ENV)), workdir="/data")  # fmt: skip
    _check_layered(img)  # ... yet root owns the files (uid 0) and tool keeps its setuid bit
    assert "Type: character special" in debugfs(path, "stat /dev/null")
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "build.log",
        "image.json",
        "last-used",
        "rootfs.ext4",
    ]
