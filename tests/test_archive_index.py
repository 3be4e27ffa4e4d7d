"""The archive's index carries its version (PRAGMA user_version): an index made before it had one
(tests/data/archive-unversioned, made by the archive of commit 0bdeb98) and one of version 1
(tests/data/archive-v1, made by the archive of commit 2c4762f) are upgraded in place to version 4
and everything in them is still found; an index of a newer version is refused, naming both
versions, exit 2, and left byte for byte as it was."""

from __future__ import annotations

import hashlib
import logging
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from smearscope.cli import main
from smearscope.service.archive.query import find
from smearscope.service.archive.store import INDEX_VERSION, ArchiveStore, IndexVersionError

REPO = Path(__file__).resolve().parents[1]
MADE_BEFORE = REPO / "tests" / "data" / "archive-unversioned"
VERSION_1 = REPO / "tests" / "data" / "archive-v1"
FIRST, VERIFIED = "677c350e-5742-432a-94a7-0cb61535294e", "2954a7b8-d42e-4cfc-a7a8-8cb06e81ecb5"


def user_version(index: Path) -> int:
    db = sqlite3.connect(f"{index.as_uri()}?mode=ro", uri=True)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def rows(index: Path) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"{index.as_uri()}?mode=ro", uri=True)
    try:
        return [*db.execute("SELECT * FROM reports ORDER BY report_id"), *db.execute("SELECT * FROM bundles")]
    finally:
        db.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def unversioned(tmp_path: Path) -> Path:
    directory = tmp_path / "archive"
    shutil.copytree(MADE_BEFORE, directory, ignore=shutil.ignore_patterns("README.md"))
    return directory


def test_an_index_made_before_it_had_a_version_is_upgraded_in_place_and_still_found(
        unversioned: Path, caplog: pytest.LogCaptureFixture) -> None:
    index = unversioned / "index.sqlite"
    assert user_version(index) == 0
    before = rows(index)
    files = {p: digest(p) for p in unversioned.rglob("*.json")}
    with caplog.at_level(logging.INFO):
        ArchiveStore(unversioned).close()
    assert user_version(index) == INDEX_VERSION == 4
    assert f"the archive index {index} had no version number" in caplog.text
    assert rows(index) == before and {p: digest(p) for p in unversioned.rglob("*.json")} == files
    found = find(unversioned)
    assert [(r.report_id, r.superseded_by, r.fhir_path is not None) for r in found] == [
        (VERIFIED, None, True), (FIRST, VERIFIED, False)]
    assert found[0].path.is_file()


def test_a_version_1_index_is_upgraded_to_4_in_place_and_still_found(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "archive"
    shutil.copytree(VERSION_1, directory, ignore=shutil.ignore_patterns("README.md"))
    index = directory / "index.sqlite"
    assert user_version(index) == 1
    before = rows(index)
    with caplog.at_level(logging.INFO):
        ArchiveStore(directory).close()
    assert user_version(index) == 4
    assert f"the archive index {index} upgraded from version 1 to 4" in caplog.text
    assert rows(index) == before
    db = sqlite3.connect(f"{index.as_uri()}?mode=ro", uri=True)
    try:
        assert db.execute("SELECT count(*) FROM hl7_deliveries").fetchone()[0] == 0
    finally:
        db.close()
    assert [r.report_id for r in find(directory)] == [VERIFIED, FIRST]


def test_a_new_index_is_version_4(tmp_path: Path) -> None:
    ArchiveStore(tmp_path / "a").close()
    assert user_version(tmp_path / "a" / "index.sqlite") == 4


def test_an_index_of_a_newer_version_is_refused_with_both_versions_and_left_as_it_was(
        unversioned: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = unversioned / "index.sqlite"
    db = sqlite3.connect(index)
    db.execute("PRAGMA user_version = 5")  # as a newer smearscope would leave it
    db.close()
    before = digest(index)
    said = f"the archive index {index} is of version 5, newer than this smearscope's (version 4)"
    with pytest.raises(IndexVersionError, match=r"is of version 5, newer than this smearscope's \(version 4\)"):
        ArchiveStore(unversioned)
    # the archive itself: exit 2 (the unit does not restart it), before any broker is tried; in its
    # own process, with a limit: one that took the index would run on (the broker retried for ever)
    proc = subprocess.run([sys.executable, "-m", "smearscope", "archive", "--broker", "mqtt://127.0.0.1:1", "--dir",
                           str(unversioned)], capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert proc.returncode == 2, proc.stderr
    assert said in proc.stderr and "Nothing in it was changed" in proc.stderr, proc.stderr
    assert main(["archive", "find", "--dir", str(unversioned)]) == 2
    assert said in capsys.readouterr().err
    assert main(["archive", "show", VERIFIED, "--dir", str(unversioned)]) == 2
    assert said in capsys.readouterr().err
    assert digest(index) == before and user_version(index) == 5
    wal = unversioned / "index.sqlite-wal"  # left by SQLite's read-only readers of a WAL index: empty
    assert not wal.exists() or wal.stat().st_size == 0


def test_an_unversioned_index_of_another_layout_is_refused_unchanged(tmp_path: Path) -> None:
    directory = tmp_path / "a"
    directory.mkdir()
    db = sqlite3.connect(directory / "index.sqlite")
    db.execute("CREATE TABLE reports (report_id TEXT PRIMARY KEY, path TEXT)")
    db.commit()
    db.close()
    before = digest(directory / "index.sqlite")
    with pytest.raises(IndexVersionError, match="no version number and not the layout of version 1"):
        ArchiveStore(directory)
    assert digest(directory / "index.sqlite") == before


def test_an_index_whose_first_start_stopped_between_its_tables_is_completed(tmp_path: Path) -> None:
    """The index's tables are made one statement at a time at the archive's first start: one stopped
    there (a power cut, a kill) left `reports` without `bundles`. That index was refused at every later
    start as "not the layout of version 1 ... not made by smearscope archive", though it was, and empty.
    Now the missing table is made and the index marked version 1; another layout is still refused."""
    directory = tmp_path / "a"
    directory.mkdir()
    db = sqlite3.connect(directory / "index.sqlite")
    db.execute("CREATE TABLE reports (report_id TEXT PRIMARY KEY, station TEXT NOT NULL, run_id TEXT, "
               "specimen_id TEXT, created_at REAL NOT NULL, kind TEXT NOT NULL, schema_version TEXT NOT NULL, "
               "verified INTEGER NOT NULL, supersedes TEXT, message_id TEXT, path TEXT NOT NULL, "
               "received_at REAL NOT NULL)")  # the first statement of the archive's schema, as it makes it
    db.commit()
    db.close()
    store = ArchiveStore(directory)
    store.close()
    assert user_version(directory / "index.sqlite") == INDEX_VERSION
    assert rows(directory / "index.sqlite") == []  # both tables there now
