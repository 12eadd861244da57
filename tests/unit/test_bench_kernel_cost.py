"""benchmarks/kernel_cost.py's parsers, on console text and symbol tables written here (no VM)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import kernel_cost as kc

CONSOLE = b"""\
Linux version 6.1.192 (root@vm) #1 SMP
[    0.660000] calling  0xffffffff81ae7972 @ 1
[    0.664000] initcall 0xffffffff81ae7972 returned 0 after 4000 usecs
[    0.668000] calling  inet6_init+0x0/0x2a0 @ 1
[    0.690000] initcall inet6_init+0x0/0x2a0 returned 0 after 28001 usecs
[    0.691000] initcall 0xffffffff81b09d98 returned -19 after 12 usecs
[    0.692000] initcall broken returned 0 after
[    2.676113] Run /init as init process
"""

SYSTEM_MAP = """\
ffffffff81ae7900 t other_fn
ffffffff81ae7972 t pty_init
ffffffff81b09d98 t packet_init
ffffffff81b09e00 T vsock_init
ffffffff81c00000 D some_data
"""


def test_parse_initcalls_takes_addresses_and_names() -> None:
    assert kc.parse_initcalls(CONSOLE) == [
        ("ffffffff81ae7972", 4000),
        ("inet6_init", 28001),
        ("ffffffff81b09d98", 12),
    ]
    assert kc.parse_initcalls(b"no initcalls here") == []


def test_parse_kernel_to_init() -> None:
    assert kc.parse_kernel_to_init(CONSOLE) == 2.676113
    assert kc.parse_kernel_to_init(b"Run /init as init process\n") is None  # no printk time


def test_group_of_object_paths() -> None:
    assert kc.group_of("net/ipv4/netfilter/nft_reject_ipv4.o") == "netfilter/nftables"
    assert kc.group_of("net/ipv4/af_inet.o") == "net/ipv4 (TCP/UDP/IPv4)"
    assert kc.group_of("net/core/net_namespace.o") == "namespaces"
    assert kc.group_of("net/core/dev.o") == "net core"
    assert kc.group_of("drivers/net/virtio_net.o") == "drivers/net (virtio-net, veth, tun)"
    assert kc.group_of("fs/squashfs/super.o") == "squashfs"
    assert kc.group_of("drivers/tty/pty.o") == "drivers/tty"
    assert kc.group_of("mm/vmscan.o") == "mm"


def test_symbol_map_names_addresses_and_groups_them(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "System.map").write_text(SYSTEM_MAP)
    objects = {
        "pty_init": ["drivers/tty/pty.o"],
        "packet_init": ["net/packet/af_packet.o"],
        "inet6_init": ["net/ipv6/af_inet6.o"],
        "init": ["fs/fuse/inode.o", "net/ipv6/x.o"],
    }
    monkeypatch.setattr(kc, "_objects_by_symbol", lambda d: objects)
    sm = kc.SymbolMap(tmp_path / "System.map", tmp_path)
    assert sm.name("ffffffff81ae7972") == "pty_init"
    assert sm.name("ffffffff81ae7980") == "pty_init"  # inside the function: the one before
    assert sm.name("inet6_init") == "inet6_init"
    assert sm.group("ffffffff81b09d98") == "net/packet (AF_PACKET)"
    assert sm.group("init") == "ambiguous"
    assert sm.group("ffffffff81b09e00") == "unmapped"  # vsock_init: no object known
    sums = kc.group_usecs(kc.parse_initcalls(CONSOLE), sm)
    assert sums == {
        "total": 32013,
        "drivers/tty": 4000,
        "net/ipv6": 28001,
        "net/packet (AF_PACKET)": 12,
    }


def test_symbol_map_without_a_build_leaves_everything_unmapped() -> None:
    sm = kc.SymbolMap(None, None)
    assert sm.name("ffffffff81ae7972") == "ffffffff81ae7972"
    assert kc.group_usecs([("ffffffff81ae7972", 5)], sm) == {"total": 5, "unmapped": 5}


def test_host_tsc_khz_is_a_rate_or_zero() -> None:
    assert kc.host_tsc_khz() >= 0


def test_without_the_before_kernel_it_says_how_to_build_it(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setattr(kc, "find_before", lambda: None)
    results = tmp_path / "images.json"
    assert kc.main(["--results", str(results)]) == 3
    assert "python -m benchmarks.kernel_cost build" in capsys.readouterr().err
    assert not results.exists()  # the recorded numbers stay
