"""The HTTP side of snapshot and restore on any machine (the fake host): what reaches the
Host from a request, and the answers' shapes."""

from __future__ import annotations

from pathlib import Path

import httpx

from avmm.api import ApiClient
from avmm.config import config_from_dict

from .fake_host import FakeHost


def _raw(api: ApiClient) -> httpx.AsyncClient:
    return api._http


async def test_restore_options_reach_the_host(api: ApiClient, fake_host: FakeHost,
                                              kernel_file: Path, tmp_path: Path) -> None:
    fake_host.restore_config = config_from_dict({"boot": {"kernel": str(kernel_file)}},
                                                base_dir=None)
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "state.avmm").write_bytes(b"fake")
    sock = str(tmp_path / "new.sock")
    vm = await api.restore_vm(snap, start=False, copy_memory=True,
                              vhost_user={"blk0": sock})
    assert vm["state"] == "paused"
    # The start query parameter is the default of the body's "start"; TOML works too.
    response = await _raw(api).post("/vms?start=false", content=f'restore = "{snap}"\n',
                                    headers={"content-type": "application/toml"})
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/vms/{response.json()['id']}"
    response = await _raw(api).post("/vms?start=false",
                                    json={"restore": str(snap), "start": True})
    assert response.status_code == 201, response.text
    assert fake_host.restored == [(str(snap), False, True, {"blk0": sock}),
                                  (str(snap), False, False, {}),
                                  (str(snap), True, False, {})]


async def test_snapshot_answer_and_a_not_restorable_directory(
        api: ApiClient, fake_host: FakeHost, kernel_file: Path, tmp_path: Path) -> None:
    config = config_from_dict({"boot": {"kernel": str(kernel_file)}}, base_dir=None)
    vm = await fake_host.create(config, start=False)
    info = await api.snapshot(vm.id, tmp_path / "snap")
    assert info == {"path": str(tmp_path / "snap"), "bytes_state": 1234,
                    "bytes_memory": 4096, "duration_ms": 12.5}
    response = await _raw(api).post("/vms", json={"restore": str(tmp_path)})
    assert response.status_code == 400
    assert response.json() == {"error": f"{tmp_path}: not a snapshot (it has no state.avmm)",
                               "detail": {"type": "SnapshotError"}}
