"""A tiny run of each benchmark group (benchmarks/run.py), so the scripts cannot rot.

Nothing here is about speed: each group must finish and write its figures, with positive
numbers for avmm and for QEMU, into the JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kvm, pytest.mark.guest, pytest.mark.qemu]

REPO = Path(__file__).resolve().parents[1]

# group → figures it must produce (name prefixes)
GROUPS = {
    "exits": ["exit round trip, pio", "exit round trip, mmio"],
    "startup": ["start-up: process", "start-up: in-process"],
    "blk": ["blk 4 KiB random read, qd 1", "blk 4 KiB random write, qd 32"],
    "churn": ["VM churn"],
    "memory": ["memory: RSS of a 1-VM process", "memory: extra RSS per VM",
               "memory: guest RAM touched"],
}


@pytest.mark.parametrize("group", list(GROUPS))
def test_benchmark_group_runs_and_writes_its_figures(group: str, tmp_path: Path) -> None:
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
        for side in ("avmm", "qemu"):
            runs = figure[side]["runs"]
            assert len(runs) == 1, (name, side, runs)
            assert all(value > 0 for value in runs), (name, side, runs)
        assert figure["ratio"]["median"] > 0, name
    assert name in result.stdout  # the table was printed
