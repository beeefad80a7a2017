"""Run a module's virtio-net tests on both inner loops: the C one (avmm.virtio.net_fast)
and the Python one. A module that sets ``pytestmark = pytest.mark.usefixtures("net_path")``
(the fixture is tests/virtio/conftest.py's) runs every test twice; every NetDevice made
in them uses the parametrized path, and a test may ask for ``net_path`` to know which."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from avmm.virtio import net_fast


@pytest.fixture(params=["c", "python"])
def net_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "c":
        # Built by `make venv` (setup.py): a checkout without it fails here, loudly.
        if net_fast._net_ffi is None:
            pytest.fail("avmm.virtio._net_ffi is not built (run make venv)")
        monkeypatch.setattr(net_fast, "ENABLED", True)
    else:
        monkeypatch.setattr(net_fast, "ENABLED", False)
    yield request.param
