"""A client for the management API of ``avmm serve``, over its unix socket.

httpx does the HTTP (``AsyncHTTPTransport(uds=...)``); under trio it runs on httpcore's
trio backend, so this client lives happily inside a trio program::

    async with ApiClient("/run/avmm.sock") as api:
        vm = await api.create_vm(toml=Path("vm.toml").read_text(), base_dir="/srv/vms")
        async with api.console(vm["id"]) as output:
            async for chunk in output:
                ...

Every error response becomes an :class:`ApiError` carrying the status, the daemon's
message and its structured ``detail``; a daemon that is not there is a
:class:`DaemonUnreachableError` that says how to start one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from ..errors import AvmmError

__all__ = ["ApiClient", "ApiError", "DaemonUnreachableError", "default_socket_path"]

# The host part of the URL is ignored over a unix socket; it only fills the Host header.
_BASE_URL = "http://avmm"
_TIMEOUT = httpx.Timeout(60.0, connect=5.0)  # stop waits for the VM to stop


def default_socket_path() -> Path:
    """``$AVMM_SOCKET``, else ``$XDG_RUNTIME_DIR/avmm.sock``, else ``/run/avmm.sock``."""
    explicit = os.environ.get("AVMM_SOCKET")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "avmm.sock"
    return Path("/run/avmm.sock")


class ApiError(AvmmError):
    """The daemon answered with an error status."""

    def __init__(self, status: int, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail


class DaemonUnreachableError(AvmmError):
    """Nothing answers on the socket."""


class ApiClient:
    """One connection pool to one daemon; use as an async context manager."""

    def __init__(self, socket_path: str | os.PathLike[str]) -> None:
        self.socket_path = Path(socket_path)
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=os.fspath(socket_path)),
            base_url=_BASE_URL, timeout=_TIMEOUT)

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- VMs -------------------------------------------------------------------------------

    async def list_vms(self) -> list[dict[str, Any]]:
        vms: list[dict[str, Any]] = (await self._request("GET", "/vms")).json()["vms"]
        return vms

    async def create_vm(self, config: Mapping[str, Any] | None = None, *,
                        toml: str | bytes | None = None,
                        base_dir: str | os.PathLike[str] | None = None,
                        start: bool = True) -> dict[str, Any]:
        """Create and start a VM from ``config`` (a dict with the vm.toml schema) or
        ``toml`` (the text of a vm.toml). Relative paths in it are resolved against
        ``base_dir`` (absolute), which is what ``avmm run vm.toml`` passes. With
        ``start=False`` the VM is left paused before its first instruction."""
        if (config is None) == (toml is None):
            raise ValueError("pass exactly one of config and toml")
        params: dict[str, str] = {}
        if base_dir is not None:
            params["base_dir"] = os.fspath(base_dir)
        if not start:
            params["start"] = "false"
        if toml is not None:
            body = toml.encode() if isinstance(toml, str) else toml
            response = await self._request("POST", "/vms", content=body, params=params,
                                           headers={"content-type": "application/toml"})
        else:
            response = await self._request("POST", "/vms", params=params,
                                           content=json.dumps(config).encode(),
                                           headers={"content-type": "application/json"})
        created: dict[str, Any] = response.json()
        return created

    async def restore_vm(self, path: str | os.PathLike[str], *, start: bool = True,
                         copy_memory: bool = False,
                         vhost_user: Mapping[str, str | os.PathLike[str]] | None = None,
                         ) -> dict[str, Any]:
        """A new VM from the snapshot directory ``path`` (absolute, on the daemon's
        machine), running on from the snapshot, or paused with ``start=False``.
        ``vhost_user`` maps a vhost-user device's name to its back-end's socket now."""
        body: dict[str, Any] = {"restore": os.fspath(path)}
        if not start:
            body["start"] = False
        if copy_memory:
            body["copy_memory"] = True
        if vhost_user:
            body["vhost_user"] = {name: os.fspath(socket)
                                  for name, socket in vhost_user.items()}
        response = await self._request("POST", "/vms", content=json.dumps(body).encode(),
                                       headers={"content-type": "application/json"})
        restored: dict[str, Any] = response.json()
        return restored

    async def snapshot(self, vm_id: str, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Write the paused VM to the new directory ``path`` (absolute, on the daemon's
        machine): ``{"path", "bytes_state", "bytes_memory", "duration_ms"}``."""
        body = json.dumps({"path": os.fspath(path)}).encode()
        response = await self._request(
            "POST", f"/vms/{_segment(vm_id)}/snapshot", content=body,
            headers={"content-type": "application/json"},
            # Writing a large guest's memory may take a while.
            timeout=httpx.Timeout(None, connect=5.0))
        info: dict[str, Any] = response.json()
        return info

    async def receive_vm(self, listen: str, *, config: Mapping[str, Any] | None = None,
                         base_dir: str | os.PathLike[str] | None = None,
                         start: bool = True, accept_timeout_s: float | None = None,
                         ) -> dict[str, Any]:
        """A new VM that listens at ``listen`` (``unix:/abs/path`` or ``tcp:HOST:PORT``)
        for one live-migration stream; answered at once, in state ``incoming``.
        ``config`` (a dict with the vm.toml schema; relative paths against
        ``base_dir``) replaces the config the stream carries. With
        ``accept_timeout_s``, the VM ends (failed) if no source connects by then."""
        body: dict[str, Any] = {"listen": listen}
        if accept_timeout_s is not None:
            body["accept_timeout_s"] = accept_timeout_s
        if config is not None:
            body["config"] = dict(config)
        if not start:
            body["start"] = False
        params = {"base_dir": os.fspath(base_dir)} if base_dir is not None else {}
        response = await self._request("POST", "/vms/incoming", params=params,
                                       content=json.dumps(body).encode(),
                                       headers={"content-type": "application/json"})
        created: dict[str, Any] = response.json()
        return created

    async def migrate(self, vm_id: str, to: str, *, downtime_ms: int | None = None
                      ) -> dict[str, Any]:
        """Begin to live-migrate the running VM to ``to``; returns at once (the VM, with
        ``migration``): follow it with :meth:`get_vm`."""
        body: dict[str, Any] = {"to": to}
        if downtime_ms is not None:
            body["downtime_ms"] = downtime_ms
        response = await self._request("POST", f"/vms/{_segment(vm_id)}/migrate",
                                       content=json.dumps(body).encode(),
                                       headers={"content-type": "application/json"})
        vm: dict[str, Any] = response.json()
        return vm

    async def get_vm(self, vm_id: str) -> dict[str, Any]:
        vm: dict[str, Any] = (await self._request("GET", f"/vms/{_segment(vm_id)}")).json()
        return vm

    async def delete_vm(self, vm_id: str) -> None:
        """Stop the VM and forget it; no error if it is unknown."""
        await self._request("DELETE", f"/vms/{_segment(vm_id)}")

    async def update_limits(self, vm_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """PATCH /vms/{id}: change the VM's rate limits (``{"disks": [{"index": 0,
        "rate_limit": {...}}], "nets": [...], "rate_limit_groups": {...}}``); returns
        the VM, its ``rate_limits`` as now in effect."""
        vm: dict[str, Any] = (await self._request(
            "PATCH", f"/vms/{_segment(vm_id)}", json=dict(changes))).json()
        return vm

    async def pause(self, vm_id: str) -> dict[str, Any]:
        return await self._action(vm_id, "pause")

    async def resume(self, vm_id: str) -> dict[str, Any]:
        return await self._action(vm_id, "resume")

    async def stop(self, vm_id: str) -> dict[str, Any]:
        return await self._action(vm_id, "stop")

    # -- console ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def console(self, vm_id: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """The VM's serial output: the backlog, then live chunks until the VM stops.
        Leaving the block detaches (the VM keeps running)."""
        request = self._http.build_request("GET", f"/vms/{_segment(vm_id)}/console",
                                           timeout=httpx.Timeout(None, connect=5.0))
        response = await self._send(request, stream=True)
        if response.is_error:
            await response.aread()
            await response.aclose()
            _raise_for(response)
        chunks = response.aiter_raw()
        try:
            yield chunks
        finally:
            # Closing the connection detaches. httpx and httpcore read the body through a
            # chain of async generators, which a detach would leave suspended, and trio
            # warns about every one collected unexhausted (encode/httpx#3686). So run the
            # chain on to its end: with the connection closed, it ends in a read error.
            await response.aclose()
            with contextlib.suppress(httpx.HTTPError, httpx.StreamError):
                async for _ in chunks:
                    pass

    async def send_console(self, vm_id: str, data: bytes) -> None:
        """Bytes to the guest's serial input."""
        await self._request("POST", f"/vms/{_segment(vm_id)}/console", content=data,
                            headers={"content-type": "application/octet-stream"})

    # -- the daemon ------------------------------------------------------------------------

    async def metrics(self) -> str:
        return (await self._request("GET", "/metrics")).text

    async def openapi(self) -> dict[str, Any]:
        document: dict[str, Any] = (await self._request("GET", "/openapi.json")).json()
        return document

    # -- plumbing ----------------------------------------------------------------------------

    async def _action(self, vm_id: str, action: str) -> dict[str, Any]:
        vm: dict[str, Any] = (await self._request(
            "POST", f"/vms/{_segment(vm_id)}/{action}")).json()
        return vm

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response = await self._send(self._http.build_request(method, url, **kwargs))
        if response.is_error:
            _raise_for(response)
        return response

    async def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        try:
            return await self._http.send(request, stream=stream)
        except httpx.ConnectError as e:
            raise DaemonUnreachableError(
                f"no avmm daemon answers on {self.socket_path} ({e}); start one with "
                f"`avmm serve --socket {self.socket_path}`, or name its socket with --socket "
                "or AVMM_SOCKET") from e
        except httpx.HTTPError as e:
            raise DaemonUnreachableError(
                f"the avmm daemon on {self.socket_path} did not answer properly: {e}") from e


def _segment(vm_id: str) -> str:
    """``vm_id`` as one URL path segment (an id never contains '/', but a typo might)."""
    return quote(vm_id, safe="")


def _raise_for(response: httpx.Response) -> None:
    try:
        body = response.json()
        message = str(body["error"])
        detail = body.get("detail")
    except (ValueError, KeyError, TypeError):
        message = response.text.strip() or response.reason_phrase
        detail = None
    raise ApiError(response.status_code, message, detail)
