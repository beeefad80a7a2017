"""The served OpenAPI document against the server: schemathesis generates requests from
``GET /openapi.json`` (schema-valid and schema-violating ones), they go over the unix
socket, and every answer must be a non-5xx response that the document describes (status,
content type, headers, body schema).

The daemon runs in a thread of its own with its own trio loop, because schemathesis
drives hypothesis synchronously; requests go through a synchronous httpx client (no
asyncio anywhere). Its Host is the fake one with a few VMs in it, so that generated
requests reach existing VMs as well as unknown ones.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from avmm.api import serve_api
from avmm.config import config_from_dict

from .fake_host import FakeHost

schemathesis.serializer.alias("application/toml", "text/plain")

_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
           response_headers_conformance, response_schema_conformance,
           negative_data_rejection]


class _DaemonThread:
    """serve_api(FakeHost) on ``path`` in a thread; ``close()`` stops it."""

    def __init__(self, path: Path, kernel: Path) -> None:
        self.path = path
        self.host = FakeHost()
        self._kernel = kernel
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._shutdown: trio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="avmm-api-daemon")
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._shutdown = trio.Event()
        config = config_from_dict({"boot": {"kernel": str(self._kernel)}}, base_dir=None)
        for _ in range(3):
            await self.host.create(config)
        paused = await self.host.create(config)
        await paused.pause()
        await (await self.host.create(config)).stop()
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_api(
                self.host, self.path, shutdown=self._shutdown, task_status=task_status))
            self._ready.set()

    def close(self) -> None:
        if self._token is not None and self._shutdown is not None:
            trio.from_thread.run_sync(self._shutdown.set, trio_token=self._token)
        self._thread.join(30)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_DaemonThread]:
    import shutil
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="avmm-api-", dir="/tmp"))
    kernel = tmp_path_factory.mktemp("kernel") / "vmlinux"
    kernel.write_bytes(b"\x7fELF fake")
    daemon = _DaemonThread(directory / "avmm.sock", kernel)
    try:
        yield daemon
    finally:
        daemon.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def http(daemon: _DaemonThread) -> Iterator[httpx.Client]:
    transport = httpx.HTTPTransport(uds=str(daemon.path))
    with httpx.Client(transport=transport, base_url="http://avmm", timeout=30) as client:
        yield client


def _send(http: httpx.Client, case: Any) -> httpx.Response:
    """A schemathesis case (serialized for `requests`) sent with httpx."""
    kwargs = case.as_transport_kwargs(base_url="http://avmm")
    content = kwargs.get("data")
    if isinstance(content, str):
        content = content.encode()
    request = http.build_request(
        kwargs["method"], kwargs["url"], params=kwargs.get("params"),
        headers=kwargs.get("headers"), cookies=kwargs.get("cookies"),
        json=kwargs["json"] if "json" in kwargs and content is None else None,
        content=content)
    # A console GET streams until the VM stops: read what is there, then hang up.
    response = http.send(request, stream=True)
    try:
        if response.headers.get("content-type") == "application/octet-stream":
            response._content = next(response.iter_raw(), b"")
        else:
            response.read()
    finally:
        response.close()
    return response


def test_served_document_is_openapi_3(http: httpx.Client) -> None:
    document = http.get("/openapi.json").json()
    assert document["openapi"] == "3.0.3"
    assert schemathesis.openapi.from_dict(document).validate() is None


def test_api_conforms_to_its_openapi_document(daemon: _DaemonThread, http: httpx.Client
                                              ) -> None:
    schema = schemathesis.openapi.from_dict(http.get("/openapi.json").json())
    known_ids = list(daemon.host.vms)
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE),
                      schema.as_strategy(GenerationMode.NEGATIVE))
    seen: set[tuple[str, str, int]] = set()

    @given(case=cases, existing=st.sampled_from([None, *known_ids]))
    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: Any, existing: str | None) -> None:
        if existing is not None and case.path_parameters and "id" in case.path_parameters:
            case.path_parameters["id"] = existing
        response = _send(http, case)
        seen.add((case.method, case.path, response.status_code))
        case.validate_response(response, checks=_CHECKS)

    check()
    statuses = {status for _, _, status in seen}
    # The run reached more than one kind of answer: successes and client errors.
    assert any(200 <= status < 300 for status in statuses)
    assert any(400 <= status < 500 for status in statuses)


def test_config_schema_has_the_keys_of_avmm_config() -> None:
    from avmm import config
    from avmm.api import openapi_document

    schemas = openapi_document()["components"]["schemas"]
    root = schemas["VmConfig"]["properties"]
    assert set(root) == {field.name for field in config._ROOT.fields}
    tables = {field.name: field.parse for field in config._ROOT.fields
              if isinstance(field.parse, config._Table)}
    tables.update(disk=config._DISK, net=config._NET, vhost_user=config._VHOST_USER)
    for name, table in tables.items():
        schema = root[name]["items"] if root[name]["type"] == "array" else root[name]
        assert set(schema["properties"]) == {field.name for field in table.fields}, name
