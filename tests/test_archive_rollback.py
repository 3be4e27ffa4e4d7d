"""An archive index of version 3, as the archive of commit cd8f582 (the release before version 4) left it
(tests/data/archive-v3), upgraded by this smearscope: every report, bundle and HL7 delivery kept, and a
copy of the index as it was (`index.sqlite.v3-backup`, what that release reads: it refuses version 4)
made before anything is written, with what its WAL held."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_archive import as_user

from smearscope.service.archive.index_backup import backup_path
from smearscope.service.archive.store import INDEX_VERSION, ArchiveStore

REPO = Path(__file__).resolve().parents[1]
VERSION_3 = REPO / "tests" / "data" / "archive-v3"
FIRST, VERIFIED = "677c350e-5742-432a-94a7-0cb61535294e", "2954a7b8-d42e-4cfc-a7a8-8cb06e81ecb5"
LIS = "mllp:lis.clinic.lan:2575"
#: The file an upgrade holds its lock on (kept: removing it would let a third process lock another file).
LOCK = ".index.sqlite.upgrade-lock"


def read(index: Path, query: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"{index.as_uri()}?mode=ro", uri=True)
    try:
        return list(db.execute(query))
    finally:
        db.close()


def state(index: Path) -> dict[str, object]:
    """What the index of version 3 holds: its version, tables and rows."""
    return {
        "version": read(index, "PRAGMA user_version")[0][0],
        "tables": read(index, "SELECT type, name, sql FROM sqlite_master ORDER BY name"),
        "reports": read(index, "SELECT * FROM reports ORDER BY report_id"),
        "bundles": read(index, "SELECT * FROM bundles ORDER BY report_id"),
        "deliveries": read(index, "SELECT * FROM hl7_deliveries ORDER BY control_id"),
    }


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    directory = tmp_path / "archive"
    shutil.copytree(VERSION_3, directory, ignore=shutil.ignore_patterns("README.md"))
    return directory


def test_a_version_3_index_is_upgraded_keeping_every_delivery_and_its_copy_as_it_was_beside_it(
        archive: Path, caplog: pytest.LogCaptureFixture) -> None:
    index = archive / "index.sqlite"
    before = state(index)
    assert before["version"] == 3 and len(before["deliveries"]) == 3 and len(before["reports"]) == 2
    with caplog.at_level(logging.INFO):
        ArchiveStore(archive).close()
    backup = backup_path(index, 3)
    assert backup == archive / "index.sqlite.v3-backup"
    assert read(index, "PRAGMA user_version")[0][0] == INDEX_VERSION == 4
    after = state(index)
    assert [after[k] for k in ("reports", "bundles", "deliveries")] == [
        before[k] for k in ("reports", "bundles", "deliveries")]
    assert read(index, "SELECT run_id FROM hl7_whole_id_runs") == [(before["reports"][0][2],)]
    # the copy is the index as cd8f582 left it, one file (no WAL beside it to move with it)
    assert state(backup) == before
    assert read(backup, "PRAGMA journal_mode")[0][0] == "delete"
    assert not backup.with_name(backup.name + "-wal").exists()
    assert f"the archive index {index} (version 3, 2 reports) copied to {backup} before its upgrade" in caplog.text
    assert [p.name for p in archive.iterdir() if p.name.startswith(".") and p.name != LOCK] == []


def test_the_copy_holds_what_only_the_wal_held_and_later_opens_leave_it_and_the_rejections(
        archive: Path) -> None:
    """A delivery committed to the WAL alone (its writer still open, as an archive killed leaves it) is in
    the copy; a rejection recorded after the upgrade stays in the index, the copy is not made again."""
    index = archive / "index.sqlite"
    writer = sqlite3.connect(index)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    with writer:
        writer.execute("INSERT INTO hl7_deliveries VALUES (?, ?, 'VS3A000000000000004', 1796638400.0, 'send-hl7', "
                       "'D')", (FIRST, LIS))
    assert index.with_name("index.sqlite-wal").stat().st_size > 0
    store = ArchiveStore(archive)
    writer.close()
    backup = backup_path(index, 3)
    assert ("VS3A000000000000004",) in read(backup, "SELECT control_id FROM hl7_deliveries")
    with store._db:
        store._db.execute("INSERT INTO hl7_rejections (report_id, destination, control_id, rejected_at, sender, "
                          "processing_id, code, lis_text) VALUES (?, ?, 'C1', 1796638500.0, 'archive', 'P', 'AR', "
                          "'OBX-3 not mapped')", (VERIFIED, LIS))
    store.close()
    copied = hashlib.sha256(backup.read_bytes()).hexdigest()
    ArchiveStore(archive).close()
    assert hashlib.sha256(backup.read_bytes()).hexdigest() == copied
    assert read(index, "SELECT report_id, code FROM hl7_rejections") == [(VERIFIED, "AR")]
    assert len(read(index, "SELECT * FROM hl7_deliveries")) == 4


def test_a_new_index_or_one_already_of_version_4_gets_no_copy(tmp_path: Path) -> None:
    ArchiveStore(tmp_path / "a").close()
    ArchiveStore(tmp_path / "a").close()
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if "backup" in p.name) == []


def test_an_index_whose_copy_cannot_be_written_is_not_upgraded(archive: Path) -> None:
    """No upgrade without the copy: a folder where the copy goes (as a full disk would) stops the open,
    the index left of version 3 with its rows."""
    index = archive / "index.sqlite"
    before = state(index)
    backup_path(index, 3).mkdir()
    with pytest.raises(OSError):
        ArchiveStore(archive)
    assert state(index) == before


#: Opens the archive in its folder with files limited to argv[2] bytes (as a disk filling up as the copy is
#: written): what the open raised, as the archive's `cannot open the archive at ...` would say it.
OPEN_LIMITED = """
import resource, signal, sys
from collections.abc import Iterator
from pathlib import Path
from smearscope.service.archive.store import ArchiveStore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
try:
    ArchiveStore(Path(sys.argv[1])).close()
