"""The management API as a plain ASGI application over a :class:`avmm.host.Host`.

HTTP itself (parsing, chunking, keep-alive) is hypercorn's; this module only routes
``(method, path)`` to a handler and turns results and errors into responses. It is a
bare ASGI callable rather than a framework app so that the console stream can watch for
the client's disconnect in a trio nursery of its own (the VM keeps running when a
viewer leaves, and a silent guest must not pin a subscription forever).

Status codes: 400 malformed body or bad config or limits (``detail.key`` names the key; also a
WebSocket upgrade, which this API does not speak, and a snapshot that cannot be
restored), 403 a path outside the daemon's ``--allow-path`` directories (``detail.key``),
404 unknown VM or route, 405 method not
allowed (``Allow`` header), 409 wrong state, 413 body too large, 415 unsupported
Content-Type, 422 valid config but the VM could not be built (``detail.step``), 503
shutting down, 500 an avmm bug (logged with a traceback).

Nothing here blocks the event loop: config validation (which looks at the files the
config names) and the VM's build run in worker threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import tomllib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs

import structlog
import trio

from ..cgroups import CgroupError
from ..config import (
    CONFIG_FILE_MAX_BYTES,
    GROUP_NAME_PATTERN,
    SerialConfig,
    VmConfig,
    config_from_dict,
    parse_rate_limit,
)
from ..errors import (
    AvmmError,
    ConfigError,
    PathNotAllowedError,
    StateError,
    UnknownVmError,
    VmStartError,
    VmStateError,
)
from ..migration.errors import MigrationError
from ..paths import PathPolicy
from ..ratelimit import LimitTargetError, SharedGroups
from ._errors import HttpError
from ._errors import absolute_path as _absolute_path
from ._limits import LIMITS_BODY_MAX, parse_limits_update
from ._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ._metrics import render_metrics
from ._migration import parse_incoming, parse_migrate
from ._openapi import openapi_document

log = structlog.get_logger(__name__)

__all__ = ["CONFIG_BODY_MAX", "CONSOLE_INPUT_MAX", "SNAPSHOT_BODY_MAX", "ManagementApi"]

#: The largest config body accepted; a vm.toml is a few hundred bytes.
CONFIG_BODY_MAX: Final = CONFIG_FILE_MAX_BYTES
#: The largest body of POST /vms/{id}/snapshot: one path.
SNAPSHOT_BODY_MAX: Final = 16 << 10
#: The largest body of POST /vms/{id}/migrate: an address and a number.
MIGRATE_BODY_MAX: Final = 16 << 10
#: The keys of a restore request (POST /vms with "restore"): no VM config with them.
RESTORE_KEYS: Final = ("restore", "start", "copy_memory", "vhost_user")
#: The most vhost-user sockets one restore request may replace.
RESTORE_SOCKETS_MAX: Final = 64
_DEVICE_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_GROUP_NAME: Final = re.compile(GROUP_NAME_PATTERN)


def _group_name(request: _Request) -> str:
    """The ``{name}`` of a /rate_limit_groups/{name} request that changes a group: 400
    unless it is a group name at all."""
    name: str = request.params["name"]
    if not _GROUP_NAME.fullmatch(name):
        raise HttpError(400, "a group name has 1 to 64 characters from A-Z a-z 0-9 _ -",
                        {"key": "name"})
    return name
#: The most console input accepted in one request (the UART takes it a byte at a time).
CONSOLE_INPUT_MAX: Final = 64 << 10
_DRAIN_FACTOR: Final = 16

_Scope = dict[str, Any]
_Receive = Callable[[], Awaitable[dict[str, Any]]]
_Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class _Request:
    scope: _Scope
    receive: _Receive
    params: dict[str, str] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.scope["method"])

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        for key, value in self.scope.get("headers", ()):
            if key.lower() == wanted:
                return bytes(value).decode("latin-1")
        return None

    def query(self, name: str) -> str | None:
        values = parse_qs(bytes(self.scope.get("query_string", b"")).decode("latin-1"),
                          keep_blank_values=True).get(name)
        return values[-1] if values else None

    async def body(self, limit: int) -> bytes:
        """The whole body; 413 as soon as it grows past ``limit``."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise HttpError(400, "the client went away before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > limit:
                # Read (and drop) a moderate excess first: a client still busy sending
                # would otherwise see a reset instead of the 413.
                while more and size <= _DRAIN_FACTOR * limit:
                    message = await self.receive()
                    size += len(message.get("body", b""))
                    more = message.get("more_body", False)
                raise HttpError(413, f"request body larger than {limit} bytes",
                                {"limit": limit})
            chunks.append(chunk)
            if not more:
                return b"".join(chunks)


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    #: A streamed body: chunks from this iterator until it ends or the client leaves.
    stream: Callable[[], AsyncGenerator[bytes, None]] | None = None

    def _raw_headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(name.lower().encode("latin-1"), value.encode("latin-1"))
                   for name, value in self.headers]
        if self.content_type is not None:
            headers.append((b"content-type", self.content_type.encode("latin-1")))
        if self.stream is None:
            headers.append((b"content-length", str(len(self.body)).encode("ascii")))
        return headers

    async def send(self, send: _Send, receive: _Receive) -> None:
        await send({"type": "http.response.start", "status": self.status,
                    "headers": self._raw_headers()})
        if self.stream is None:
            await send({"type": "http.response.body", "body": self.body})
            return
        stream = self.stream

        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            try:
                # aclosing: a client that hangs up cancels us mid-iteration, and the
                # generator (with the console subscription it holds) must be closed
                # here, not whenever the garbage collector finds it.
                async with contextlib.aclosing(stream()) as chunks:
                    async for chunk in chunks:
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            except OSError:
                pass  # the client went away mid-send (ASGI 2.4 servers raise OSError)
            nursery.cancel_scope.cancel()


