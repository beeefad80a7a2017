"""Run a module's tests on both inner loops of a device: the C one (avmm.virtio.net_fast,
avmm.virtio.blk_fast) and the Python one. A test that asks for ``net_path`` or
``blk_path`` (fixtures of tests/virtio/conftest.py; a module may ask for every test with
``pytestmark = pytest.mark.usefixtures(...)``) runs twice; every NetDevice or BlockDevice
made after the fixture uses the parametrized path (a fixture that makes one should ask
for the path first), and the test may read which one it got."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType

import pytest

from avmm.virtio import blk_fast, net_fast


def _loop_fixture(module: ModuleType, built: str) -> Callable[..., Iterator[str]]:
    @pytest.fixture(params=["c", "python"])
    def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
        if request.param == "c":
            # Built by `make venv` (setup.py): a checkout without it fails here, loudly.
            if getattr(module, built) is None:
                pytest.fail(f"avmm.virtio.{built} is not built (run make venv)")
            monkeypatch.setattr(module, "ENABLED", True)
        else:
            monkeypatch.setattr(module, "ENABLED", False)
        yield request.param

    return path


net_path = _loop_fixture(net_fast, "_net_ffi")
blk_path = _loop_fixture(blk_fast, "_blk_ffi")
