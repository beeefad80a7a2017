"""The management front door: ``avmm serve`` (a :class:`avmm.host.Host` behind a REST API
on a unix socket), its OpenAPI document, and a client.

``serve_api(host, path)`` serves an existing Host (embed it in your own trio service);
``run_daemon(path)`` is all of ``avmm serve``; :class:`ApiClient` talks to either.

The names are loaded on first use: ``avmm`` registers the ``serve``/``ps``/... commands
from :mod:`avmm.api.cli` at every start, and must not pay for hypercorn and httpx then.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._app import ManagementApi as ManagementApi
    from ._metrics import render_metrics as render_metrics
    from ._openapi import openapi_document as openapi_document
    from ._server import DaemonError as DaemonError
    from ._server import run_daemon as run_daemon
    from ._server import serve_api as serve_api
    from .client import ApiClient as ApiClient
    from .client import ApiError as ApiError
    from .client import DaemonUnreachableError as DaemonUnreachableError
    from .client import default_socket_path as default_socket_path

_EXPORTS = {
    "ManagementApi": "._app",
    "render_metrics": "._metrics",
    "openapi_document": "._openapi",
    "DaemonError": "._server",
    "run_daemon": "._server",
    "serve_api": "._server",
    "ApiClient": ".client",
    "ApiError": ".client",
    "DaemonUnreachableError": ".client",
    "default_socket_path": ".client",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