def _json_response(status: int, value: Any, headers: tuple[tuple[str, str], ...] = ()
                   ) -> _Response:
    return _Response(status, json.dumps(value).encode(), "application/json", headers)


def _error_response(error: HttpError) -> _Response:
    return _json_response(error.status, {"error": error.message, "detail": error.detail},
                          error.headers)


_Handler = Callable[["ManagementApi", _Request], Awaitable[_Response]]


def _route(pattern: str) -> re.Pattern[str]:
    # "{id}" is one path segment.
    return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")


class ManagementApi:
    """The ASGI application. ``host`` is an entered :class:`avmm.host.Host`;
    ``draining`` is set when the daemon begins to shut down (creating VMs is then 503);
    ``paths`` is where the files of a posted config may be (``avmm serve
    --allow-path``; default anywhere): a path outside is a 403 naming its key."""

    def __init__(self, host: Any, *, draining: trio.Event | None = None,
                 paths: PathPolicy | None = None) -> None:
        self.host = host
        self.draining = draining if draining is not None else trio.Event()
        self.paths = paths if paths is not None else PathPolicy()
        self._document = json.dumps(openapi_document()).encode()

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            await _refuse_websocket(scope, send)
            return
        if scope["type"] != "http":
            return
        request = _Request(scope, receive)
        try:
            response = await self._dispatch(request)
        except HttpError as e:
            response = _error_response(e)
        except Exception as e:
            log.exception("management API request failed", method=request.method,
                          path=scope.get("path"))
            response = _error_response(HttpError(
                500, f"internal error in avmm: {type(e).__name__}: {e}",
                {"type": type(e).__name__}))
        await response.send(send, receive)

    async def _dispatch(self, request: _Request) -> _Response:
        path = str(request.scope.get("path", ""))
        for pattern, methods in _ROUTES:
            match = pattern.match(path)
            if match is None:
                continue
            handler = methods.get(request.method)
            if handler is None:
                allow = ", ".join(sorted(methods))
                raise HttpError(405, f"{request.method} is not allowed on {path}; "
                                f"use {allow}", {"allow": sorted(methods)}, (("Allow", allow),))
            request.params = match.groupdict()
            try:
                return await handler(self, request)
            except AvmmError as e:
                raise _http_error(e) from e
        raise HttpError(404, f"no such endpoint: {path} (GET /openapi.json lists them)")

    # -- handlers ----------------------------------------------------------------------

    async def _openapi(self, request: _Request) -> _Response:
        return _Response(200, self._document, "application/json")

    async def _list(self, request: _Request) -> _Response:
        vms = self.host.list()
        await _refresh(vms)
        return _json_response(200, {"vms": [vm.to_dict() for vm in vms]})

    async def _create(self, request: _Request) -> _Response:
        if self.draining.is_set():
            raise HttpError(503, "the daemon is shutting down; no new VMs")
        media_type = (request.header("content-type") or "").split(";")[0].strip().lower()
        if media_type not in ("application/json", "application/toml"):
            raise HttpError(415, "send the config as Content-Type: application/json or "
                            f"application/toml (got {media_type or 'none'})",
                            {"content_type": media_type or None})
        base_dir = request.query("base_dir")
        if base_dir is not None and not os.path.isabs(base_dir):
            raise HttpError(400, f"base_dir must be an absolute directory, got {base_dir!r}",
                            {"key": "base_dir"})
        start = request.query("start")
        if start not in (None, "true", "false"):
            raise HttpError(400, f"start must be true or false, got {start!r}",
                            {"key": "start"})
        data = _parse_config_body(await request.body(CONFIG_BODY_MAX), media_type)
        if "restore" in data:
            if base_dir is not None:
                raise HttpError(400, "base_dir applies to a VM config, not to a restore "
                                "(the restore path is absolute)", {"key": "base_dir"})
            return await self._restore(data, default_start=start != "false")
        # Validation looks at the files the config names (stat, and openat2 under
        # --allow-path): a worker thread, as for the build.
        config = await trio.to_thread.run_sync(functools.partial(
            config_from_dict, data, base_dir=Path(base_dir) if base_dir else None,
            source="request body",
            path_check=self.paths.check if self.paths.restricted else None,
            shared_groups=self._groups().names()))
        vm = await self.host.create(daemon_config(config), start=start != "false",
                                    paths=self.paths)
        return _json_response(201, vm.to_dict(), (("Location", f"/vms/{vm.id}"),))

    async def _restore(self, data: dict[str, Any], *, default_start: bool) -> _Response:
        """POST /vms with ``{"restore": "/abs/dir", ...}``: a new VM from a snapshot."""
        extra = [key for key in data if key not in RESTORE_KEYS]
        if extra:
            raise HttpError(400, f"a restore takes no VM config (it comes from the "
                            f"snapshot): remove {extra[0]!r}, or send a config without "
                            "'restore'", {"key": extra[0]})
        path = _absolute_path(data["restore"], "restore")
        start = _boolean(data, "start", default_start)
        copy_memory = _boolean(data, "copy_memory", False)
        sockets = _vhost_user_sockets(data.get("vhost_user"))
        vm = await self.host.restore(path, start=start, copy_memory=copy_memory,
                                     vhost_user=sockets, paths=self.paths,
                                     adjust_config=daemon_config)
        return _json_response(201, vm.to_dict(), (("Location", f"/vms/{vm.id}"),))

    async def _snapshot(self, request: _Request) -> _Response:
        vm = self.host.get(request.params["id"])
        media_type = (request.header("content-type") or "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise HttpError(415, "send the snapshot request as Content-Type: "
                            f"application/json (got {media_type or 'none'})",
                            {"content_type": media_type or None})
        data = _parse_config_body(await request.body(SNAPSHOT_BODY_MAX), media_type,
                                  what="the snapshot request")
        extra = [key for key in data if key != "path"]
        if extra:
            raise HttpError(400, f"unknown key {extra[0]!r} in the snapshot request; it "
                            'takes only "path"', {"key": extra[0]})
        if "path" not in data:
            raise HttpError(400, 'the snapshot request needs "path": the absolute path of '
                            "a new directory", {"key": "path"})
        path = _absolute_path(data["path"], "path")
        info = await vm.snapshot(path, paths=self.paths)
        return _json_response(201, {
            "path": str(info.path),
            "bytes_state": info.bytes_state,
            "bytes_memory": info.bytes_memory,
            "duration_ms": round(info.duration_s * 1000, 3),
        })

    async def _incoming(self, request: _Request) -> _Response:
        """POST /vms/incoming: a new VM that listens for one migration stream."""
        if self.draining.is_set():
            raise HttpError(503, "the daemon is shutting down; no new VMs")
        _require_json(request, "the incoming request")
        base_dir = request.query("base_dir")
        if base_dir is not None and not os.path.isabs(base_dir):
            raise HttpError(400, f"base_dir must be an absolute directory, got {base_dir!r}",
                            {"key": "base_dir"})
        data = _parse_config_body(await request.body(CONFIG_BODY_MAX), "application/json",
                                  what="the incoming request")
        incoming = parse_incoming(data)
        config: VmConfig | None = None
        if incoming.config is not None:
            try:
                config = await trio.to_thread.run_sync(functools.partial(
                    config_from_dict, incoming.config,
                    base_dir=Path(base_dir) if base_dir else None,
                    source="request body (config)",
                    path_check=self.paths.check if self.paths.restricted else None))
            except ConfigError as e:
                # The key as the request has it: under "config".
                e.key = f"config.{e.key}" if e.key else "config"
                raise
            config = daemon_config(config)
        elif base_dir is not None:
            raise HttpError(400, "base_dir applies to a config; this request has none",
                            {"key": "base_dir"})
        try:
            vm = await self.host.receive(incoming.listen, config=config,
                                         start=incoming.start, paths=self.paths,
                                         accept_timeout_s=incoming.accept_timeout_s)
        except MigrationError as e:
            # It cannot listen there (the address is in use, the path is taken).
            raise HttpError(400, str(e), {"key": "listen"}) from e
        return _json_response(201, vm.to_dict(), (("Location", f"/vms/{vm.id}"),))

    async def _migrate(self, request: _Request) -> _Response:
        """POST /vms/{id}/migrate: begin a live migration; its progress is in GET."""
        vm = self.host.get(request.params["id"])
        if self.draining.is_set():
            raise HttpError(503, "the daemon is shutting down; its VMs are being stopped")
        _require_json(request, "the migrate request")
        data = _parse_config_body(await request.body(MIGRATE_BODY_MAX), "application/json",
                                  what="the migrate request")
        migrate = parse_migrate(data)
        await vm.start_migration(migrate.to, downtime_ms=migrate.downtime_ms,
                                 paths=self.paths)
        return _json_response(202, vm.to_dict(), (("Location", f"/vms/{vm.id}"),))

    async def _get(self, request: _Request) -> _Response:
        hosted = self.host.get(request.params["id"])
        await hosted.refresh()
        data = hosted.to_dict()
        usage = await hosted.cpu_usage()  # cgroup files: read in a worker thread
        if data["cpu"] is not None and usage is not None:
            data["cpu"].update(cpu_seconds=usage.cpu_seconds,
                               throttled_seconds=usage.throttled_seconds)
        return _json_response(200, data)

    async def _patch(self, request: _Request) -> _Response:
        """PATCH /vms/{id}: change the VM's rate limits (see avmm.api._limits)."""
        vm = self.host.get(request.params["id"])
        _require_json(request, "the limits")
        data = _parse_config_body(await request.body(LIMITS_BODY_MAX), "application/json",
                                  what="the limits")
        await vm.update_limits(parse_limits_update(data))
        return _json_response(200, vm.to_dict())

    def _groups(self) -> SharedGroups:
        groups: SharedGroups = self.host.rate_limit_groups
        return groups

    async def _list_groups(self, request: _Request) -> _Response:
        return _json_response(200, {"rate_limit_groups": self._groups().list()})

    async def _get_group(self, request: _Request) -> _Response:
        name = request.params["name"]
        groups = self._groups()
        if name not in groups:
            raise HttpError(404, f"no rate limit group {name[:64]!r} (PUT "
                            "/rate_limit_groups/NAME creates one)")
        return _json_response(200, groups.to_dict(name))

    async def _put_group(self, request: _Request) -> _Response:
        """PUT /rate_limit_groups/{name}: create a daemon-wide group or change its
        buckets in place (every VM using it sees the change)."""
        name = _group_name(request)
        _require_json(request, "the group's buckets")
        data = _parse_config_body(await request.body(LIMITS_BODY_MAX), "application/json",
                                  what="the group's buckets")
        limit = parse_rate_limit(data, "", source="request body")
        if limit is None:
            raise HttpError(400, "a group needs a bandwidth or an ops bucket",
                            {"key": "bandwidth"})
        groups = self._groups()
        limiter = groups.get(name)
        if limiter is None or not groups.across_processes:
            limiter, created = groups.put(name, limit)
        else:
            # In shared memory (--isolation process): the change may wait for a worker
            # that holds the group's lock (bounded), in a thread. The workers see it at
            # their next request.
            await trio.to_thread.run_sync(limiter.reconfigure, limit)
            created = False
        return _json_response(201 if created else 200, groups.to_dict(name, limiter),
                              (("Location", f"/rate_limit_groups/{name}"),))

    async def _delete_group(self, request: _Request) -> _Response:
        self._groups().remove(_group_name(request))
        return _Response(204)

    async def _delete(self, request: _Request) -> _Response:
        await self.host.remove(request.params["id"])
        return _Response(204)

    async def _pause(self, request: _Request) -> _Response:
        vm = self.host.get(request.params["id"])
        await vm.pause()
        return _json_response(200, vm.to_dict())

    async def _resume(self, request: _Request) -> _Response:
        vm = self.host.get(request.params["id"])
        await vm.resume()
        return _json_response(200, vm.to_dict())

    async def _stop(self, request: _Request) -> _Response:
        vm = self.host.get(request.params["id"])
        await vm.stop()
        return _json_response(200, vm.to_dict())

    async def _console_output(self, request: _Request) -> _Response:
        vm = self.host.get(request.params["id"])
        # Subscribe now, not when the stream starts, so that no output falls between the
        # backlog and the live chunks.
        subscription = vm.subscribe_console()

        async def stream() -> AsyncGenerator[bytes, None]:
            async with subscription:
                async for chunk in subscription:
                    yield chunk

        return _Response(200, content_type="application/octet-stream",
                         headers=(("Cache-Control", "no-store"),), stream=stream)

    async def _console_input(self, request: _Request) -> _Response:
        vm = self.host.get(request.params["id"])
        data = await request.body(CONSOLE_INPUT_MAX)
        try:
            await vm.send_console(data)
        except (trio.ClosedResourceError, trio.BrokenResourceError) as e:
            raise HttpError(409, f"VM {vm.id} has stopped; its console takes no input",
                            {"state": str(vm.state)}) from e
        return _Response(204)

    async def _metrics(self, request: _Request) -> _Response:
        vms = self.host.list()
        await _refresh(vms)
        usage = {vm.id: used for vm in vms if (used := await vm.cpu_usage()) is not None}
        return _Response(200, render_metrics(vms, cpu_usage=usage).encode(),
                         METRICS_CONTENT_TYPE)


