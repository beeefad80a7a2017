"""The host's model of the test guest's ``mem-walk`` scenario (tests/guest/README.md,
"mem-walk"): the lines a correct run prints, computed here from the pattern's definition
so that no test hard-codes a CRC."""

from __future__ import annotations

import struct
import zlib

from tests.virtio_guest_support import splitmix64

GOLDEN = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1
PAGE = 4096
PAGE_WORDS = PAGE // 8
STRIDE = 4
GENERATION_SHIFT = 48
PREFIX = "avmm-testguest: "

_PAGE_FORMAT = struct.Struct(f"<{PAGE_WORDS}Q")


def page_bytes(seed: int, generation: int, page: int) -> bytes:
    """Page ``page`` of the buffer as round ``generation`` writes it (0: the fill)."""
    start = (seed * GOLDEN + (generation << GENERATION_SHIFT) + page * PAGE_WORDS) & MASK64
    return _PAGE_FORMAT.pack(*(splitmix64((start + j) & MASK64) for j in range(PAGE_WORDS)))


def round_crcs(mib: int, rounds: int, seed: int = 1) -> list[int]:
    """The CRC-32 of the whole buffer after each round 1..``rounds``."""
    pages = [page_bytes(seed, 0, p) for p in range(mib * (1 << 20) // PAGE)]
    crcs = []
    for round_number in range(1, rounds + 1):
        for p in range(round_number % STRIDE, len(pages), STRIDE):
            pages[p] = page_bytes(seed, round_number, p)
        crc = 0
        for page in pages:
            crc = zlib.crc32(page, crc)
        crcs.append(crc)
    return crcs


def expected_lines(mib: int, rounds: int, seed: int = 1) -> list[str]:
    """Every line a run of ``avmm.test=mem-walk`` with these options prints."""
    lines = [f"{PREFIX}mem-walk round={r} crc={crc:08x}"
             for r, crc in enumerate(round_crcs(mib, rounds, seed), start=1)]
    return [*lines, f"{PREFIX}mem-walk done rounds={rounds} verify=ok"]


def pages_processed(mib: int, rounds: int) -> int:
    """The guest's progress word (mailbox scratch word 0) after a whole run: every page
    written by the fill, then per round the pages it rewrites and every page checked."""
    pages = mib * (1 << 20) // PAGE
    return pages + sum(len(range(r % STRIDE, pages, STRIDE)) + pages
                       for r in range(1, rounds + 1))


def mem_walk_lines(output: str) -> list[str]:
    """The ``mem-walk`` lines of a guest's serial output."""
    return [line for line in output.splitlines() if line.startswith(f"{PREFIX}mem-walk ")]
