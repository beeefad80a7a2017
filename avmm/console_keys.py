"""The console's escape sequence, shared by `avmm up` and `avmm console`.

Ctrl-A then x leaves the console (as in QEMU); Ctrl-A Ctrl-A sends one Ctrl-A; Ctrl-A
followed by anything else sends both bytes. The filter keeps its state between reads, so
a sequence split across two reads still counts.
"""

from __future__ import annotations

ESCAPE = 0x01  # Ctrl-A
LEAVE = ord("x")


class EscapeFilter:
    """Feed it what the terminal gave; it returns what the guest should get."""

    def __init__(self) -> None:
        self._pending = False

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """``(bytes for the guest, True if Ctrl-A x was typed)``. After Ctrl-A x the rest
        of ``data`` is dropped: the caller leaves the console."""
        out = bytearray()
        for byte in data:
            if self._pending:
                self._pending = False
                if byte == LEAVE:
                    return bytes(out), True
                if byte != ESCAPE:
                    out.append(ESCAPE)
                out.append(byte)
            elif byte == ESCAPE:
                self._pending = True
            else:
                out.append(byte)
        return bytes(out), False
