"""The aarch64 side of the guest pipeline: fragment, busybox applet table, keys, clean, outputs.

No VM here (the arm64 guest boots in tests/e2e with ``--ignition-arch=aarch64``). The built
artefacts are checked when ``python -m pytest_ignition.guest build --arch aarch64`` has run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_ignition._testing import require
from pytest_ignition.guest import GUEST_FLAVOURS, find_guest, kconfig
from pytest_ignition.guest import build as gbuild

# Options that only mean something on x86 (the arm64 fragment has its own platform block).
X86_ONLY = {
    "CONFIG_64BIT",
    "CONFIG_KERNEL_GZIP",
    "CONFIG_HYPERVISOR_GUEST",
    "CONFIG_PARAVIRT",
    "CONFIG_KVM_GUEST",
    "CONFIG_PVH",
    "CONFIG_X86_MPPARSE",
    "CONFIG_EARLY_PRINTK",
    "CONFIG_SERIO",
}


def _fragment(arch: str) -> dict[str, str | None]:
    rel = GUEST_FLAVOURS[arch][1]
    return kconfig.parse((gbuild.guest_src_dir() / rel).read_text(), strict=True)


def test_arm64_fragment_keeps_every_x86_capability() -> None:
    x86, arm = _fragment("x86_64"), _fragment("aarch64")
    missing = {k: v for k, v in x86.items() if k not in X86_ONLY and arm.get(k, "?") != v}
    assert missing == {}, "aarch64.config lags x86_64.config"
    for opt in (
        "CONFIG_SERIAL_AMBA_PL011_CONSOLE",
        "CONFIG_SERIAL_OF_PLATFORM",
        "CONFIG_ARM_GIC_V3",
    ):
        assert arm[opt] == "y"
    assert arm["CONFIG_VIRTIO_MMIO"] == "y" and arm["CONFIG_ARM_PSCI_FW"] == "y"


def test_flavours_and_names() -> None:
    assert gbuild.flavour_arch("guest") == gbuild.flavour_arch("host") == "x86_64"
    assert gbuild.flavour_arch(GUEST_FLAVOURS["aarch64"][0]) == "aarch64"
    # clean splits build/<flavour>-<srckey> at the first '-'
    assert all("-" not in f for f, _ in GUEST_FLAVOURS.values())
    assert gbuild.initrd_name("k" * 20) == "initrd-" + "k" * 20 + ".cpio.gz"
    assert gbuild.initrd_name("k" * 20, "aarch64") == "initrd-aarch64-" + "k" * 20 + ".cpio.gz"


def test_kernel_key_depends_on_the_cross_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr(gbuild, "_tool_version", lambda t: seen.append(t) or t)
    gbuild.kernel_key("guest", "CONFIG_X=y\n", "tar:x")
    gbuild.kernel_key("guest_aarch64", "CONFIG_X=y\n", "tar:x")
    assert seen == ["gcc", "make", "aarch64-linux-gnu-gcc", "make"]


def test_applet_names_read_from_the_binary_match_busybox_list() -> None:
    require(gbuild.BUSYBOX.is_file(), "apt-get install busybox-static")
    import subprocess

    listed = subprocess.run([str(gbuild.BUSYBOX), "--list"], capture_output=True, text=True)
    names = gbuild.applet_names(gbuild.BUSYBOX.read_bytes())
    assert names == sorted(listed.stdout.split())
    assert "sh" in names and "init" in names


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x7fELF no table here", b"xx[\0[[\0zz\0aa\0\0", b"[\0[[\0" + b"a\xff\0" * 20],
)
def test_applet_names_rejects_what_is_no_table(blob: bytes) -> None:
    with pytest.raises(gbuild.GuestBuildError):
        gbuild.applet_names(blob)


def test_foreign_busybox_applets_take_the_host_places(tmp_path: Path) -> None:
    require(gbuild.BUSYBOX.is_file(), "apt-get install busybox-static")
    fake = tmp_path / "busybox"
    names = [b"[", b"[[", *[b"a%02d" % i for i in range(10)], b"init", b"sh", b"zz"]
    fake.write_bytes(b"junk" + b"\0".join(names) + b"\0\0")
    full = gbuild._busybox_applets(fake, "aarch64")
    assert "bin/sh" in full and "sbin/init" in full  # the host busybox's places
    assert "bin/a05" in full and "bin/zz" in full  # unknown names: /bin


def test_clean_keeps_the_current_arm64_initrd_and_removes_stale_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require(gbuild.BUSYBOX.is_file(), "apt-get install busybox-static")
    root = tmp_path / "cache"
    bb = tmp_path / "bb-arm64"
    bb.write_bytes(b"\x7fELF pretend arm64 busybox")
    monkeypatch.setenv("IGNITION_CACHE_DIR", str(root))
    monkeypatch.setenv("IGNITION_BUSYBOX_AARCH64", str(bb))
    cur = gbuild.current_initrd_key("aarch64")
    assert cur != gbuild.current_initrd_key("x86_64")
    for name in (gbuild.initrd_name(cur, "aarch64"), gbuild.initrd_name("c" * 20, "aarch64")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (root / "tools" / "busybox-aarch64").mkdir(parents=True)
    plan = gbuild.plan_clean({"host": "kernel/host-x86_64.config"}, "stale")
    removed = {i.path.name for i in plan.remove}
    kept = {p.name for p, _ in plan.keep}
    assert removed == {gbuild.initrd_name("c" * 20, "aarch64")}
    assert {gbuild.initrd_name(cur, "aarch64"), "tools"} <= kept
    everything = gbuild.plan_clean({"host": "kernel/host-x86_64.config"}, "everything")
    assert "tools" in {i.path.name for i in everything.remove}
    # Without the busybox the key is unknown: every arm64 initramfs is kept.
    monkeypatch.setenv("IGNITION_BUSYBOX_AARCH64", str(tmp_path / "absent"))
    monkeypatch.delenv("IGNITION_BUSYBOX_AARCH64")
    plan = gbuild.plan_clean({"host": "kernel/host-x86_64.config"}, "stale")
    assert not any(i.path.name.startswith("initrd-aarch64-") for i in plan.remove)


def test_built_arm64_guest_is_arm64() -> None:
    img = find_guest("aarch64")
    require(
        img is not None,
        "arm64 guest not built (python -m pytest_ignition.guest build --arch aarch64)",
    )
    assert img is not None and img.arch == "aarch64"
    head = img.kernel.read_bytes()[:64]
    assert head[56:60] == b"ARM\x64", "not an arm64 Image (magic at offset 56)"
    assert (
        kconfig.verify(
            (gbuild.guest_src_dir() / GUEST_FLAVOURS["aarch64"][1]).read_text(),
            img.config.read_text(),
        )
        == []
    )
    import gzip

    raw = gzip.decompress(img.initrd.read_bytes())
    # newc entries: the agent and busybox are AArch64 (e_machine 183) static ELFs
    for name in (b"sbin/ignition-agent\0", b"bin/busybox\0"):
        at = raw.index(name)
        elf = raw.index(b"\x7fELF", at)
        assert int.from_bytes(raw[elf + 18 : elf + 20], "little") == 183, name
    assert os.path.getsize(img.initrd) > 100_000
