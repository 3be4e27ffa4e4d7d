"""tools/archive_switch.py against the release before the archive index's version 4 (commit cd8f582,
index version 3), run from a git worktree with its own code: this smearscope upgrades that release's
index keeping every report and HL7 delivery, leaves the index as it was beside it, and the release,
which refuses the upgraded index, lists all of it again once that copy is put in its place."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.archive_switch import check
from tools.version_switch import ROOT, Version, make_version, package_layout, remove_version

RELEASE = "cd8f582"


@pytest.fixture
def release(tmp_path: Path) -> Iterator[Version]:
    known = subprocess.run(["git", "rev-parse", "--verify", f"{RELEASE}^{{commit}}"], cwd=ROOT,
                           capture_output=True, text=True, check=False)
    if known.returncode != 0:
        pytest.skip(f"commit {RELEASE} is not in this clone's history")
    version = make_version(RELEASE, tmp_path)
    try:
        yield version
    finally:
        remove_version(version)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=False)


def test_the_release_before_version_4_goes_back_to_the_copy_and_nothing_is_lost(
        release: Version, tmp_path: Path) -> None:
    this = Version("this checkout", "working-tree", ROOT, package_layout(ROOT, tmp_path / "layout-this"))
    work = tmp_path / "work"
    work.mkdir()
    results = {claim: (holds, detail) for claim, holds, detail in check(release, this, work)}
    assert list(results) == ["update keeps every report and delivery", "the index as it was kept beside it",
                             "going back lists every report and delivery", "updated again, all of it found"]
    assert all(holds for holds, _ in results.values()), results
    assert results["update keeps every report and delivery"][1].startswith(
        "index version 3 -> 4; 2 reports, 3 deliveries")
    assert results["going back lists every report and delivery"][1].startswith(
        "the later index refused, index.sqlite.v3-backup put in its place: the earlier find exit 0, 2 reports")
    assert (work / "archive" / "index.sqlite.v4").is_file()
