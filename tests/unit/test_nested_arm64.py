"""The arm64 nested harness's pieces without booting it: QEMU command line, init, environment."""

from __future__ import annotations

from pathlib import Path

from pytest_ignition import nested
from pytest_ignition import nested_arm64 as a64


def _host(tmp_path: Path) -> a64.Arm64Host:
    return a64.Arm64Host(tmp_path / "vmlinuz", tmp_path / "initrd.gz", tmp_path / "py,root")


def test_qemu_argv_is_an_el2_virt_machine_with_mmio_9p(tmp_path: Path) -> None:
    argv = a64.build_qemu_argv(_host(tmp_path), tmp_path / "ctl", tmp_path, mem_mb=2048, cpus=2)
    assert argv[0] == "qemu-system-aarch64"
    assert argv[argv.index("-M") + 1] == "virt,virtualization=on,gic-version=3"
    assert argv[argv.index("-cpu") + 1] == "max,pauth-impdef=on"
    joined = " ".join(argv)
    # the root tree read-only; the comma in its path doubled for QEMU
    assert f"path={tmp_path}/py,,root,security_model=none,readonly=on" in joined
    assert "virtio-9p-device,fsdev=py,mount_tag=ignpy" in joined
    assert "virtio-9p-device,fsdev=cwd,mount_tag=igncwd" in joined
    assert "virtio-9p-pci" not in joined  # virtio-pci is a module in Debian's kernel
    assert "console=ttyAMA0" in argv[argv.index("-append") + 1]


def test_init_loads_the_modules_in_order_and_stage2_speaks_the_protocol() -> None:
    names = [Path(m).name for m in a64.MODULES]
    init = a64._init_script(names).decode()
    pos = [init.index(f"insmod /modules/{n}") for n in names]
    assert pos == sorted(pos)
    assert names.index("netfs.ko") < names.index("9p.ko") and "overlay.ko" in names
    assert "@@ignition-nested:%s:start@@" in a64.STAGE2
    assert '"$CTL/rc"' in a64.STAGE2 and "/dev/ttyAMA0" in a64.STAGE2


def test_child_env_uses_the_arm64_trees_path() -> None:
    env = a64.child_env(
        {"PATH": "/work/.venv/bin:/usr/bin", "VIRTUAL_ENV": "/work/.venv", "X": "1"}
    )
    assert env["PATH"].startswith("/usr/local/sbin") and ".venv" not in env["PATH"]
    assert "VIRTUAL_ENV" not in env and env["X"] == "1"


def test_cli_takes_the_arch() -> None:
    args = nested.parse_args(["run", "--arch", "aarch64", "--", "python3", "-c", "pass"])
    assert (args.arch, args.cmd) == ("aarch64", ["python3", "-c", "pass"])
    assert nested.parse_args(["run", "--", "true"]).arch == "x86_64"