_ROUTES: Final[tuple[tuple[re.Pattern[str], dict[str, _Handler]], ...]] = (
    (_route("/openapi.json"), {"GET": ManagementApi._openapi}),
    (_route("/vms"), {"GET": ManagementApi._list, "POST": ManagementApi._create}),
    # Before /vms/{id}: "incoming" is no VM id (ids are vm-xxxxxx).
    (_route("/vms/incoming"), {"POST": ManagementApi._incoming}),
    (_route("/vms/{id}"), {"GET": ManagementApi._get, "PATCH": ManagementApi._patch,
                           "DELETE": ManagementApi._delete}),
    (_route("/vms/{id}/pause"), {"POST": ManagementApi._pause}),
    (_route("/vms/{id}/resume"), {"POST": ManagementApi._resume}),
    (_route("/vms/{id}/stop"), {"POST": ManagementApi._stop}),
    (_route("/vms/{id}/snapshot"), {"POST": ManagementApi._snapshot}),
    (_route("/vms/{id}/migrate"), {"POST": ManagementApi._migrate}),
    (_route("/vms/{id}/console"), {"GET": ManagementApi._console_output,
                                   "POST": ManagementApi._console_input}),
    (_route("/metrics"), {"GET": ManagementApi._metrics}),
    (_route("/rate_limit_groups"), {"GET": ManagementApi._list_groups}),
    (_route("/rate_limit_groups/{name}"), {"GET": ManagementApi._get_group,
                                           "PUT": ManagementApi._put_group,
                                           "DELETE": ManagementApi._delete_group}),
)


