"""The integer widths of the snapshot codec's fields (``Annotated[int, IntRange]``).

Their own module, apart from :mod:`avmm.state.codec`: every virtio device and transport
declares its state class with them on ``avmm up``'s path, which encodes nothing, and the
codec itself (its encoder and decoder) is imported when a snapshot, a restore or a
migration first needs it. :mod:`avmm.state.codec` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

__all__ = ["ANY_INT", "S64", "U8", "U16", "U32", "U64", "IntRange"]


@dataclass(frozen=True)
class IntRange:
    """The values an ``int`` field may take, for ``Annotated[int, IntRange(...)]``."""

    low: int
    high: int
    name: str

    def __contains__(self, value: int) -> bool:
        return self.low <= value <= self.high


U8 = Annotated[int, IntRange(0, 0xFF, "u8")]
U16 = Annotated[int, IntRange(0, 0xFFFF, "u16")]
U32 = Annotated[int, IntRange(0, 0xFFFF_FFFF, "u32")]
U64 = Annotated[int, IntRange(0, (1 << 64) - 1, "u64")]
S64 = Annotated[int, IntRange(-(1 << 63), (1 << 63) - 1, "s64")]
#: A plain ``int`` field: anything a u64 or an s64 holds.
ANY_INT = IntRange(-(1 << 63), (1 << 64) - 1, "a 64-bit integer")
