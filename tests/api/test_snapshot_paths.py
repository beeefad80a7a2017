"""PathPolicy.new_path: where a snapshot directory may be created, checked without races."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from avmm.errors import HostFileError, PathNotAllowedError
from avmm.paths import PathPolicy


@pytest.fixture
def area() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="avmm-snap-paths-", dir="/tmp"))
    for name in ("allowed", "outside"):
        (root / name).mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def policy(area: Path) -> Iterator[PathPolicy]:
    policy = PathPolicy([area / "allowed"])
    yield policy
    policy.close()


def test_a_new_path_is_created_in_the_directory_that_was_checked(
        area: Path, policy: PathPolicy) -> None:
    """The parent is swapped for a symlink out of the allowed directory between the
    check and the mkdir: the directory still appears in the one that was checked."""
    (area / "allowed" / "snaps").mkdir()
    target = policy.new_path(area / "allowed" / "snaps" / "one", "path")
    try:
        (area / "allowed" / "snaps").rename(area / "allowed" / "moved")
        (area / "allowed" / "snaps").symlink_to("../outside")
        os.mkdir(target.at, 0o700)
    finally:
        target.close()
    assert (area / "allowed" / "moved" / "one").is_dir()
    assert list((area / "outside").iterdir()) == []
    assert target.dirfd == -1  # closed, and closing again is harmless
    target.close()


def test_new_path_refuses_what_cannot_become_a_snapshot(area: Path, policy: PathPolicy
                                                        ) -> None:
    allowed = area / "allowed"
    (allowed / "exists").mkdir()
    (allowed / "escape").symlink_to("../outside")
    (allowed / "dangling").symlink_to("../outside/nothing")
    refused_outside = [area / "outside" / "snap", allowed / "escape" / "snap",
                       Path(f"{allowed}/../outside/snap"), Path("/snap")]
    for path in refused_outside:
        with pytest.raises(PathNotAllowedError) as error:
            policy.new_path(path, "path")
        assert error.value.key == "path"
    refused = {allowed / "exists": "already exists",
               allowed / "dangling": "already exists",  # a symlink is not followed
               allowed / "missing" / "snap": "cannot use the directory",
               Path(f"{allowed}/snap/.."): "does not name a file"}
    for path, text in refused.items():
        with pytest.raises(HostFileError) as error:
            policy.new_path(path, "path")
        assert not isinstance(error.value, PathNotAllowedError), path
        assert text in str(error.value), (path, str(error.value))
        assert error.value.key == "path"
    assert list((area / "outside").iterdir()) == []


def test_new_path_without_restriction_still_opens_the_parent(area: Path) -> None:
    target = PathPolicy().new_path(area / "outside" / "snap", "path")
    try:
        assert os.path.samestat(os.stat(target.dirfd), os.stat(area / "outside"))
        assert target.name == "snap"
    finally:
        target.close()
    with pytest.raises(HostFileError, match="already exists"):
        PathPolicy().new_path(area / "outside", "path")
