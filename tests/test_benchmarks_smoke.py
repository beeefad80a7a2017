"""A tiny run of each benchmark group (benchmarks/run.py), so the scripts cannot rot.

Nothing here is about speed: each group must finish and write its figures, with positive
numbers for avmm and for QEMU (finite ones for differences of two RSS readings), into the
JSON.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.prerequisites import require

pytestmark = [pytest.mark.kvm, pytest.mark.guest, pytest.mark.qemu]

REPO = Path(__file__).resolve().parents[1]

# group → figures it must produce (name prefixes)
GROUPS = {
    "exits": ["exit round trip, pio", "exit round trip, mmio"],
    "startup": ["start-up: process", "start-up: in-process"],
    "blk": ["blk 4 KiB random read, qd 1", "blk 4 KiB random write, qd 32"],
    "blk-vhost": ["blk 4 KiB random read, qd 1, vhost-user (qsd)",
                  "blk 4 KiB random write, qd 32, vhost-user (qsd)"],
    "net": ["net 64 B frames, TX", "net 1500 B frames, TX", "net 64 B frames, RX",
            "net 1500 B frames, RX"],
    "churn": ["VM churn"],
    # --quick puts 2 and 3 VMs in one process where the full run has 10 and 50.
    "memory": ["memory: RSS of a 1-VM process", "memory: extra RSS for the first VM",
               "memory: extra RSS per VM (1 → 2 VMs", "memory: extra RSS per VM (1 → 3 VMs",
               "memory: guest RAM touched"],
}
# Groups that need more than KVM, QEMU and the test guest.
MARKS = {"net": [pytest.mark.net]}


@pytest.mark.parametrize("group", [pytest.param(g, marks=MARKS.get(g, [])) for g in GROUPS])
def test_benchmark_group_runs_and_writes_its_figures(group: str, tmp_path: Path) -> None:
    if group == "blk-vhost" and shutil.which("qemu-storage-daemon") is None:
        require("qemu-storage-daemon is not installed (make deps installs qemu-system-x86)")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--runs", "1", "--only", group,
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "latest.json").read_text())
    figures = report["figures"]
    for prefix in GROUPS[group]:
        assert any(name.startswith(prefix) for name in figures), (prefix, list(figures))
    for name, figure in figures.items():
        assert figure["group"] == group
        # A difference of two RSS readings can come out at or below 0 (pages the
        # allocator gave back); every other figure is a rate, a time or a size.
        difference = "extra RSS" in name
        for side in ("avmm", "qemu"):
            runs = figure[side]["runs"]
            assert len(runs) == 1, (name, side, runs)
            assert all(math.isfinite(v) and (difference or v > 0) for v in runs), (name, side, runs)
        assert math.isfinite(figure["ratio"]["median"]), name
        assert difference or figure["ratio"]["median"] > 0, name
    assert name in result.stdout  # the table was printed
