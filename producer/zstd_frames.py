"""Telling a truncated ``.zst`` file from a whole one.

``zstandard``'s stream reader returns what it could decompress and then ``b""`` when the file
ends inside a frame, as if the file were whole. :class:`FrameCheck` stands between the file and
the reader and follows the frame layout (RFC 8878 §3.1: frame headers and block headers only,
never the content) of the bytes as they pass, so that the end of the file is an error unless it
falls between frames. It costs a few Python steps per block (at most 128 KiB of text).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import BinaryIO

ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE_MAGIC = 0x184D2A50  # to 0x184D2A5F: a skippable frame (its size, then that many bytes)

# What the layout asks for next: ("keep", n) the next n bytes sent back to it, ("skip", n) n
# bytes passed over; ("frame", 4) the first 4 bytes of a frame (the end may come only there).
Step = tuple[str, int]


def _layout() -> Generator[Step, bytes, None]:
    while True:
        magic = int.from_bytes((yield "frame", 4), "little")
        if magic & 0xFFFFFFF0 == SKIPPABLE_MAGIC:
            yield "skip", int.from_bytes((yield "keep", 4), "little")
            continue
        if magic != ZSTD_MAGIC:
            raise ValueError(f"not a zstd frame (magic number 0x{magic:08x})")
        descriptor = (yield "keep", 1)[0]
        single_segment = descriptor >> 5 & 1
        content_size = (single_segment, 2, 4, 8)[descriptor >> 6]
        yield "skip", (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3] + content_size
        last = False
        while not last:
            header = int.from_bytes((yield "keep", 3), "little")
            last, kind, size = bool(header & 1), header >> 1 & 3, header >> 3
            yield "skip", 1 if kind == 1 else size  # an RLE block holds one byte
        yield "skip", 4 * (descriptor >> 2 & 1)  # the content checksum


class FrameCheck:
    """A binary file read through, checking that it ends between zstd frames (EOFError if not)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.layout = _layout()
        self.step = next(self.layout)
        self.held = b""  # the start of a "keep" or "frame" step

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if not data:
            if self.held or self.step[0] != "frame":
                raise EOFError("the file ends inside a zstd frame (truncated)")
            return data
        view = memoryview(data)
        while view:
            kind, count = self.step
            if kind == "skip":
                taken = min(count, len(view))
                view, self.step = view[taken:], ("skip", count - taken)
            else:
                taken = min(count - len(self.held), len(view))
                self.held, view = self.held + bytes(view[:taken]), view[taken:]
                if len(self.held) < count:
                    break
                self.held, self.step = b"", self.layout.send(self.held)
            while self.step == ("skip", 0):
                self.step = next(self.layout)
        return data