except OSError as exc:
    print("OSError", exc)
"""


def test_a_copy_cut_short_by_the_disk_leaves_no_part_of_itself_and_the_index_not_upgraded(archive: Path) -> None:
    """The disk stops the copy halfway (a file may grow to 40000 bytes of the index's 45056): the open fails
    as an OSError naming the copy, the part written is removed (it would hold the disk's last free space),
    and the index is left of version 3 with its rows."""
    index = archive / "index.sqlite"
    before = state(index)
    assert index.stat().st_size > 40000
    done = subprocess.run([sys.executable, "-c", OPEN_LIMITED, str(archive), "40000"], capture_output=True,
                          text=True, check=False, timeout=60, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.stdout.startswith(f"OSError the archive index {index} (version 3) is not upgraded to version 4, "
                                  "nothing in it changed: its copy as it is, index.sqlite.v3-backup, could not be "
                                  "written ("), done.stdout + done.stderr
    assert sorted(p.name for p in archive.iterdir() if (p.name.startswith(".") and p.name != LOCK) or "backup" in p.name) == []
    assert state(index) == before


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real file system of 256 kB (tmpfs; mounting it needs root, skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_disk_without_room_for_the_copy_is_said_before_anything_is_written(small_disk: Path) -> None:
    """Less free on the disk than the index's 45056 bytes: the copy is not begun (it would take the disk's last
    free space, the archive's WAL and its reports need), the error says what it needs and what is free, the
    index stays of version 3 with its rows."""
    archive = small_disk / "archive"
    shutil.copytree(VERSION_3, archive, ignore=shutil.ignore_patterns("README.md"))
    index = archive / "index.sqlite"
    before = state(index)
    free = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 40 * 1024))
    free = os.statvfs(small_disk)
    assert 32768 < free.f_bavail * free.f_frsize < 45056  # room for SQLite's -shm, not for the copy
    with pytest.raises(OSError, match=r"is not upgraded to version 4, nothing in it changed: its copy as it is, "
                                      r"index\.sqlite\.v3-backup, needs 45 kB and the disk holds \d+ kB free: "
                                      r"make room there and start it again"):
        ArchiveStore(archive)
    assert sorted(p.name for p in archive.iterdir() if (p.name.startswith(".") and p.name != LOCK) or "backup" in p.name) == []
    (small_disk / "filler").unlink()
    assert state(index) == before


def test_a_copy_made_by_root_belongs_to_the_index_owner_and_is_restored_to_it(archive: Path) -> None:
    """`sudo smearscope archive send-hl7` (root) is the first to open the index after the update: the copy
    is the archive user's, in the index's mode, so the documented `cp -p` gives the older archive (which runs
    as that user) an index it can write. Root only: another user cannot give a file away."""
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    index = archive / "index.sqlite"
    for path in (archive, *archive.rglob("*")):
        os.chown(path, 65534, 65534)
    index.chmod(0o640)
    ArchiveStore(archive).close()
    backup = backup_path(index, 3)
    copied = backup.stat()
    assert (copied.st_uid, copied.st_gid, copied.st_mode & 0o777) == (65534, 65534, 0o640)
    index.rename(archive / "index.sqlite.v4")
    subprocess.run(["cp", "-p", str(backup), str(index)], check=True)
    restored = index.stat()
    assert (restored.st_uid, restored.st_gid, restored.st_mode & 0o777) == (65534, 65534, 0o640)


def test_the_lock_root_made_is_the_index_owners_so_the_archive_opens_the_index_after_it() -> None:
    """`sudo smearscope archive send-hl7` is the first to open the index after the update, making the upgrade's
    lock file: it is the archive user's, in the index's mode (read-write for the owner and group only), so the
    archive, which runs as that user, opens the index for writing after it (the lock root's, 0640: the archive
    could not open it and stopped). Root only: another user cannot give a file away."""
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    with tempfile.TemporaryDirectory(prefix="archive-") as folder:  # not pytest's, which only root may enter
        Path(folder).chmod(0o755)
        opened_by_the_archive_user_after_root(Path(folder) / "archive")


def opened_by_the_archive_user_after_root(archive: Path) -> None:
    shutil.copytree(VERSION_3, archive, ignore=shutil.ignore_patterns("README.md"))
    for path in (archive, *archive.rglob("*")):
        os.chown(path, 65534, 65534)
    (archive / "index.sqlite").chmod(0o640)
    ArchiveStore(archive).close()  # root's, first
    lock = (archive / LOCK).stat()
    assert (lock.st_uid, lock.st_gid, lock.st_mode & 0o777) == (65534, 65534, 0o640)
    assert opened_as(65534, archive) == ""


def opened_as(uid: int, archive: Path) -> str:
    """Why the archive's index could not be opened for writing by user and group `uid` ("" when it was), in a
    process of that user forked from this one (its Python lies where that user may not read it)."""
    def open_index() -> str:
        ArchiveStore(archive).close()
        return ""

    return as_user(uid, open_index)


def going_back_commands() -> list[str]:
    """The shell commands docs/ARCHIVE.md gives for going back, as written there, run in the archive folder."""
    text = " ".join((REPO / "docs" / "ARCHIVE.md").read_text().split())
    steps = text.split("then in the archive folder (`/var/lib/smearscope-archive`): ", 1)[1].split("; install", 1)[0]
    return [c for c in steps.split("`")[1::2]]


def test_going_back_by_the_documented_commands_keeps_the_upgraded_index_whole_and_restores_the_copy(
        archive: Path) -> None:
    """The archive killed after the upgrade, its last delivery only in the WAL: docs/ARCHIVE.md's commands
    leave that delivery with index.sqlite.v4 (not removed, not read into the restored copy), and put back
    the index of version 3 as it was."""
    index = archive / "index.sqlite"
    before = state(index)
    store = ArchiveStore(archive)
    store.close()
    killed = sqlite3.connect(index)
    killed.execute("PRAGMA wal_autocheckpoint=0")
    with killed:
        killed.execute("INSERT INTO hl7_deliveries VALUES (?, ?, 'VS4A000000000000009', 1796638900.0, 'archive', "
                       "'P')", (VERIFIED, LIS))
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):  # the files as a killed archive leaves them
        shutil.copy(archive / name, archive / f"{name}.killed")
    killed.close()
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (archive / f"{name}.killed").rename(archive / name)
    commands = going_back_commands()
    assert commands[0] == "mv index.sqlite index.sqlite.v4" and commands[-1] == "cp -p index.sqlite.v3-backup index.sqlite"
    for command in commands:
        subprocess.run(["sh", "-c", command], cwd=archive, check=True)
    assert ("VS4A000000000000009",) in read(archive / "index.sqlite.v4", "SELECT control_id FROM hl7_deliveries")
    assert state(index) == before


OPEN_AT_GO = """
import os, sys, time
from pathlib import Path
from smearscope.service.archive.store import open_index
go = Path(sys.argv[2])
Path(sys.argv[3]).touch()  # imported: ready
while not go.exists():
    time.sleep(0.0005)
open_index(Path(sys.argv[1]), read_only=False).close()
"""


def open_at_once(archive: Path, tmp_path: Path) -> None:
    """Two processes open the index of `archive` to write it within a millisecond of each other; both must succeed."""
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{k}" for k in range(2)]
    openers = [subprocess.Popen([sys.executable, "-c", OPEN_AT_GO, str(archive), str(go), str(r)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in ready]
    while not all(r.exists() for r in ready):  # both imported, so both open the index within a millisecond
        assert all(p.poll() is None for p in openers), [p.communicate()[0] for p in openers]
        time.sleep(0.001)
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in openers]
    assert [p.returncode for p in openers] == [0, 0], outs


@pytest.mark.parametrize("trial", range(3))
def test_two_processes_opening_a_version_3_index_at_once_upgrade_it_once_and_both_go_on(
        archive: Path, tmp_path: Path, trial: int) -> None:
    """The archive restarted by an update while `send-hl7` runs: both open the old index at the same moment.
    One copies and upgrades it, the other waits for it and finds it upgraded (both stopped, the index not
    upgraded, when each copied it to the same file at once)."""
    index = archive / "index.sqlite"
    before = state(index)
    open_at_once(archive, tmp_path)
    after = state(index)
    assert after["version"] == INDEX_VERSION
    assert after["reports"] == before["reports"] and after["deliveries"] == before["deliveries"]
    assert state(backup_path(index, 3)) == before  # the copy as it was, whole


@pytest.mark.parametrize("trial", range(3))
def test_two_processes_opening_a_version_4_index_of_the_previous_layout_at_once_both_go_on(
        archive: Path, tmp_path: Path, trial: int) -> None:
    """A version 4 index made before hl7_rejections had `closed_at` (the version stayed 4: the column is added
    in place) opened by the archive and send-hl7 at the same moment: the column is added once and both go on
    (one stopped, 'duplicate column name: closed_at', when only an index below version 4 was locked)."""
    ArchiveStore(archive).close()
    index = archive / "index.sqlite"
    db = sqlite3.connect(index)
    with db:
        db.execute("ALTER TABLE hl7_rejections DROP COLUMN closed_at")  # the previous layout
    db.close()
    before = state(index)
    assert before["version"] == INDEX_VERSION
    open_at_once(archive, tmp_path)
    assert read(index, "SELECT name FROM pragma_table_info('hl7_rejections') WHERE name = 'closed_at'") == [("closed_at",)]
    after = state(index)
    assert after["version"] == INDEX_VERSION
    assert after["reports"] == before["reports"] and after["deliveries"] == before["deliveries"]


def lock_as_nfs_takes_it(monkeypatch: pytest.MonkeyPatch, refused: int | None = None) -> list[int]:
    """fcntl.flock as Linux takes it on NFS, where no NFS is mounted: an exclusive lock on a file open only for
    reading is EBADF (NFS makes it a POSIX write lock); `refused`: every lock fails with that errno (the lock
    service not running: ENOLCK). The access modes of the files locked, in order."""
    import errno
    import fcntl

    real, modes = fcntl.flock, []

    def flock(fd: int, operation: int) -> None:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        modes.append(mode)
        if refused is not None:
            raise OSError(refused, os.strerror(refused))
        if operation & fcntl.LOCK_EX and mode == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    return modes


def test_an_archive_on_nfs_takes_the_upgrade_lock_on_the_file_open_for_writing(
        archive: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """NFS (its locking emulated here): the lock file is opened for writing, so the lock is taken, the index
    upgraded with nothing said at WARNING; opened for reading as before, every archive start there stopped on EBADF."""
    modes = lock_as_nfs_takes_it(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="smearscope"):
        ArchiveStore(archive).close()
    assert modes == [os.O_RDWR]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert read(archive / "index.sqlite", "PRAGMA user_version") == [(INDEX_VERSION,)]


def test_a_file_system_that_refuses_the_lock_opens_the_index_without_it_said_once(
        archive: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """NFS whose lock service is not running (ENOLCK for every lock): the archive starts, the index upgraded with
    its copy made, and one WARNING names the file system (its type, as findmnt reads it) and the refusal; it stopped."""
    import errno

    lock_as_nfs_takes_it(monkeypatch, refused=errno.ENOLCK)
    with caplog.at_level(logging.WARNING, logger="smearscope"):
        ArchiveStore(archive).close()
    index = archive / "index.sqlite"
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    fs_type = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(archive)], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert said == [(f"the archive index {index} is opened without its upgrade lock: its file system ({fs_type}) "
                    f"refused the lock on {LOCK} ([Errno {errno.ENOLCK}] {os.strerror(errno.ENOLCK)}). Two processes "
                    "making or upgrading the index at once (the archive restarted while smearscope archive send-hl7 "
                    "starts) may then stop; on NFS, run its lock service (NFSv3: rpc.statd) or keep the archive on a "
                    "local disk")], said
    assert read(index, "PRAGMA user_version") == [(INDEX_VERSION,)]
    assert backup_path(index, 3).is_file()


def test_a_member_of_the_index_group_who_may_only_read_the_lock_file_takes_the_lock() -> None:
    """The lock file root:65534 0640: a process of user and group 65534 (no capability of root's) may not open it
    for writing, so opens it for reading and takes the lock there (a second open of it cannot lock it meanwhile)."""
    if os.geteuid() != 0:
        pytest.skip("a file of another owner needs root")
    with tempfile.TemporaryDirectory(prefix="archive-") as folder:
        Path(folder).chmod(0o755)
        index = Path(folder) / "index.sqlite"
        for path in (index, Path(folder) / LOCK):
            path.touch()
            os.chown(path, 0, 65534)
            path.chmod(0o640)
        assert locked_as(65534, index) == "held"


def locked_as(uid: int, index: Path) -> str:
    """What a process of user and group `uid` forked from this one found taking the upgrade lock of `index`:
    "held" when a second open of the lock file could not lock it meanwhile, else what stopped it."""
    import fcntl

    from smearscope.service.archive.index_backup import upgrade_lock

    def take_lock() -> str:
        with upgrade_lock(index):
            other = os.open(index.with_name(LOCK), os.O_RDONLY)
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return "held"
            finally:
                os.close(other)
        return "not held"

    return as_user(uid, take_lock)