def _parse_config_body(body: bytes, media_type: str, *, what: str = "the config"
                       ) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HttpError(400, f"the body is not valid UTF-8 (byte {e.start})") from e
    kind = "TOML" if media_type == "application/toml" else "JSON"
    try:
        data = tomllib.loads(text) if kind == "TOML" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise HttpError(400, f"the body is not valid {kind}: {' '.join(str(e).split())}"
                        ) from e
    except RecursionError:
        raise HttpError(400, f"the body is not valid {kind} for avmm: arrays or tables "
                        "nested too deeply", {"key": None}) from None
    except ValueError as e:
        # int() refuses numbers of more than sys.get_int_max_str_digits() (4300) digits.
        raise HttpError(400, f"the body is not valid {kind} for avmm: "
                        f"{' '.join(str(e).split())[:120]}", {"key": None}) from None
    if kind == "TOML":
        return data
    if not isinstance(data, dict):
        raise HttpError(400, f"{what} must be a JSON object, got {type(data).__name__}",
                        {"key": None})
    return data


def _require_json(request: _Request, what: str) -> None:
    media_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise HttpError(415, f"send {what} as Content-Type: application/json (got "
                        f"{media_type or 'none'})", {"content_type": media_type or None})


def _boolean(data: dict[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise HttpError(400, f"{key} must be true or false, got {type(value).__name__}",
                        {"key": key})
    return value


def _vhost_user_sockets(value: Any) -> dict[str, str] | None:
    """The ``vhost_user`` of a restore request: device name → new back-end socket."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise HttpError(400, "vhost_user must be an object mapping a device name to the "
                        f"absolute path of its back-end's socket, got {type(value).__name__}",
                        {"key": "vhost_user"})
    if len(value) > RESTORE_SOCKETS_MAX:
        raise HttpError(400, f"vhost_user names {len(value)} devices; at most "
                        f"{RESTORE_SOCKETS_MAX}", {"key": "vhost_user"})
    sockets: dict[str, str] = {}
    for name, path in value.items():
        if not _DEVICE_NAME.fullmatch(name):
            raise HttpError(400, f"vhost_user: {name[:80]!r} is not a device name (such as "
                            '"blk0")', {"key": "vhost_user"})
        sockets[name] = _absolute_path(path, f"vhost_user.{name}")
    return sockets


def daemon_config(config: VmConfig) -> VmConfig:
    """A daemon has no terminal of its own: ``serial.mode = "console"`` (the default)
    means the API's console stream (which every VM has anyway), and a virtio console on
    the terminal cannot be had."""
    if config.console is not None and config.console.mode == "console":
        raise ConfigError('mode = "console" needs a terminal and the daemon has none; use '
                          'mode = "socket" or "file" (the serial port is on '
                          "GET /vms/{id}/console)", path=config.source, key="console.mode")
    if config.serial.mode == "console":
        return dataclasses.replace(config, serial=SerialConfig(mode="none"))
    return config


async def _refresh(vms: list[Any]) -> None:
    """Each VM's status as it is now (a VM in a worker process asks it, all at once: a
    worker that does not answer delays the answer by its own timeout only)."""
    async with trio.open_nursery() as nursery:
        for vm in vms:
            nursery.start_soon(vm.refresh)


def _http_error(error: AvmmError) -> HttpError:
    if isinstance(error, VmStartError) and isinstance(error.error, StateError):
        # A snapshot that cannot be restored: bad input, with its one line.
        return HttpError(400, str(error), {"step": error.step,
                                           "type": type(error.error).__name__})
    if isinstance(error, StateError):
        # SnapshotError, StateCompatibilityError, DeviceStateError: one line.
        return HttpError(400, str(error), {"type": type(error).__name__})
    if isinstance(error, PathNotAllowedError):
        return HttpError(403, str(error), {"key": error.key, "reason": error.reason})
    if isinstance(error, VmStartError) and isinstance(error.error, PathNotAllowedError):
        return HttpError(403, str(error), {"key": error.error.key, "step": error.step})
    if isinstance(error, ConfigError):
        return HttpError(400, str(error), {"key": error.key, "reason": error.reason})
    if isinstance(error, UnknownVmError):
        return HttpError(404, str(error))
    if isinstance(error, LimitTargetError):
        return HttpError(error.status, str(error), {"key": error.key})
    if isinstance(error, CgroupError):
        # The host cannot apply CPU controls (no cgroup cpu controller, no delegation).
        return HttpError(409, str(error), {"key": "machine"})
    if isinstance(error, VmStateError | MigrationError):
        # MigrationError here: a VM whose devices cannot be migrated (refused up front).
        return HttpError(409, str(error))
    if isinstance(error, VmStartError):
        return HttpError(422, str(error), {"step": error.step})
    return HttpError(500, f"{type(error).__name__}: {error}", {"type": type(error).__name__})


async def _refuse_websocket(scope: _Scope, send: _Send) -> None:
    """A WebSocket upgrade: this API has no WebSocket endpoint. Answer 400 with the usual
    JSON error (ASGI's websocket.http.response extension), else close the handshake
    (the server then answers 403)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = json.dumps({
            "error": "this API speaks plain HTTP/1.1, not WebSocket; send the request "
                     "without 'Upgrade: websocket'",
            "detail": {"upgrade": "websocket"},
        }).encode()
        await send({"type": "websocket.http.response.start", "status": 400, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii"))]})
        await send({"type": "websocket.http.response.body", "body": body})
    else:  # pragma: no cover - hypercorn offers the extension
        await send({"type": "websocket.close", "code": 1003})


async def _lifespan(receive: _Receive, send: _Send) -> None:
    # Nothing to set up: the Host is entered (and left) by whoever made this app.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
