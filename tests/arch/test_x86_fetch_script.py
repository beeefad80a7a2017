"""scripts/fetch-debian-kernel.sh, the parts that need no network."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fetch-debian-kernel.sh"


def test_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_does_nothing_when_the_kernel_is_there(tmp_path: Path) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"already here")
    result = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path)], check=True, capture_output=True, text=True
    )
    assert "nothing to do" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vmlinuz"]
    assert (tmp_path / "vmlinuz").read_bytes() == b"already here"
