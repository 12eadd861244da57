"""Real guests: Debian and OCI images as the guest's root, on real guests (QEMU here).

A ``debian:bookworm`` image built by mmdebstrap runs Debian's python3 and a TCP server/client
over the guest's loopback; ``init=systemd`` boots the image's systemd and a unit started in
one test is gone in the next; writes under ``/etc`` never reach the next test nor the image
file; an OCI archive built here (two layers and a whiteout) boots with its Env/WorkingDir.
Bad image settings are one-line errors naming the input.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import textwrap
from pathlib import Path

import pytest

from pytest_ignition._testing import require
from pytest_ignition.guest import cache_dir

QEMU = shutil.which("qemu-system-x86_64")
DEBIAN = {"image": "debian:bookworm", "packages": "python3"}
# systemd takes tens of seconds to start under QEMU TCG on a loaded machine
SYSTEMD = {**DEBIAN, "init": "systemd", "timeout": 400}
# pytester points HOME at a temporary directory; the inner runs must find the real cache.
GUEST_CACHE = cache_dir()


@pytest.fixture(autouse=True)
def _needs_tools() -> None:
    require(QEMU, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    require(shutil.which("mmdebstrap"), "mmdebstrap is not installed (apt-get install mmdebstrap)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.mark.ignition(**DEBIAN)
def test_debian_runs_python(ignition_vm) -> None:
    out = ignition_vm.run(
        ["python3", "-c", "import platform; print(platform.freedesktop_os_release()['ID'], 6 * 7)"]
    ).check()
    assert out.stdout.split() == ["debian", "42"]
    assert "VERSION_CODENAME=bookworm" in ignition_vm.read_file("/etc/os-release").decode()
    # the prepare hook (tests/e2e/conftest.py) ran inside the image root too
    assert ignition_vm.run(["cat", "/tmp/prepare-ran"]).check().stdout == "1\n"


@pytest.mark.ignition(**DEBIAN)
def test_tcp_server_and_client_over_loopback(ignition_vm) -> None:
    program = textwrap.dedent(
        """
        import socket, threading
        srv = socket.create_server(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        def serve():
            conn, _ = srv.accept()
            with conn:
                conn.sendall(conn.recv(100).upper())
        t = threading.Thread(target=serve)
        t.start()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"hello over tcp")
            print(c.recv(100).decode())
        t.join(10)
        # IPv6 loopback too
        s6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
        print("v6", s6.getsockname()[0])
        """
    )
    ignition_vm.write_file("/root/tcp.py", program)
    out = ignition_vm.run(["python3", "/root/tcp.py"], timeout=60).check().stdout
    assert out.splitlines() == ["HELLO OVER TCP", "v6 ::1"]


@pytest.mark.ignition(**DEBIAN)
@pytest.mark.parametrize("round", [1, 2])
def test_etc_write_is_gone_in_the_next_test(ignition_vm, round: int) -> None:
    assert ignition_vm.run(["test", "-e", "/etc/ignition-e2e-mine"]).exit_code == 1
    ignition_vm.write_file("/etc/ignition-e2e-mine", f"round {round}\n")
    ignition_vm.run("echo changed >> /etc/passwd && rm -rf /usr/share/doc").check()
    assert ignition_vm.read_file("/etc/ignition-e2e-mine") == f"round {round}\n".encode()


@pytest.mark.ignition(**DEBIAN)
def test_the_image_file_is_never_written(ignition_vm) -> None:
    image = Path(ignition_vm.config.image)
    before = _sha256(image)
    stat_before = image.stat()
    # heavy writes all over the root: they land in the overlay's upper layer (guest RAM)
    ignition_vm.run(
        "dd if=/dev/urandom of=/usr/big bs=1M count=8 status=none && rm -rf /usr/lib/python3* "
        "&& echo x > /bin/new && sync",
        timeout=120,
    ).check()
    assert ignition_vm.run(["test", "-e", "/usr/big"]).exit_code == 0
    ignition_vm.close()
    assert _sha256(image) == before
    assert image.stat().st_mtime_ns == stat_before.st_mtime_ns


@pytest.mark.ignition(**SYSTEMD)
@pytest.mark.parametrize("round", [1, 2])
def test_systemd_unit_started_in_one_test_is_not_active_in_the_next(
    ignition_vm, round: int
) -> None:
    assert ignition_vm.read_file("/proc/1/comm") == b"systemd\n"
    state = ignition_vm.run(["systemctl", "is-system-running"]).stdout.strip()
    assert state in ("running", "degraded")
    assert ignition_vm.run(["systemctl", "is-active", "ignition-e2e.service"]).stdout.strip() in (
        "inactive",
        "unknown",
    )
    ignition_vm.run(
        ["systemd-run", "--unit=ignition-e2e", "--service-type=exec", "sleep", "1000"]
    ).check()
    assert (
        ignition_vm.run(["systemctl", "is-active", "ignition-e2e.service"]).stdout.strip()
        == "active"
    )


# ----------------------------------------------------------------------------- OCI


def _tar_bytes(entries: list[tuple[str, bytes | None, int, str | None]]) -> bytes:
    """A layer tar: (name, data or None for a dir, mode, symlink target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, mode, link in entries:
            info = tarfile.TarInfo(name)
            info.mode = mode
            info.mtime = 0
            if link is not None:
                info.type = tarfile.SYMTYPE
                info.linkname = link
                tar.addfile(info)
            elif data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_docker_archive(path: Path) -> None:
    """A ``docker save`` archive: a busybox userland, then a layer with a whiteout."""
    busybox = Path("/bin/busybox").read_bytes()
    base = [("bin", None, 0o755, None), ("bin/busybox", busybox, 0o755, None)]
    base += [(f"bin/{a}", None, 0o777, "busybox") for a in ("sh", "cat", "ls", "pwd", "test")]
    base += [
        ("etc", None, 0o755, None),
        ("etc/lower-only", b"from layer one\n", 0o644, None),
        ("etc/kept", b"kept from layer one\n", 0o644, None),
        ("work", None, 0o755, None),
    ]
    upper = [
        ("etc", None, 0o755, None),
        ("etc/.wh.lower-only", b"", 0o644, None),
        ("etc/upper-file", b"from layer two\n", 0o644, None),
    ]
    layers = [_tar_bytes(base), _tar_bytes(upper)]
    diff_ids = ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin", "IGNITION_OCI=yes"], "WorkingDir": "/work"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_bytes = json.dumps(config).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    members = {config_name: config_bytes}
    names = []
    for i, layer in enumerate(layers):
        name = f"layer{i}/layer.tar"
        members[name] = layer
        names.append(name)
    members["manifest.json"] = json.dumps(
        [{"Config": config_name, "RepoTags": ["ignition/e2e:1"], "Layers": names}]
    ).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_oci_archive_boots_with_layers_whiteouts_env_and_workdir(
    ignition_vm_factory, tmp_path: Path
) -> None:
    archive = tmp_path / "e2e-image.tar"
    make_docker_archive(archive)
    vm = ignition_vm_factory(image=f"oci-archive:{archive}")
    assert vm.read_file("/etc/upper-file") == b"from layer two\n"
    assert vm.read_file("/etc/kept") == b"kept from layer one\n"
    assert vm.run(["test", "-e", "/etc/lower-only"]).exit_code == 1
    out = vm.run("pwd; echo $IGNITION_OCI").check().stdout
    assert out.splitlines() == ["/work", "yes"]


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("IGNITION_CACHE_DIR", str(GUEST_CACHE))
    monkeypatch.delenv("IGNITION_REQUIRE", raising=False)
    pytester.makepyfile("def test_vm(ignition_vm):\n    ignition_vm.run('true').check()\n")
    return pytester


def _one_error_line(result: pytest.RunResult, *needles: str) -> str:
    text = result.stdout.str() + "\n" + result.stderr.str()
    lines = [ln for ln in text.splitlines() if all(n in ln for n in needles)]
    assert lines, text
    assert "Traceback" not in text, text
    return lines[0]


def test_unknown_suite_is_a_build_error_naming_it(inner: pytest.Pytester) -> None:
    result = inner.runpytest_subprocess("--ignition-image=debian:nosuchsuite")
    assert result.ret != 0
    _one_error_line(result, "nosuchsuite")


def test_missing_package_is_a_build_error_naming_it(inner: pytest.Pytester) -> None:
    result = inner.runpytest_subprocess(
        "--ignition-image=debian:bookworm", "--ignition-packages=python3,no-such-package-ignition"
    )
    assert result.ret != 0
    _one_error_line(result, "no-such-package-ignition")


def test_truncated_oci_archive_is_an_error_naming_it(inner: pytest.Pytester, tmp_path) -> None:
    archive = tmp_path / "broken.tar"
    make_docker_archive(archive)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    result = inner.runpytest_subprocess(f"--ignition-image=oci-archive:{archive}")
    assert result.ret != 0
    _one_error_line(result, "broken.tar")


def test_image_path_that_is_not_ext4_is_a_usage_error(inner: pytest.Pytester, tmp_path) -> None:
    bogus = tmp_path / "not-ext4.img"
    bogus.write_bytes(os.urandom(4096))
    result = inner.runpytest_subprocess(f"--ignition-image={bogus}")
    assert result.ret != 0
    _one_error_line(result, "not-ext4.img", "ext")


def test_init_systemd_without_an_image_is_a_usage_error(inner: pytest.Pytester) -> None:
    result = inner.runpytest_subprocess("--ignition-init=systemd")
    assert result.ret != 0
    _one_error_line(result, "init=systemd", "image")
