"""Where a migration stands: a frozen value the VM replaces as the migration goes on."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

#: "unconfirmed" (source only): COMMIT went out but the destination never said the
#: guest runs there; the VM stays paused here (see avmm.migration.source).
MigrationState = Literal["setup", "precopy", "stop-and-copy", "completed", "failed",
                         "incoming", "receiving", "unconfirmed"]


@dataclass(frozen=True)
class MigrationProgress:
    """One moment of a migration, on the source or the destination.

    ``round``: 0 while all of RAM is sent the first time, then one per pass over the
    pages dirtied since the previous one (the last is the stop-and-copy's).
    ``pages_sent``: 4 KiB pages sent (received, on the destination) so far, zero pages
    included; ``pages_dirty``: pages found dirty at the start of the current round;
    ``bytes_sent``: bytes of the stream so far; ``downtime_ms``: how long the guest was
    paused for the hand-over (source: from the pause to the destination's
    acknowledgement), once known; ``total_ms``: since the migration began.
    """

    state: MigrationState
    round: int = 0
    pages_sent: int = 0
    pages_dirty: int = 0
    bytes_sent: int = 0
    downtime_ms: float | None = None
    total_ms: float = 0.0
    #: ``unix:...`` or ``tcp:...``: where to (source) or where it listens (destination).
    address: str = ""
    #: Pages of guest RAM in all.
    pages_total: int = 0
    #: Bytes per second of the last round (the estimate that decides the hand-over).
    rate_bytes_s: float = 0.0
    #: Why it failed (one line), when ``state`` is "failed" or "unconfirmed".
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the API's ``"migration"`` object)."""
        return asdict(self)


class Steps:
    """Where the hand-over's time went (milliseconds per step, for the log): each
    :meth:`mark` closes the step that began at the previous mark (or at ``start``, a
    ``time.monotonic()``)."""

    def __init__(self, start: float | None = None) -> None:
        self._last = time.monotonic() if start is None else start
        self.ms: dict[str, float] = {}

    def mark(self, step: str) -> None:
        now = time.monotonic()
        self.ms[step] = round(self.ms.get(step, 0.0) + (now - self._last) * 1000, 1)
        self._last = now
