"""Inside the nested harness: networking on the bundled VMM (engines/ignition.py + its virtio-net).

TCP over the agent channel (vm.forward / vm.connect / vm.expose) on a restored VM; network=user
through a real passt per VM (the harness host gives passt the default route it needs on a dummy
interface); and ``tests/e2e/test_network.py``'s three-VM partition test (``[a] | [b, c]``, then
``heal()``) through the plugin's fixtures (``ignition_vm_factory(network=net, hostname=...)``,
``ignition_network``) in a child pytest on the bundled VMM: three restores of one
network=segment snapshot, the VMM's virtio-net listening for the switch, real frames through
the device model both ways.
"""

from __future__ import annotations

import http.server
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from nested_child import run_on_bundled_vmm

from pytest_ignition._testing import require

PARTITION_TEST = "tests/e2e/test_network.py::test_three_vms_partition_and_heal"
# The ceiling only keeps a hung child from holding the harness (its own deadlines are shorter).
CHILD_TIMEOUT = 900


@pytest.fixture(scope="module")
def engine():
    from pytest_ignition.engines.ignition import IgnitionEngine, available

    ok, why = available()
    require(ok, why)
    return IgnitionEngine()


@pytest.fixture(scope="module")
def base():
    from pytest_ignition.engines.base import VMConfig
    from pytest_ignition.guest import find_guest

    g = find_guest()
    require(g is not None, "guest not built (python -m pytest_ignition.guest build)")
    return VMConfig(kernel=g.kernel, initrd=g.initrd, memory_mib=256, boot_timeout=300)


def _snapshot(engine, config, tmp: Path) -> Path:  # type: ignore[no-untyped-def]
    m = engine.boot(config, tmp / "boot")
    try:
        engine.snapshot(m, tmp / "snap")
    finally:
        m.close()
    return tmp / "snap"


def _vm(engine, config, snap: Path, work: Path):  # type: ignore[no-untyped-def]
    from pytest_ignition.vm import VM

    return VM(engine, engine.restore(config, snap, work), config, snapshot_dir=snap)


class _Host:
    def __init__(self) -> None:
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = f"host saw {self.path}\n".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_forward_and_expose_on_a_restored_vm(engine, base, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    snap = _snapshot(engine, base, tmp_path)
    vm = _vm(engine, base, snap, tmp_path / "w")
    host = _Host()
    try:
        vm.write_file("/tmp/www/index.html", "nested httpd\n")
        vm.run(["httpd", "-p", "127.0.0.1:8080", "-h", "/tmp/www"], timeout=60).check()
        port = vm.forward(8080)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=120) as r:
            assert r.read() == b"nested httpd\n"
        with pytest.raises(ConnectionRefusedError):
            vm.connect(8081, timeout=60)
        vm.expose(host.port, 9000)
        out = vm.check_output(["wget", "-q", "-O", "-", "http://127.0.0.1:9000/n"], timeout=120)
        assert out == "host saw /n\n"
    finally:
        host.close()
        vm.close()


def test_user_network_through_passt(engine, base, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """network=user on the bundled VMM: two VMs restored from one snapshot (same MAC and IP),
    each with its own passt, fetch from a server on the harness host by host.ignition.internal."""
    import shutil

    require(shutil.which("passt") is not None, "passt is not installed (apt-get install passt)")
    routes = Path("/proc/net/route").read_text().splitlines()[1:]
    # passt starts only with a default route; nested_init.sh makes one on a dummy interface.
    assert any(r.split()[1] == "00000000" for r in routes if r.split()), (
        "the harness host has no default route: its kernel lacks CONFIG_DUMMY "
        "(guest/kernel/host-x86_64.config) or nested_init.sh did not make ign-dummy0"
    )
    cfg = replace(base, network="user")
    snap = _snapshot(engine, cfg, tmp_path)
    host = _Host()
    vms = []
    try:
        for name in ("u1", "u2"):
            vms.append(_vm(engine, cfg, snap, tmp_path / name))
        for i, vm in enumerate(vms):
            url = f"http://host.ignition.internal:{host.port}/user{i}"
            out = vm.check_output(["timeout", "30", "wget", "-q", "-O", "-", url], timeout=120)
            assert out == f"host saw /user{i}\n"
            # The device is the snapshot's: every clone has the same address.
            addr = vm.check_output(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], timeout=60)
            assert "10.0.2.15/24" in addr
    finally:
        host.close()
        for vm in vms:
            vm.close()


def test_three_vm_partition_and_heal_through_the_plugin() -> None:
    """[a] | [b, c] on three restores of one network=segment snapshot, through the plugin's
    ignition_vm_factory and ignition_network (the e2e test QEMU runs), on the bundled VMM."""
    run_on_bundled_vmm([PARTITION_TEST], CHILD_TIMEOUT)
