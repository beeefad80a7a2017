"""A tiny run of the ``fairness`` benchmark group (benchmarks/fairness_cpu.py), so the
script cannot rot: it must finish and write its three figures (shares and quota use,
finite and within 0..100 % or one CPU's worth by construction) with their goals. Nothing
here is about how close they come: that is the benchmark's to report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import SHARING
from tests.cgroups.conftest import cgroup_cpu_problem
from tests.prerequisites import require

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.kvm
@pytest.mark.guest
@pytest.mark.net  # the NIC rate-limit figures (benchmarks/fairness_net.py)
def test_fairness_group_runs_and_writes_its_figures(tmp_path: Path) -> None:
    require(cgroup_cpu_problem())
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--runs", "1", "--only",
         "fairness", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    every = json.loads((tmp_path / "latest.json").read_text())["figures"]
    # The group's CPU figures (its rate-limit figures are checked with the others in
    # tests/test_benchmarks_smoke.py).
    figures = {name: f for name, f in every.items()
               if f["part"] == SHARING and name.startswith("fairness:")}
    names = sorted(figures)
    assert len(names) == 3, names
    # The noisy-neighbour figures (benchmarks/noisy.py): for each of ten cases (five
    # neighbours, the control and QEMU's limited VM among them, in two isolation modes) a
    # rate, a median and a 99th percentile, positive and in that order.
    noisy = {name: f for name, f in every.items() if name.startswith("noisy neighbour:")}
    assert len(noisy) == 30, sorted(noisy)
    assert all(f["part"] == SHARING and f["avmm"]["runs"][0] > 0 for f in noisy.values())
    medians = {name.replace(", median,", ","): f["avmm"]["runs"][0]
               for name, f in noisy.items() if ", median," in name}
    tails = {name.replace(", 99th percentile,", ","): f["avmm"]["runs"][0]
             for name, f in noisy.items() if ", 99th percentile," in name}
    assert len(medians) == len(tails) == 10 and medians.keys() == tails.keys()
    assert all(medians[case] <= tails[case] for case in medians), (medians, tails)
    shares = [figures[name]["avmm"]["runs"][0] for name in names if "share" in name]
    assert len(shares) == 2 and math.isclose(sum(shares), 100.0)
    for name, figure in figures.items():
        assert figure["group"] == "fairness" and figure["part"] == SHARING
        assert "goal" in name
        (value,) = figure["avmm"]["runs"]
        assert math.isfinite(value) and value >= 0, name
        assert name in result.stdout
    assert "goal 25 / 75" in result.stderr + result.stdout  # measured vs goal printed
