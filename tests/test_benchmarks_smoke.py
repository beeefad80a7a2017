"""A tiny run of each benchmark group (benchmarks/run.py), so the scripts cannot rot, and
checks of what the figures claim to be (benchmarks/common.py, benchmarks/report.py).

Nothing here is about speed: each group must finish and write its figures, with positive
numbers for avmm and for QEMU (finite ones for differences of two RSS readings), into the
JSON, each in a part of the table, with the run's provenance.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report as bench_report
from benchmarks.common import (
    IN_PROCESS,
    PARTS,
    PER_OPERATION,
    SHARING,
    WHOLE_PROCESS,
    Figure,
    Goal,
)
from tests.cgroups.conftest import cgroup_cpu_problem
from tests.prerequisites import require

REPO = Path(__file__).resolve().parents[1]

# group → figures it must produce (name prefixes) and the part each belongs to.
GROUPS = {
    "exits": [("exit round trip, pio write, unclaimed", PER_OPERATION),
              ("exit round trip, mmio write, unclaimed", PER_OPERATION),
              ("exit round trip, pio write, 16550 scratch register", PER_OPERATION),
              ("exit round trip, mmio read, virtio-mmio Version register", PER_OPERATION)],
    "startup": [("start-up: `avmm up` process → first serial byte", WHOLE_PROCESS),
                ("start-up floor: python process importing trio and structlog",
                 WHOLE_PROCESS),
                ("start-up: `avmm up` process → guest exit", WHOLE_PROCESS),
                ("start-up: VM in a running avmm process → first", IN_PROCESS),
                ("start-up: VM in a running avmm process → guest exit", IN_PROCESS)],
    "blk": [("blk 4 KiB random read, qd 1", PER_OPERATION),
            ("blk 4 KiB random write, qd 32", PER_OPERATION)],
    "blk-vhost": [("blk 4 KiB random read, qd 1, vhost-user (qsd)", PER_OPERATION),
                  ("blk 4 KiB random write, qd 32, vhost-user (qsd)", PER_OPERATION)],
    "net": [("net 64 B frames, TX", PER_OPERATION), ("net 1500 B frames, TX", PER_OPERATION),
            ("net 64 B frames, RX", PER_OPERATION), ("net 1500 B frames, RX", PER_OPERATION),
            ("net TSO 64 KiB TCP segments, TX", PER_OPERATION)],
    "net-vhost": [("net 64 B frames, TX guest → host, vhost-user (avmm backend net)",
                   PER_OPERATION),
                  ("net 1500 B frames, RX host → guest, vhost-user (avmm backend net)",
                   PER_OPERATION)],
    "churn": [("VM churn: `avmm up` process per VM", WHOLE_PROCESS),
              ("VM churn: VMs one after another in one avmm process", IN_PROCESS)],
    # --quick puts 2 and 3 VMs in one process where the full run has 10 and 50.
    "memory": [("memory: RSS of a 1-VM process", WHOLE_PROCESS),
               ("memory floor: RSS of a python process importing trio and structlog",
                WHOLE_PROCESS),
               ("memory: guest RAM touched by a 1-VM process", WHOLE_PROCESS),
               ("memory: extra RSS for the first VM", IN_PROCESS),
               ("memory: extra RSS per VM (1 → 2 VMs", IN_PROCESS),
               ("memory: extra RSS per VM (1 → 3 VMs", IN_PROCESS)],
    # --quick snapshots a 16 MiB guest where the full run has 128 MiB and 1 GiB.
    "snapshot": [("snapshot: save a paused VM, 16 MiB guest, untouched", PER_OPERATION),
                 ("snapshot: save a paused VM, 16 MiB guest, touched", PER_OPERATION),
                 ("snapshot: bytes written, 16 MiB guest, untouched", PER_OPERATION),
                 ("snapshot: bytes written, 16 MiB guest, touched", PER_OPERATION),
                 ("snapshot: space allocated on disk, 16 MiB guest", PER_OPERATION),
                 ("restore: `avmm up --restore` process → guest runs, 16 MiB", WHOLE_PROCESS),
                 ("restore: VirtualMachine.restore() in a running process → guest runs, 16",
                  IN_PROCESS),
                 ("restore: VirtualMachine.restore(copy_memory=True) in a running process → "
                  "guest runs, 16", IN_PROCESS)],
    # --quick migrates a 16 MiB guest where the full run has 128 MiB and 1 GiB.
    "migration": [("live migration: total time, 16 MiB guest, idle", PER_OPERATION),
                  ("live migration: downtime, 16 MiB guest, idle", PER_OPERATION),
                  ("live migration: guest-visible downtime, 16 MiB guest, idle",
                   PER_OPERATION),
                  ("live migration: data sent, 16 MiB guest, idle", PER_OPERATION),
                  ("live migration: total time, 16 MiB guest dirtying", PER_OPERATION),
                  ("live migration: downtime, 16 MiB guest dirtying", PER_OPERATION),
                  ("live migration: guest-visible downtime, 16 MiB guest dirtying",
                   PER_OPERATION),
                  ("live migration: data sent, 16 MiB guest dirtying", PER_OPERATION)],
    "fairness": [("rate limit: blk ops limit 500/s, qd 1", PER_OPERATION),
                 ("rate limit: blk ops limit 500/s, qd 32", PER_OPERATION),
                 ("rate limit: blk bandwidth limit 8 MiB/s, qd 32", PER_OPERATION),
                 ("rate limit: blk ops 500/s with a one-time burst", PER_OPERATION),
                 # avmm alone against a goal (benchmarks/fairness_cpu.py): no QEMU side.
                 ("fairness: CPU share of the cpu_weight 100 VM", SHARING),
                 ("fairness: CPU share of the cpu_weight 300 VM", SHARING),
                 ("fairness: CPU used by a spinning vCPU", SHARING),
                 # a NIC's limits, avmm alone (benchmarks/fairness_net.py)
                 ("rate limit: net TX guest → host 64 B frames, limit 2000/s", SHARING),
                 ("rate limit: net RX host → guest 64 B frames, limit 2000/s", SHARING),
                 ("noisy neighbour: quiet VM's blk 4 KiB reads qd 1, alone, `--isolation "
                  "none`", SHARING),
                 ("noisy neighbour: quiet VM's blk 4 KiB reads qd 1, next to a noisy VM "
                  "limited to 500 requests/s and 25 % of a CPU, `--isolation process`",
                  SHARING),
                 ("noisy neighbour: quiet VM's blk 4 KiB reads qd 1, next to a plain "
                  "process spinning 25 % of a CPU (no VM; the control), `--isolation none`",
                  SHARING),
                 ("noisy neighbour: quiet VM's blk 4 KiB reads qd 1, next to the same "
                  "limited noisy VM run by QEMU (`throttling.iops-total=500`, a 25 % quota "
                  "as avmm's), `--isolation process`", SHARING)],
    "isolation": [("isolation: VM churn, `--isolation process`", IN_PROCESS),
                  ("isolation: VM churn, `--isolation none`", IN_PROCESS),
                  ("isolation: create → first serial byte, `--isolation process`",
                   WHOLE_PROCESS),
                  ("isolation: create → first serial byte, `--isolation none`",
                   WHOLE_PROCESS),
                  ("isolation: memory per VM in `--isolation process`", WHOLE_PROCESS)],
}
# Groups that need more than KVM, QEMU and the test guest.
MARKS = {"net": [pytest.mark.net], "net-vhost": [pytest.mark.net],
         "fairness": [pytest.mark.net]}
VM_MARKS = [pytest.mark.kvm, pytest.mark.guest, pytest.mark.qemu]


def _git_head() -> str | None:
    result = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def _check_provenance(report: dict[str, object]) -> None:
    origin = report["provenance"]
    assert isinstance(origin, dict)
    head = _git_head()
    if head is not None:
        assert origin["commit"] in (head, head + "+dirty"), origin
    machine = origin["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["kernel"], machine
    assert machine["kvm_module"], machine
    assert origin["date"].endswith("Z"), origin


@pytest.mark.parametrize(
    "group", [pytest.param(g, marks=[*VM_MARKS, *MARKS.get(g, [])]) for g in GROUPS])
def test_benchmark_group_runs_and_writes_its_figures(group: str, tmp_path: Path) -> None:
    if group == "fairness":
        require(cgroup_cpu_problem())  # its CPU figures need a cgroup cpu controller
    if group == "isolation" and os.geteuid() != 0:
        require("the isolation group needs root (the jailer)")
    if group == "blk-vhost" and shutil.which("qemu-storage-daemon") is None:
        require("qemu-storage-daemon is not installed (make deps installs qemu-system-x86)")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--runs", "1", "--only", group,
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "latest.json").read_text())
    figures = report["figures"]
    for prefix, part in GROUPS[group]:
        matching = [name for name in figures if name.startswith(prefix)]
        assert matching, (prefix, list(figures))
        assert all(figures[name]["part"] == part for name in matching), (prefix, part)
    for name, figure in figures.items():
        assert figure["group"] == group
        assert figure["part"] in PARTS, name
        # A difference of two RSS readings can come out at or below 0 (pages the
        # allocator gave back); every other figure is a rate, a time or a size.
        difference = "extra RSS" in name
        alone = figure["part"] == SHARING
        assert ("qemu" not in figure) is alone, name
        for side in ("avmm",) if alone else ("avmm", "qemu"):
            runs = figure[side]["runs"]
            assert len(runs) == 1, (name, side, runs)
            assert all(math.isfinite(v) and (difference or v > 0) for v in runs), (name, side, runs)
        assert name in result.stdout  # the table was printed
        if alone:
            continue
        ratio = figure["ratio"]
        assert math.isclose(ratio["of_medians"],
                            figure["avmm"]["median"] / figure["qemu"]["median"]), name
        assert difference or ratio["of_medians"] > 0, name
        assert name in result.stdout  # the table was printed
    if group == "snapshot":
        _check_snapshot_sizes(figures)
    if group == "migration":
        _check_migration_sizes(figures)
    _check_provenance(report)
    assert bench_report.provenance_line(report) in result.stdout


def _check_snapshot_sizes(figures: dict[str, dict[str, object]]) -> None:
    """The touched guest's snapshot holds what the group wrote into its RAM (the
    figure's name says how many MiB), the untouched one far less, in both VMMs; disk
    space follows the bytes written (the files are sparse, nothing is padded)."""
    for name, figure in figures.items():
        if not name.startswith("snapshot: bytes written") or "touched RAM (" not in name:
            continue
        written_mib = float(name.split("touched RAM (")[1].split(" MiB")[0])
        untouched = figures[name.split("touched RAM (")[0] + "untouched RAM"]
        allocated = figures[name.replace("bytes written", "space allocated on disk")]
        for side in ("avmm", "qemu"):
            median = figure[side]["median"]  # type: ignore[index]
            assert median >= written_mib, (name, side, median)
            assert untouched[side]["median"] < written_mib / 2, (name, side)  # type: ignore[index]
            assert allocated[side]["median"] <= median * 1.05 + 0.1, (name, side)  # type: ignore[index]


def _check_migration_sizes(figures: dict[str, dict[str, object]]) -> None:
    """What a migration sent holds all the RAM the group wrote into the idle guest (the
    figure's name says how many MiB) in both VMMs, and a dirtying guest's stream holds at
    least the range its mem-walk filled; a downtime is never longer than the whole; the
    guest-visible stall contains avmm's pause (it runs from before the pause until after
    the hand-over, so it can only come out longer: half is a wide margin for the
    pause's own start-up)."""
    for name, figure in figures.items():
        if not name.startswith("live migration: data sent"):
            continue
        if "idle (" in name:
            written_mib = float(name.split("idle (")[1].split(" MiB")[0])
        else:
            written_mib = float(name.split("mem-walk over ")[1].split(" MiB")[0])
        total = figures[name.replace("data sent", "total time")]
        downtime = figures[name.replace("data sent", "downtime")]
        stall = figures[name.replace("data sent", "guest-visible downtime")]
        assert (stall["avmm"]["median"]  # type: ignore[index]
                >= downtime["avmm"]["median"] / 2), name  # type: ignore[index]
        for side in ("avmm", "qemu"):
            assert figure[side]["median"] >= written_mib, (name, side)  # type: ignore[index]
            assert (downtime[side]["median"]  # type: ignore[index]
                    <= total[side]["median"]), (name, side)  # type: ignore[index]


def test_ratio_is_the_ratio_of_the_medians_with_the_per_pair_range() -> None:
    """The table's ratio is the quotient of the two medians it shows; the median of the
    per-pair ratios differs from it for these pairs and must not be what is reported."""
    figure = Figure("f", "ms", "lower", PER_OPERATION)
    pairs = [(1.0, 1.0), (2.0, 8.0), (9.0, 3.0)]
    for a, q in pairs:
        figure.add(a, q)
    ratio = figure.to_json()["ratio"]
    assert isinstance(ratio, dict)
    per_pair = [a / q for a, q in pairs]
    of_medians = statistics.median(a for a, _ in pairs) / statistics.median(q for _, q in pairs)
    assert of_medians != statistics.median(per_pair)  # the inputs tell the two apart
    assert ratio["of_medians"] == of_medians
    assert (ratio["pair_min"], ratio["pair_max"]) == (min(per_pair), max(per_pair))
    assert "median" not in ratio


@pytest.mark.parametrize(("goal", "met"), [
    (Goal("ratio", "≥", 0.8), True),        # medians 3 / 3.5: 0.857
    (Goal("ratio", "≥", 0.9), False),
    (Goal("every pair", "≥", 0.8), False),  # one pair is 0.5
    (Goal("every pair", "≥", 0.5), True),
    (Goal("ratio", "≤", 2), True),
    (Goal("avmm", "≥", 3), True),           # avmm's median 3
    (Goal("avmm", "≥", 3.5), False),
])
def test_a_goal_is_checked_on_the_figures_measured(goal: Goal, met: bool) -> None:
    figure = Figure("f", "IOPS", "higher", PER_OPERATION, goal=goal)
    for a, q in [(2.0, 4.0), (3.0, 3.0), (4.0, 3.5)]:
        figure.add(a, q)
    data = figure.to_json()
    assert data["goal"] == {"text": goal.text, "met": met}
    report = {**_fake_report(), "figures": {"f": {"group": "g", **data}}}
    row = next(line for line in bench_report.markdown(report).splitlines()
               if line.startswith("| f |"))
    assert row.endswith(f"| {goal.text}: {'met' if met else 'NOT met'} |"), row


def test_a_figure_must_name_its_part_of_the_table() -> None:
    with pytest.raises(ValueError, match="part"):
        Figure("f", "ms", "lower", "somewhere")


def _fake_report() -> dict[str, object]:
    figures = {}
    for index, part in enumerate(PARTS):
        figure = Figure(f"figure {index}", "ms", "lower", part)
        figure.add(2.0 + index, 4.0)
        figure.add(3.0 + index, 5.0)
        figures[figure.name] = {"group": "g", **figure.to_json()}
    return {"provenance": bench_report.provenance(), "duration_s": 1.0, "quick": False,
            "params": {"runs": 2}, "figures": figures}


def test_report_prints_one_table_per_part_then_the_provenance() -> None:
    report = _fake_report()
    text = bench_report.markdown(report)
    titles = [text.index(f"**{title}.**") for title in PARTS.values()]
    assert titles == sorted(titles)
    for index, (name, data) in enumerate(report["figures"].items()):  # type: ignore[union-attr]
        row = text.index(f"| {name} |")
        # Under its own part's title, above the next part's.
        assert titles[index] < row < (titles[index + 1] if index + 1 < len(titles) else len(text))
        assert bench_report._fmt_ratio(data["ratio"]["of_medians"]) in text[row:].splitlines()[0]
    last = text.rstrip().splitlines()[-1]
    assert last == bench_report.provenance_line(report)
    assert report["provenance"]["commit"] in last  # type: ignore[index]
    assert report["provenance"]["machine"]["kvm_module"] in last  # type: ignore[index]


def test_report_writes_the_readme_between_its_markers(tmp_path: Path) -> None:
    report = _fake_report()
    (tmp_path / "latest.json").write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    before, after = "# x\n\n## Performance\n\nprose\n\n", "\nmore prose\n"
    readme.write_text(f"{before}{bench_report.BEGIN}\nold table\n{bench_report.END}{after}")
    assert bench_report.main([str(tmp_path / "latest.json"), "--write-readme", str(readme)]) == 0
    text = readme.read_text()
    assert text == (f"{before}{bench_report.BEGIN}\n{bench_report.markdown(report)}"
                    f"{bench_report.END}{after}")
    # A smoke run's figures never reach the README.
    (tmp_path / "latest.json").write_text(json.dumps({**report, "quick": True}))
    assert bench_report.main([str(tmp_path / "latest.json"), "--write-readme", str(readme)]) == 1
    assert readme.read_text() == text


def test_the_readme_table_comes_from_the_report() -> None:
    """README.md's Performance tables sit between the markers benchmarks.report writes."""
    text = (REPO / "README.md").read_text()
    start, end = text.find(bench_report.BEGIN), text.find(bench_report.END)
    assert 0 <= start < end, "README.md lacks the bench-table markers"
    assert "Produced by `make bench`" in text[start:end]
