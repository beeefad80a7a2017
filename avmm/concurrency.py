"""Running a few tasks as one: the first failure cancels the rest and surfaces as itself.

trio wraps whatever a nursery's tasks raise in an ExceptionGroup. Where tasks are the
halves of one job (a queue's reader and writer, a migration's page reader and sender),
the caller wants the one real error, as itself: a ``MigrationError`` to report, a
``DeviceNeedsReset`` for the transport. The cancellations the failure caused in the
other tasks are not errors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from .errors import leaf_errors


async def run_together(*tasks: Callable[[], Awaitable[object]],
                       prefer: tuple[type[BaseException], ...] = ()) -> None:
    """Run ``tasks`` in one nursery. When one fails the others are cancelled, and its
    exception propagates as itself rather than inside an ExceptionGroup. If several
    failed, the first of a type in ``prefer`` is raised if there is one; otherwise the
    group, as trio raised it (nothing is lost)."""
    try:
        async with trio.open_nursery() as nursery:
            for task in tasks:
                nursery.start_soon(task)
    except BaseExceptionGroup as group:
        errors = [e for e in leaf_errors(group) if not isinstance(e, trio.Cancelled)]
        preferred = [e for e in errors if isinstance(e, prefer)]
        if preferred:
            raise preferred[0] from None
        if len(errors) == 1:
            raise errors[0] from None
        raise
