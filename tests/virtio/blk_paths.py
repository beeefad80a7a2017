"""Run a module's virtio-blk tests on both request loops: the C one (avmm.virtio.blk_fast)
and the Python one. A test that asks for ``blk_path`` (the fixture is
tests/virtio/conftest.py's) runs twice; every BlockDevice made after the fixture uses the
parametrized path (a fixture that makes one should ask for ``blk_path`` first)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from avmm.virtio import blk_fast


@pytest.fixture(params=["c", "python"])
def blk_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "c":
        # Built by `make venv` (setup.py): a checkout without it fails here, loudly.
        if blk_fast._blk_ffi is None:
            pytest.fail("avmm.virtio._blk_ffi is not built (run make venv)")
        monkeypatch.setattr(blk_fast, "ENABLED", True)
    else:
        monkeypatch.setattr(blk_fast, "ENABLED", False)
    yield request.param
