"""The one error a migration raises."""

from __future__ import annotations

from ..errors import AvmmError


class MigrationError(AvmmError):
    """A migration could not be done, or failed half-way; on the source the VM runs on
    as before. The message is one line saying what went wrong and where."""


class HandOverUnconfirmed(MigrationError):
    """COMMIT went out but the destination never said the guest runs there: the source
    VM is left paused (never resumed by itself: the guest may run there), for the
    operator to resume once the destination is known not to run it."""
