"""The snapshot directory: written whole under a temporary name and renamed, so that a
failure or a crash mid-snapshot never leaves something that looks like a snapshot; read
back with every problem as one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from avmm.memory import MIB, GuestMemory
from avmm.state import MachineState, SnapshotError, load_memory, read_snapshot, write_snapshot
from avmm.state import snapshot as snapshot_module

from .samples import machine_state

EXPECT = {"machine": MachineState}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def memory():
    with GuestMemory(8 * MIB) as memory:
        memory.write(3 * MIB, b"guest data")
        yield memory


def test_a_snapshot_reads_back(memory, tmp_path: Path):
    target = tmp_path / "snap"
    info = write_snapshot(target, {"machine": machine_state()}, memory)
    assert info.path == target
    assert sorted(p.name for p in target.iterdir()) == ["memory.avmm", "state.avmm"]
    assert info.bytes_state == (target / "state.avmm").stat().st_size
    assert info.bytes_memory == 4096
    assert target.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]  # nothing else left

    snapshot = read_snapshot(target, EXPECT)
    assert snapshot.sections == {"machine": machine_state()}
    with GuestMemory(8 * MIB) as restored:
        load_memory(snapshot, restored)
        assert restored.read(3 * MIB, 10) == b"guest data"


def test_a_snapshot_is_never_written_over_anything(memory, tmp_path: Path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(SnapshotError, match="taken: already exists"):
        write_snapshot(tmp_path / "taken", {"machine": machine_state()}, memory)
    with pytest.raises(SnapshotError, match="its parent directory does not exist"):
        write_snapshot(tmp_path / "no" / "snap", {"machine": machine_state()}, memory)


def test_a_failure_midway_leaves_nothing(memory, tmp_path: Path, monkeypatch):
    def fail(path: Path, sections: object, **_: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshot_module, "write_state_file", fail)
    with pytest.raises(SnapshotError, match=r"snap: cannot write the snapshot: No space left"):
        write_snapshot(tmp_path / "snap", {"machine": machine_state()}, memory)
    assert list(tmp_path.iterdir()) == []


def test_a_crash_midway_leaves_no_snapshot(tmp_path: Path):
    """A writer killed after the memory file and before the rename: the target does not
    exist, and what is left is neither named like it nor readable as a snapshot."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from avmm.memory import GuestMemory, MIB
        from avmm.state import snapshot
        from tests.state.samples import machine_state

        def hang(path, sections, **_):
            print("memory written", flush=True)
            time.sleep(60)

        snapshot.write_state_file = hang
        with GuestMemory(8 * MIB) as memory:
            memory.write(0, b"x")
            snapshot.write_snapshot(Path({str(tmp_path / 'snap')!r}),
                                    {{"machine": machine_state()}}, memory)
    """)], cwd=REPO, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    with child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"memory written\n"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
    assert not (tmp_path / "snap").exists()
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".snap.partial-")
    with pytest.raises(SnapshotError, match="not a snapshot"):
        read_snapshot(leftover, EXPECT)


def test_problems_reading_a_snapshot_are_one_line(memory, tmp_path: Path):
    target = tmp_path / "snap"
    write_snapshot(target, {"machine": machine_state()}, memory)

    def refused(directory: Path = target) -> str:
        with pytest.raises(SnapshotError) as caught:
            read_snapshot(directory, EXPECT)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert refused(tmp_path / "nowhere") == f"{tmp_path / 'nowhere'}: no such snapshot directory"
    os.truncate(target / "memory.avmm", 4 * MIB)
    assert "the memory file has 4194304 bytes, the snapshot recorded 8388608" in refused()
    (target / "memory.avmm").unlink()
    assert refused() == f"{target / 'memory.avmm'}: the snapshot's memory file is missing"
    (target / "state.avmm").unlink()
    assert refused() == f"{target}: not a snapshot (it has no state.avmm)"
