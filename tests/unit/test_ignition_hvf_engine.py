"""The engine's HVF wiring on a macOS arm64 host made of injected facts (no Mac here):
``--ignition-engine=ignition`` builds the command of the aarch64 machine on Hypervisor.framework,
run by the entitled interpreter copy, and says EXPERIMENTAL; ``auto`` stays QEMU with HVF; the
x86/KVM engine's command is unchanged. Nothing here starts a VMM on a Mac.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pytest_ignition.engines import ignition
from pytest_ignition.engines.base import EngineUnavailable, VMConfig
from pytest_ignition.engines.select import HostProbe, decide, select_engine
from pytest_ignition.vmm import __main__ as vmm_main
from pytest_ignition.vmm import machine_aarch64

pytest_plugins = ["pytester"]

COPY = "/Users/u/.cache/pytest-ignition/hvf/python3-hvf"
MAC = HostProbe(
    system="Darwin", machine="arm64", kvm_usable=False, kvm_pvm=False, qemu_path=None,
    ignition_available=True, qemu_aarch64_path="/opt/homebrew/bin/qemu-system-aarch64",
    hvf_problem=None, hvf_interpreter=COPY,
)  # fmt: skip


@pytest.fixture
def config(tmp_path: Path) -> VMConfig:
    (tmp_path / "Image").write_bytes(b"k")
    (tmp_path / "initrd").write_bytes(b"i")
    return VMConfig(kernel=tmp_path / "Image", initrd=tmp_path / "initrd", arch="aarch64")


def test_ignition_on_a_checked_mac_is_the_hvf_machine_in_the_signed_copy(config, tmp_path):
    engine, reason = select_engine("ignition", MAC)
    assert isinstance(engine, ignition.IgnitionEngine)
    assert engine.hypervisor == "hvf" and engine.accelerator == "hvf" and engine.python == COPY
    assert "EXPERIMENTAL" in reason and "EXPERIMENTAL" in engine.describe()  # the header's line
    m = ignition.IgnitionMachine(engine, config, tmp_path / "work")
    try:
        argv = engine.boot_argv(m, config)
    finally:
        m.close()
    assert argv[:6] == [
        COPY, "-m", "pytest_ignition.vmm.machine_aarch64", "boot", "--hypervisor", "hvf",
    ]  # fmt: skip
    # what the engine builds is what the aarch64 VMM's command line accepts
    name, rest = machine_aarch64.split_hypervisor(argv[3:])
    args = vmm_main.parser().parse_args(rest)
    assert name == "hvf" and args.command == "boot"
    assert args.kernel == str(config.kernel.resolve()) and args.boot_timer
    assert machine_aarch64.kernel_cmdline(args.cmdline, True).split()[0] == "console=ttyS0"
    assert "reboot=" not in machine_aarch64.kernel_cmdline(args.cmdline, True)


def test_restore_uses_the_same_seam(config, tmp_path, monkeypatch):
    engine, _ = select_engine("ignition", MAC)
    seen: list[list[str]] = []

    class Stop(Exception):
        pass

    def launch(m, argv):
        seen.append(argv)
        raise Stop

    monkeypatch.setattr(engine, "_launch", launch)
    monkeypatch.setattr(engine, "read_meta", lambda config, directory: None)
    with pytest.raises(Stop):
        engine.restore(config, tmp_path / "snaps" / "s1", tmp_path / "work")
    assert seen[0][:6] == [
        COPY, "-m", "pytest_ignition.vmm.machine_aarch64", "restore", "--hypervisor", "hvf",
    ]  # fmt: skip
    assert seen[0][6:10] == ["--store", str(tmp_path / "snaps"), "--name", "s1"]


def test_no_fork_server_for_the_hvf_machine(config, tmp_path, monkeypatch):
    monkeypatch.setenv("IGNITION_VMM_FORKSERVER", "1")
    engine, _ = select_engine("ignition", MAC)
    assert engine._fork_server(engine.vmm_command("boot")) is None


def test_auto_on_the_mac_stays_qemu_with_hvf() -> None:
    d = decide("auto", MAC)
    assert (d.engine, d.accelerator) == ("qemu", "hvf")


def test_no_signed_copy_no_hvf_engine() -> None:
    with pytest.raises(EngineUnavailable, match="entitled interpreter"):
        ignition.IgnitionEngine(hypervisor="hvf")
    with pytest.raises(ValueError, match="hypervisor"):
        ignition.IgnitionEngine(hypervisor="xen")


def test_the_kvm_engines_command_is_unchanged(config, tmp_path):
    engine = ignition.IgnitionEngine()
    assert (engine.hypervisor, engine.accelerator) == ("kvm", "kvm")
    assert engine.describe() == "ignition (bundled VMM, kvm)"
    assert engine.vmm_command("boot") == [sys.executable, "-m", "pytest_ignition.vmm", "boot"]
    m = ignition.IgnitionMachine(engine, config, tmp_path / "work")
    try:
        argv = engine.boot_argv(m, config)
        assert argv == [
            sys.executable, "-m", "pytest_ignition.vmm", "boot",
            "--kernel", str(config.kernel.resolve()), "--initrd", str(config.initrd.resolve()),
            "--mem", "512M", "--cpus", "1", "--cmdline", engine.cmdline(config), "--boot-timer",
            "--vsock", str(m.vsock_sock), "--control", str(m.control_sock), "--console", "stdio",
        ]  # fmt: skip
    finally:
        m.close()


def test_the_signed_copy_finds_the_vmm_and_cffi_through_pythonpath(tmp_path) -> None:
    """The signed copy is of the base interpreter (no virtualenv): vmm_env's PYTHONPATH alone must
    make the VMM's imports work. Run here with -S (no site-packages at all), outside the checkout."""
    import os
    import subprocess

    engine, _ = select_engine("ignition", MAC)
    env = {**os.environ, **engine.vmm_env()}
    code = "import pytest_ignition.vmm.machine_aarch64, cffi, _cffi_backend; cffi.FFI().cdef('int f(void);')"
    res = subprocess.run(
        [sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    bare = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-S", "-c", code], env=bare, capture_output=True, text=True
    )
    assert res.returncode != 0  # without it the imports fail: the test can tell
    assert ignition.IgnitionEngine().vmm_env() == {}  # KVM: our environment, unchanged


def test_the_pytest_header_says_experimental(pytester, monkeypatch) -> None:
    """The header a Mac user would see (probe faked; collection only, no VM started)."""
    import os

    from pytest_ignition.engines import select

    for k in [k for k in os.environ if k.startswith("IGNITION_")]:
        monkeypatch.delenv(k)
    monkeypatch.setattr(select, "probe_host", lambda: MAC)
    pytester.makepyfile(test_vm="def test_a(ignition_vm):\n    pass\n")
    result = pytester.runpytest_inprocess(
        "--collect-only", "-p", "no:xdist", "--ignition-engine=ignition", "--ignition-arch=aarch64"
    )
    result.stdout.fnmatch_lines(
        [
            "ignition: engine ignition (bundled VMM, aarch64 machine on Hypervisor.framework: "
            "EXPERIMENTAL, never run on a Mac before), accelerator hvf: requested with "
            "--ignition-engine=ignition: EXPERIMENTAL *"
        ]
    )
