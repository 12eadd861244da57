"""Two vCPUs of one VM running at once, each on its own run-loop thread, sharing the buses."""

from __future__ import annotations

import struct
import threading

import cpl3
import pytest

from pytest_ignition.vmm import kvm
from pytest_ignition.vmm.vcpu import StopReason, VcpuRunner

pytestmark = pytest.mark.kvm

N = 2000


def looper(port: int) -> bytes:
    return b"".join(
        [
            b"\xb9" + struct.pack("<I", N),  # mov ecx, N
            b"\x66\xba" + struct.pack("<H", port),  # mov dx, port
            b"\x88\xc8",  # again: mov al, cl
            b"\xee",  # out dx, al
            b"\xe2\xfb",  # loop again
            b"\xe6\xf4",  # out 0xf4, al
        ]
    )


class Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: list[int] = []
        self.threads: set[str] = set()

    def read(self, offset: int, data: bytearray) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            self.values.append(data[0])
            self.threads.add(threading.current_thread().name)


def test_two_vcpus_each_on_its_own_run_loop(kvm_system):
    second = cpl3.CODE_ADDR + 0x1000
    g = cpl3.Cpl3Guest(kvm_system, looper(0x600))
    g.mem.write(second, looper(0x601))
    vcpu1 = g.vm.create_vcpu(1)
    vcpu1.set_cpuid2(kvm_system.supported_cpuid())
    vcpu1.set_sregs(cpl3.cpl3_sregs(vcpu1.get_sregs()))
    vcpu1.set_regs(kvm.Regs(rip=second, rsp=cpl3.STACK_TOP - 0x1000, rflags=0x3002))

    a, b = Counter(), Counter()
    g.pio.insert(a, 0x600, 1)
    g.pio.insert(b, 0x601, 1)
    done: dict[int, StopReason] = {}
    all_done = threading.Event()

    def on_stop(reason: StopReason) -> None:
        done[reason.vcpu] = reason
        if len(done) == 2:
            all_done.set()

    r0 = VcpuRunner(g.vcpu, g.pio, g.mmio, on_stop)
    r1 = VcpuRunner(vcpu1, g.pio, g.mmio, on_stop)
    exits_by_vcpu = {0: r0, 1: r1}

    class ExitPort:
        def read(self, offset: int, data: bytearray) -> None:
            data[:] = bytes(len(data))

        def write(self, offset: int, data: bytes) -> None:
            me = threading.current_thread().name
            runner = r0 if me == r0.name else r1
            runner.request_stop(StopReason("requested", "done"))

    g.pio.remove(cpl3.EXIT_PORT)
    g.pio.insert(ExitPort(), cpl3.EXIT_PORT, 1)
    try:
        r0.start()
        r1.start()
        assert all_done.wait(60)
        assert {v: r.kind for v, r in done.items()} == {0: "requested", 1: "requested"}
        assert a.values == [N - i & 0xFF for i in range(N)]
        assert b.values == [N - i & 0xFF for i in range(N)]
        assert a.threads == {"vcpu0"} and b.threads == {"vcpu1"}
        for idx, runner in exits_by_vcpu.items():
            assert runner.exits[kvm.KVM_EXIT_IO] == N + 1, idx
    finally:
        r0.stop()
        r1.stop()
        g.close()
