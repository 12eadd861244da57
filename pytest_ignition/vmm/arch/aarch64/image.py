"""The arm64 ``Image`` boot protocol (Linux Documentation/arm64/booting.rst): header, placement.

The 64-byte little-endian header: ``code0``/``code1``, ``text_offset`` (u64 @8), ``image_size``
(u64 @16, includes the BSS the kernel clears itself: reserve it), ``flags`` (u64 @24: bit 0 big
endian, bits 1-2 page size, bit 3 "may be placed anywhere"), the magic ``ARM\\x64`` @56 and the PE
header offset @60. The kernel runs from a 2 MiB-aligned base plus ``text_offset``; kernels before
3.17 have ``image_size`` 0, and then ``text_offset`` is 0x80000 whatever the header says.
Entry: x0 = device tree address, x1-x3 = 0, PC = load address, MMU off.
"""

from __future__ import annotations

from dataclasses import dataclass

from .layout import DRAM_START, KERNEL_ALIGN

IMAGE_MAGIC = 0x644D5241  # "ARM\x64"
HEADER_SIZE = 64
LEGACY_TEXT_OFFSET = 0x80000
PAGE_SIZES = {0: None, 1: 4096, 2: 16384, 3: 65536}


class ImageError(ValueError):
    """The file is not an arm64 Image this machine can boot; the message says what it is."""


@dataclass(frozen=True)
class ArmImage:
    text_offset: int
    image_size: int  # bytes the kernel occupies from its load address, BSS included
    big_endian: bool
    page_size: int | None  # the kernel's page size, None when the header does not say
    anywhere: bool  # bit 3: any 2 MiB-aligned base in RAM will do
    file_size: int

    def load_addr(self, dram_start: int = DRAM_START) -> int:
        """The kernel's load (and entry) address: a 2 MiB-aligned base + ``text_offset``."""
        base = (dram_start + KERNEL_ALIGN - 1) & ~(KERNEL_ALIGN - 1)
        return base + self.text_offset

    def end(self, dram_start: int = DRAM_START) -> int:
        """First byte after the kernel's memory (image or BSS); nothing else may go below."""
        return self.load_addr(dram_start) + max(self.image_size, self.file_size)


def parse_header(data: bytes) -> ArmImage:
    """Check and decode the header of ``data``, the whole Image file (its length counts as the
    file size). Raises :class:`ImageError` saying what the file is instead."""
    if len(data) < HEADER_SIZE:
        raise ImageError(f"{len(data)} bytes: too short for an arm64 Image header")
    if data[:2] == b"\x1f\x8b":
        raise ImageError("a gzip file (Image.gz?): decompress it, the VMM boots a plain Image")
    if data[4:8] == b"zimg":
        raise ImageError("an EFI zboot image (vmlinuz.efi): boot the plain arch/arm64/boot/Image")
    if data[:4] == b"\x7fELF":
        raise ImageError("an ELF file (vmlinux?): boot arch/arm64/boot/Image instead")
    magic = int.from_bytes(data[56:60], "little")
    if magic != IMAGE_MAGIC:
        raise ImageError(f"no arm64 Image magic at offset 56 (found {magic:#010x})")
    text_offset = int.from_bytes(data[8:16], "little")
    image_size = int.from_bytes(data[16:24], "little")
    flags = int.from_bytes(data[24:32], "little")
    if image_size == 0:  # pre-3.17 kernel: the header's text_offset is not trustworthy
        text_offset = LEGACY_TEXT_OFFSET
    big_endian = bool(flags & 1)
    if big_endian:
        raise ImageError("a big-endian arm64 kernel: this machine boots little-endian ones")
    if text_offset % 4096 or text_offset >= KERNEL_ALIGN:
        raise ImageError(f"text_offset {text_offset:#x} is not a page offset inside 2 MiB")
    if image_size and image_size < len(data):
        raise ImageError(f"image_size {image_size} is smaller than the file ({len(data)} bytes)")
    if image_size > 1 << 30:
        raise ImageError(f"image_size {image_size} bytes: not a plausible kernel")
    return ArmImage(
        text_offset=text_offset,
        image_size=image_size,
        big_endian=big_endian,
        page_size=PAGE_SIZES[(flags >> 1) & 3],
        anywhere=bool(flags & 8),
        file_size=len(data),
    )
