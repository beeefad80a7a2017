"""Re-exports imported on first use (PEP 562), so that importing a package does not
import every module its public names come from.

``avmm up`` pays for every module imported before the guest's first serial byte; a
package ``__init__`` that imports all of its modules makes ``import avmm.cli`` (or
``avmm --help``) import the VM, the state model and the snapshot writer. A package lists
its re-exports as data instead::

    __getattr__, __dir__ = lazy_exports(__name__, globals(), {"VirtualMachine": ".vm"})

and keeps the plain ``from .vm import VirtualMachine as VirtualMachine`` lines under
``if TYPE_CHECKING:`` for type checkers and readers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, namespace: dict[str, Any], exports: Mapping[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module ``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps a
    public name to the module (relative to ``package``) that defines it. The first
    access imports that module and stores the name in ``namespace`` (the package's
    globals), so later accesses are plain attribute lookups."""

    def __getattr__(name: str) -> Any:
        module_name = exports.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_name, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__


def import_structlog_without_rich() -> None:
    """Import structlog with ``rich`` hidden from it, unless something imported either
    already.

    structlog's ``__init__`` imports :mod:`structlog.dev` and :mod:`structlog.tracebacks`,
    which import rich (and through it pygments) whenever it is installed: about a sixth
    of ``avmm up``'s start-up. avmm has no use for it: :func:`avmm.logs.configure_logging`
    renders tracebacks to text with ``format_exc_info`` before the console renderer sees
    them (a filtered vCPU thread must not read source files, see
    :func:`avmm.logs.exceptions_without_source_on_filtered_threads`), so rich never
    drew one. A ``None`` in ``sys.modules`` makes ``import rich`` raise ImportError,
    which structlog takes as "not installed"; the entry is removed again right after, so
    a program that wants rich for itself can still import it."""
    import sys

    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog  # noqa: F401
    finally:
        if sys.modules.get("rich", ...) is None:
            del sys.modules["rich"]
