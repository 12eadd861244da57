"""``python -m pytest_ignition.vmm boot``: error handling, and real VMs on this machine's KVM.

The VMs here boot tiny synthetic bzImages (or a PVH ELF) whose "kernel" is a handful of
hand-assembled instructions at the 64-bit entry point: they run at CPL0, which PVM
emulates, but only a few instructions each, so they are fast anywhere. They exercise the
whole path: loader, zero page, page tables, GDT, sregs, the UART (both directions), the
i8042 reset, the boot timer, the control socket and socket cleanup.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_ignition._testing import proc_state, require
from pytest_ignition.vmm.control import request

sys.path.insert(0, str(Path(__file__).parent))
from test_x86_boot import synthetic_bzimage, synthetic_elf  # noqa: E402

VMM = [sys.executable, "-m", "pytest_ignition.vmm"]

# -- payloads (64-bit code, also valid as 32-bit code for the PVH entry) ----------------------
PRINT_OK = b"\x66\xba\xf8\x03" + b"\xb0O\xee\xb0K\xee\xb0\x0a\xee"  # mov dx,0x3f8; out 'O','K','\n'
RESET = b"\xb0\xfe\xe6\x64"  # mov al,0xfe; out 0x64,al  (i8042 pulse reset)
# sti; hlt; jmp back: idle for good (nothing raises an interrupt) but wakeable, so the VMM keeps
# it running; with IF=0 (HALTED_FOR_GOOD) the VMM's halt watch ends the VM with status 3.
HALT = b"\xfb\xf4\xeb\xfd"
HALTED_FOR_GOOD = b"\xfa\xf4\xeb\xfd"  # cli; hlt; jmp back: Linux's stop_this_cpu()
BOOT_TIMER = b"\xb8\x00\x00\x00\xd0\xc6\x00\x7b"  # mov eax,0xd0000000; mov byte [rax],123
# Read the first virtio-mmio slot's magic (low byte 'v') and device id; print both.
READ_VIRTIO_SLOT = bytes.fromhex(
    "b9001000d0"  # mov ecx, 0xd0001000
    "8b19"  # mov ebx, [rcx]       (MagicValue)
    "66baf803"  # mov dx, 0x3f8
    "88d8"  # mov al, bl
    "ee"  # out dx, al
    "8b5908"  # mov ebx, [rcx+8]     (DeviceID)
    "88d8"  # mov al, bl
    "0430"  # add al, '0'
    "ee"  # out dx, al
)
# Echo serial input until a 'q' arrives: poll LSR.DR, read RBR, write it back to THR.
ECHO_UNTIL_Q = bytes.fromhex("66bafd03eca80174f766baf803ecee3c7175ed")


def bzimage(tmp_path: Path, code: bytes, name: str = "kernel.bz") -> Path:
    # the 64-bit entry is load address + 0x200
    path = tmp_path / name
    path.write_bytes(synthetic_bzimage(payload=bytes(0x200) + code + bytes(64), init_size=0x10000))
    return path


def run_vmm(
    *args: str, stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*VMM, *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=timeout,
    )


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    err = r.stderr.decode()
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def need_kvm() -> None:
    ok = os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)
    require(ok, "/dev/kvm is missing or not accessible")


# -- errors: one line, exit 2, no traceback ---------------------------------------------------
def test_missing_kernel_file(tmp_path):
    r = run_vmm("boot", "--kernel", str(tmp_path / "nope"), "--console", "none")
    assert_one_line_error(r, "no such file", "nope")


def test_garbage_kernel(tmp_path):
    k = tmp_path / "garbage"
    k.write_bytes(os.urandom(4096))
    r = run_vmm("boot", "--kernel", str(k), "--console", "none")
    assert_one_line_error(r, "neither a bzImage", "garbage")


def test_truncated_bzimage(tmp_path):
    k = tmp_path / "trunc"
    k.write_bytes(synthetic_bzimage()[:0x240])
    r = run_vmm("boot", "--kernel", str(k), "--console", "none")
    assert_one_line_error(r, "too short")


def test_kernel_is_a_directory(tmp_path):
    r = run_vmm("boot", "--kernel", str(tmp_path), "--console", "none")
    assert_one_line_error(r, "is a directory")


def test_missing_initrd_and_disk(tmp_path):
    k = bzimage(tmp_path, HALT)
    r = run_vmm("boot", "--kernel", str(k), "--initrd", str(tmp_path / "no-initrd"))
    assert_one_line_error(r, "initrd", "no such file")
    r = run_vmm("boot", "--kernel", str(k), "--disk", str(tmp_path / "no.img"))
    assert_one_line_error(r, "disk", "no such file")


def test_bad_arguments(tmp_path):
    k = bzimage(tmp_path, HALT)
    assert_one_line_error(run_vmm("boot", "--kernel", str(k), "--mem", "lots"), "invalid size")
    assert_one_line_error(run_vmm("boot", "--kernel", str(k), "--cpus", "0"), "--cpus")
    assert_one_line_error(run_vmm("boot"), "--kernel")
    r = run_vmm("boot", "--kernel", str(k), "--control", str(tmp_path / "no" / "dir" / "c.sock"))
    assert_one_line_error(r, "control socket", "does not exist")


def test_missing_kvm_device(tmp_path):
    k = bzimage(tmp_path, HALT)
    r = run_vmm(
        "boot", "--kernel", str(k), "--console", "none", "--kvm-device", str(tmp_path / "kvm")
    )
    assert_one_line_error(r, "does not exist", "no KVM")


def test_bad_vm_settings(tmp_path):
    k = bzimage(tmp_path, HALT)
    assert_one_line_error(run_vmm("boot", "--kernel", str(k), "--cpus", "300"), "1..254")
    need_kvm()
    sock = tmp_path / "v.sock"
    r = run_vmm("boot", "--kernel", str(k), "--vsock", str(sock), "--vsock-cid", "2")
    assert_one_line_error(r, "CID 2")
    assert not sock.exists()


def test_live_control_socket_is_not_stolen(tmp_path):
    need_kvm()
    k = bzimage(tmp_path, HALT)
    path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()
        r = run_vmm("boot", "--kernel", str(k), "--console", "none", "--control", str(path))
        assert_one_line_error(r, "in use")
        assert path.exists()


def test_kernel_too_big_for_memory(tmp_path):
    need_kvm()
    k = tmp_path / "big.bz"
    k.write_bytes(synthetic_bzimage(init_size=64 << 20))
    r = run_vmm("boot", "--kernel", str(k), "--mem", "32M", "--console", "none")
    assert_one_line_error(r, "more memory")


# -- real VMs -----------------------------------------------------------------------------------
def test_guest_prints_and_resets(tmp_path):
    need_kvm()
    k = bzimage(tmp_path, PRINT_OK + RESET + HALT)
    r = run_vmm("boot", "--kernel", str(k), "--mem", "64M", "--console", "stdio")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b"OK\n"
    assert b"i8042" in r.stderr and b"reset" in r.stderr
    assert b"Traceback" not in r.stderr


def test_triple_fault_ends_the_vm(tmp_path):
    """ud2 with the boot IDT (limit 7, no handlers) triple-faults: the x86 way to reset."""
    need_kvm()
    k = bzimage(tmp_path, PRINT_OK + b"\x0f\x0b")
    r = run_vmm("boot", "--kernel", str(k), "--mem", "64M")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b"OK\n"
    assert b"triple_fault" in r.stderr


@pytest.mark.parametrize("cpus", ["1", "2"])
def test_guest_halted_for_good_ends_the_vm_with_status_3(tmp_path, cpus):
    """cli; hlt (Linux's halt, and its power-off without ACPI) never leaves KVM: the halt
    watch sees every vCPU halted with interrupts off (with 2 vCPUs the AP was never started:
    it waits for a SIPI nobody can send) and ends the VM with the documented status 3."""
    need_kvm()
    k = bzimage(tmp_path, PRINT_OK + HALTED_FOR_GOOD)
    t0 = time.monotonic()
    r = run_vmm("boot", "--kernel", str(k), "--mem", "64M", "--cpus", cpus, timeout=30)
    took = time.monotonic() - t0
    err = r.stderr.decode()
    assert r.returncode == 3, err
    assert r.stdout == b"OK\n"
    assert "VM stopped: halted: every vCPU halted with interrupts disabled" in err, err
    assert "Traceback" not in err
    assert took < 20, took


def test_idle_guest_keeps_running(vmm_factory):
    """sti; hlt: halted but wakeable (interrupts on): the halt watch leaves it running."""
    need_kvm()
    v = vmm_factory(PRINT_OK + HALT)
    time.sleep(3)  # several halt checks (every 0.5 s while no vCPU exits)
    st = v.cmd("status")
    assert st["state"] == "running" and "stop_reason" not in st, st
    assert v.cmd("shutdown")["ok"]
    rc, err = v.wait()
    assert rc == 0, err.decode()


def test_console_to_file_and_smp(tmp_path):
    need_kvm()
    k = bzimage(tmp_path, PRINT_OK + RESET + HALT)
    out = tmp_path / "console.log"
    r = run_vmm("boot", "--kernel", str(k), "--mem", "64M", "--cpus", "2", "--console", str(out))
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes() == b"OK\n"
    assert r.stdout == b""


def test_pvh_entry(tmp_path):
    need_kvm()
    data = bytearray(synthetic_elf(pvh_entry=0x100_0000))
    code = PRINT_OK + RESET + HALT
    data[-512 : -512 + len(code)] = code  # the ELF's text is its last 512 bytes
    k = tmp_path / "vmlinux"
    k.write_bytes(bytes(data))
    r = run_vmm("boot", "--kernel", str(k), "--mem", "64M", "--console", "stdio")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b"OK\n"


def test_serial_input_echo(tmp_path):
    need_kvm()
    k = bzimage(tmp_path, ECHO_UNTIL_Q + RESET + HALT)
    r = run_vmm("boot", "--kernel", str(k), "--mem", "64M", stdin=b"hello q")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b"hello q"


@pytest.mark.parametrize(("extra", "expected"), [((), b"v4"), (("--disk", "DISK"), b"v2")])
def test_virtio_slot_visible_to_guest(tmp_path, extra, expected):
    """The first virtio-mmio slot answers at 0xd0001000: rng (id 4) alone, blk (id 2) first."""
    need_kvm()
    k = bzimage(tmp_path, READ_VIRTIO_SLOT + RESET + HALT)
    extra = tuple(str(_disk(tmp_path)) if a == "DISK" else a for a in extra)
    r = run_vmm("boot", "--kernel", str(k), "--mem", "64M", *extra)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == expected


def test_raw_terminal_escape(tmp_path):
    """On a tty the console is raw (bytes reach the guest as typed) and Ctrl-A x quits."""
    need_kvm()
    import pty

    k = bzimage(tmp_path, ECHO_UNTIL_Q[:-2] + b"\xeb\xed")  # echo forever (never resets)
    control = tmp_path / "c.sock"
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*VMM, "boot", "--kernel", str(k), "--mem", "64M", "--control", str(control)],
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
    )
    os.close(slave)
    try:
        deadline = time.monotonic() + 60
        while not control.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "VMM did not come up"
            time.sleep(0.02)
        os.write(master, b"ab\x03")  # Ctrl-C goes to the guest, not to the VMM: raw mode
        got = b""
        while len(got) < 3:
            got += os.read(master, 100)
        assert got == b"ab\x03"
        os.write(master, b"\x01x")
        assert proc.wait(60) == 0
        assert not control.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        os.close(master)


def test_boot_timer_logged(tmp_path):
    need_kvm()
    k = bzimage(tmp_path, BOOT_TIMER + RESET + HALT)
    r = run_vmm("boot", "--kernel", str(k), "--mem", "64M", "--boot-timer", "--console", "none")
    assert r.returncode == 0, r.stderr.decode()
    assert b"Guest-boot-time = " in r.stderr
    # without --boot-timer the write goes nowhere and nothing is logged
    r = run_vmm("boot", "--kernel", str(k), "--mem", "64M", "--console", "none")
    assert r.returncode == 0, r.stderr.decode()
    assert b"Guest-boot-time" not in r.stderr


class Vmm:
    """A background VMM process with a control socket."""

    def __init__(self, tmp_path: Path, code: bytes, *extra: str):
        self.control = tmp_path / "control.sock"
        self.vsock = tmp_path / "vsock.sock"
        k = bzimage(tmp_path, code)
        self.proc = subprocess.Popen(
            [
                *VMM,
                "boot",
                "--kernel",
                str(k),
                "--mem",
                "64M",
                "--console",
                "none",
                "--control",
                str(self.control),
                "--vsock",
                str(self.vsock),
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while not self.control.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out, err = self.proc.communicate(timeout=10)
                raise AssertionError(f"VMM did not come up: rc={self.proc.returncode} {err!r}")
            time.sleep(0.02)

    def cmd(self, name: str) -> dict:
        return request(self.control, name)

    def wait(self) -> tuple[int, bytes]:
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


@pytest.fixture
def vmm_factory(tmp_path):
    made: list[Vmm] = []

    def make(code: bytes = PRINT_OK + HALT, *extra: str) -> Vmm:
        v = Vmm(tmp_path, code, *extra)
        made.append(v)
        return v

    yield make
    for v in made:
        v.kill()


def test_control_status_pause_resume_shutdown(vmm_factory, tmp_path):
    need_kvm()
    v = vmm_factory(PRINT_OK + HALT, "--disk", str(_disk(tmp_path)))
    st = v.cmd("status")
    assert st["ok"] and st["state"] == "running"
    assert st["uptime_s"] >= 0
    assert "virtio_mmio.device=4K@0xd0001000:5" in st["cmdline"]
    assert "virtio_mmio.device=4K@0xd0002000:6" in st["cmdline"]
    assert [d["type"] for d in st["virtio"]] == ["VirtioVsock", "VirtioBlk", "VirtioRng"]
    assert v.vsock.exists()
    assert v.cmd("pause") == {"ok": True, "state": "paused"}
    assert v.cmd("status")["state"] == "paused"
    r = v.cmd("pause")
    assert not r["ok"] and "paused" in r["error"]
    assert v.cmd("resume") == {"ok": True, "state": "running"}
    assert v.cmd("status")["state"] == "running"
    assert not v.cmd("frobnicate")["ok"]
    assert v.cmd("shutdown")["ok"]
    rc, err = v.wait()
    assert rc == 0, err.decode()
    assert b"Traceback" not in err
    assert not v.control.exists()
    assert not v.vsock.exists()


def _disk(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    return img


def test_control_rejects_malformed_requests(vmm_factory):
    need_kvm()
    v = vmm_factory()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(v.control))
        f = s.makefile("rwb")
        for line in (b"not json\n", b"[1,2]\n", b'{"nocmd": 1}\n', b'{"cmd": "status"}\n'):
            f.write(line)
            f.flush()
            reply = json.loads(f.readline())
            if line.startswith(b'{"cmd"'):
                assert reply["ok"] and reply["state"] == "running"
            else:
                assert reply["ok"] is False and reply["error"]
    v.cmd("shutdown")
    assert v.wait()[0] == 0


def test_status_reports_boot_time(vmm_factory):
    need_kvm()
    v = vmm_factory(BOOT_TIMER + PRINT_OK + HALT, "--boot-timer")
    deadline = time.monotonic() + 60
    while "boot_time_us" not in (st := v.cmd("status")):
        assert time.monotonic() < deadline, st
        time.sleep(0.02)
    assert st["boot_time_us"] > 0
    assert v.cmd("shutdown")["ok"]
    rc, err = v.wait()
    assert rc == 0 and b"Guest-boot-time = " in err


def test_paused_start_then_resume(vmm_factory):
    need_kvm()
    v = vmm_factory(PRINT_OK + RESET + HALT, "--paused")
    assert v.cmd("status")["state"] == "created"
    assert v.cmd("resume")["ok"]
    rc, err = v.wait()  # the guest resets itself once started
    assert rc == 0, err.decode()
    assert b"reset" in err
    assert not v.control.exists() and not v.vsock.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_cleans_up(vmm_factory, sig):
    need_kvm()
    v = vmm_factory()
    v.proc.send_signal(sig)
    rc, err = v.wait()
    assert rc == 0, err.decode()
    assert b"Traceback" not in err
    assert not v.control.exists() and not v.vsock.exists()


def test_exits_when_parent_dies(tmp_path):
    need_kvm()
    k = bzimage(tmp_path, HALT)
    control = tmp_path / "c.sock"
    parent_code = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen({[*VMM, 'boot', '--kernel', str(k), '--mem', '64M', '--console', 'none', '--control', str(control)]!r},"
        " stdin=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE)
    try:
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 60
        while not control.exists():
            assert time.monotonic() < deadline, "VMM did not come up"
            time.sleep(0.02)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 60
        while _alive(child):
            if time.monotonic() > deadline:
                os.kill(child, signal.SIGKILL)
                pytest.fail("VMM outlived its parent")
            time.sleep(0.05)
        assert not control.exists()
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    # the orphan is reparented (to init or a subreaper) which reaps it; /proc tells zombies apart
    return proc_state(pid) not in (None, "Z")


# -- the Machine API in-process -------------------------------------------------------------------
@pytest.fixture
def kick_handler():
    from pytest_ignition.vmm.vcpu import install_kick_handler

    install_kick_handler()  # pytest runs tests on the main thread


def test_machine_api_lifecycle(tmp_path, kick_handler):
    need_kvm()
    from pytest_ignition.vmm.machine import Machine, MachineError, MachineSpec

    out: list[bytes] = []
    k = bzimage(tmp_path, PRINT_OK + HALT)
    spec = MachineSpec(kernel=str(k), mem_size=64 << 20, cpus=2, console_out=out.append)
    with Machine.create(spec) as m:
        assert m.status()["state"] == "created"
        assert m.cmdline.startswith("console=ttyS0")
        assert m.cmdline.endswith("virtio_mmio.device=4K@0xd0001000:5")
        with pytest.raises(MachineError):
            m.pause()
        m.start()
        m.pause()
        assert m.state == "paused" and all(r.paused for r in m.runners)
        m.resume()
        assert m.state == "running"
        assert m.wait(0.05) is None  # halted with interrupts off: it never stops by itself
        assert m.shutdown() == 0
        assert m.state == "stopped" and m.stop_reason.kind == "requested"
        assert b"".join(out) == b"OK\n"
        with pytest.raises(MachineError):
            m.resume()


def test_machine_api_guest_reset_and_dirty_log(tmp_path, kick_handler):
    need_kvm()
    from pytest_ignition.vmm.machine import Machine, MachineSpec

    k = bzimage(tmp_path, PRINT_OK + RESET + HALT)
    spec = MachineSpec(kernel=str(k), mem_size=64 << 20, log_dirty=True, rng=False)
    m = Machine.boot(spec)
    try:
        assert m.wait(60) == 0
        assert m.stop_reason.kind == "reset"
        assert m.status()["exit_status"] == 0
        assert m.virtio_devices == []
        # dirty logging is on for the slot: KVM hands back a bitmap of the right size
        bitmap = m.vm.get_dirty_log(0, 64 << 20)
        assert len(bitmap) == (64 << 20) // 4096 // 8
    finally:
        m.close()


def test_machine_rejects_bad_specs(tmp_path):
    from pytest_ignition.vmm.machine import MachineError, MachineSpec

    with pytest.raises(MachineError):
        MachineSpec(kernel="k", mem_size=1 << 20)
    with pytest.raises(MachineError):
        MachineSpec(kernel="k", cpus=0)
