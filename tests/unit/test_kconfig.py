"""Kernel config fragments: parsing, merging and verification on small synthetic inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_ignition.guest import kconfig

REPO_GUEST = Path(__file__).resolve().parents[2] / "guest" / "kernel"

BASE = """\
#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_64BIT=y
# CONFIG_SMP is not set
CONFIG_NR_CPUS=1
CONFIG_LOCALVERSION=""
CONFIG_MODULES=y
"""


def test_parse_values_unset_and_comments() -> None:
    got = kconfig.parse(BASE)
    assert got == {
        "CONFIG_64BIT": "y",
        "CONFIG_SMP": None,
        "CONFIG_NR_CPUS": "1",
        "CONFIG_LOCALVERSION": '""',
        "CONFIG_MODULES": "y",
    }


def test_parse_later_line_wins() -> None:
    assert kconfig.parse("CONFIG_A=y\n# CONFIG_A is not set\n") == {"CONFIG_A": None}
    assert kconfig.parse("# CONFIG_A is not set\nCONFIG_A=y\n") == {"CONFIG_A": "y"}


def test_strict_parse_rejects_typos() -> None:
    with pytest.raises(kconfig.FragmentError, match="line 2"):
        kconfig.parse("CONFIG_A=y\nCONFIG_B y\n", strict=True)
    with pytest.raises(kconfig.FragmentError):
        kconfig.parse("config_lowercase=y\n", strict=True)
    # A lenient parse (a kernel's .config) just skips it.
    assert kconfig.parse("CONFIG_B y\nCONFIG_A=y\n") == {"CONFIG_A": "y"}


def test_merge_replaces_and_appends() -> None:
    merged = kconfig.merge(
        BASE, "CONFIG_SMP=y\nCONFIG_NR_CPUS=8\n# CONFIG_MODULES is not set\nCONFIG_NEW=y\n"
    )
    got = kconfig.parse(merged)
    assert got["CONFIG_SMP"] == "y"
    assert got["CONFIG_NR_CPUS"] == "8"
    assert got["CONFIG_MODULES"] is None
    assert got["CONFIG_NEW"] == "y"
    assert got["CONFIG_64BIT"] == "y"
    # Each symbol appears exactly once, so olddefconfig cannot see a stale duplicate.
    lines = [ln for ln in merged.splitlines() if "CONFIG_SMP" in ln]
    assert lines == ["CONFIG_SMP=y"]


def test_verify_accepts_honoured_fragment() -> None:
    frag = "CONFIG_64BIT=y\n# CONFIG_SMP is not set\n# CONFIG_ABSENT is not set\n"
    assert kconfig.verify(frag, BASE) == []


def test_verify_reports_dropped_and_wrongly_enabled() -> None:
    frag = "CONFIG_SMP=y\nCONFIG_VIRTIO_MMIO=y\nCONFIG_NR_CPUS=8\n# CONFIG_MODULES is not set\n"
    bad = kconfig.verify(frag, BASE)
    assert [b.name for b in bad] == [
        "CONFIG_SMP",
        "CONFIG_VIRTIO_MMIO",
        "CONFIG_NR_CPUS",
        "CONFIG_MODULES",
    ]
    text = [str(b) for b in bad]
    assert text[0] == "CONFIG_SMP wanted =y, got not set"
    assert text[2] == "CONFIG_NR_CPUS wanted =8, got =1"
    assert text[3] == "CONFIG_MODULES wanted is not set, got =y"


def test_verify_module_is_not_builtin() -> None:
    # =m must not pass for =y: the guest has no module loader.
    assert [b.name for b in kconfig.verify("CONFIG_X=y\n", "CONFIG_X=m\n")] == ["CONFIG_X"]
    assert kconfig.verify("# CONFIG_X is not set\n", "CONFIG_X=n\n") == []


@pytest.mark.parametrize("name", ["x86_64.config", "host-x86_64.config"])
def test_repo_fragments_parse_strictly(name: str) -> None:
    path = REPO_GUEST / name
    assert path.exists(), f"{path} is missing from the repository"
    settings = kconfig.parse(path.read_text(), strict=True)
    assert settings["CONFIG_64BIT"] == "y"
    assert settings["CONFIG_MODULES"] is None


def test_guest_fragment_has_microvm_essentials() -> None:
    settings = kconfig.parse((REPO_GUEST / "x86_64.config").read_text(), strict=True)
    for opt in (
        "VIRTIO_MMIO", "VIRTIO_MMIO_CMDLINE_DEVICES", "VSOCKETS", "VIRTIO_VSOCKETS", "VIRTIO_BLK",
        "HW_RANDOM_VIRTIO", "VIRTIO_CONSOLE", "SERIAL_8250_CONSOLE", "EXT4_FS", "OVERLAY_FS",
        "DEVTMPFS", "BLK_DEV_INITRD", "RD_GZIP", "PVH", "KVM_GUEST", "DEVMEM", "UNIX",
    ):  # fmt: skip
        assert settings.get(f"CONFIG_{opt}") == "y", opt
    assert settings["CONFIG_STRICT_DEVMEM"] is None
