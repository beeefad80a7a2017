"""The devices' compiled loops are used only when they match the Python side reading
them (avmm.virtio._regions.compiled)."""

from __future__ import annotations

import types

import pytest

from avmm.virtio import _regions


def test_a_module_built_from_other_sources_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    stale = types.SimpleNamespace(lib=types.SimpleNamespace())  # no AVMM_VIRTQ_ABI
    monkeypatch.setattr(_regions.importlib, "import_module", lambda name: stale)
    assert _regions.compiled("_net_ffi", "AVMM_NET_PYTHON") == (None, False)
    other = types.SimpleNamespace(lib=types.SimpleNamespace(AVMM_VIRTQ_ABI=_regions.VIRTQ_ABI + 1))
    monkeypatch.setattr(_regions.importlib, "import_module", lambda name: other)
    assert _regions.compiled("_blk_ffi", "AVMM_BLK_PYTHON") == (None, False)


@pytest.mark.parametrize("module", ["_net_ffi", "_blk_ffi"])
def test_the_built_modules_match(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AVMM_NET_PYTHON", raising=False)
    monkeypatch.delenv("AVMM_BLK_PYTHON", raising=False)
    loaded, enabled = _regions.compiled(module, "AVMM_NET_PYTHON")
    assert loaded is not None and enabled, f"avmm.virtio.{module}: run make venv"
    monkeypatch.setenv("AVMM_NET_PYTHON", "1")
    assert _regions.compiled(module, "AVMM_NET_PYTHON")[1] is False
