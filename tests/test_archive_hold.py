"""`smearscope archive` loses nothing it acknowledges: a station folder linked out of the archive
holds its reports (as a full disk does) until the link is gone; an archived file that cannot be
read, a copy with other content and a file name another record already has each leave the new
message stored under a name of its own. Against a real mosquitto and real files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import MQTT_USERS, MosquittoBroker, wait_until
from test_archive import REPO, SPECIMEN, STATION, a_report, envelope_of, indexed, raw_client

from smearscope.service.archive.daemon import ArchiveDaemon
from smearscope.service.archive.message import read_bundle, read_report
from smearscope.service.archive.query import find, lookup
from smearscope.service.archive.store import ArchiveStore, LinkOutOfArchive
from smearscope.service.config.archive import ArchiveConfig
from smearscope.service.config.mqtt import MqttConfig
from smearscope.service.fhir.bundle import report_bundle

pytestmark = pytest.mark.broker


class InProcessArchive:
    """The archive's daemon on a thread of this process (its log lines reach caplog), trying again
    every 0.1 s."""

    def __init__(self, port: int, directory: Path) -> None:
        config = ArchiveConfig(mqtt=MqttConfig(host="127.0.0.1", port=port, username="observer",
                                               client_id="archive-hold"), directory=directory, retry_s=0.1)
        self.daemon = ArchiveDaemon(config, MQTT_USERS["observer"])
        self.runner = threading.Thread(target=self.daemon.run)
        self.runner.start()
        assert wait_until(lambda: self.daemon._connected, 30)

    def stop(self) -> None:
        self.daemon.stop()
        self.runner.join(30)
        assert not self.runner.is_alive()


def publish(port: int, *payloads: bytes) -> None:
    with raw_client(port) as client:
        for payload in payloads:
            client.publish(f"smearscope/{STATION}/report", payload, qos=1).wait_for_publish(10)


def test_a_station_folder_linked_out_of_the_archive_holds_its_report_until_the_link_is_removed(
        tmp_path: Path, persistent_broker: MosquittoBroker, caplog: pytest.LogCaptureFixture) -> None:
    """The report was refused (the path leads out) and acknowledged: lost. Now it is held unacknowledged
    with one ERROR naming the link and its target, kept by the broker across a stop, and stored by the
    running archive once the link is removed."""
    directory, outside = tmp_path / "archive", tmp_path / "elsewhere"
    directory.mkdir()
    outside.mkdir()
    link = directory / STATION
    link.symlink_to(outside)
    held, later = a_report("run-1", SPECIMEN, 1_796_000_000.0), a_report("run-2", SPECIMEN, 1_796_200_000.0)
    caplog.set_level(logging.INFO)
    archive = InProcessArchive(persistent_broker.port, directory)
    try:
        publish(persistent_broker.port, envelope_of(held))
        assert wait_until(lambda: archive.daemon.counts["retried"] >= 5, 30), caplog.text
    finally:
        archive.stop()  # with the report unstored: the broker must still have it
    said = [r for r in caplog.records if r.levelno == logging.ERROR and "symbolic link" in r.getMessage()]
    assert len(said) == 1, caplog.text  # once, not once per try
    assert f"{link} is a symbolic link to {outside}, outside the archive" in said[0].getMessage()
    assert "NOT acknowledged" in said[0].getMessage() and f"rm {link}" in said[0].getMessage()
    assert "refused a message" not in caplog.text and archive.daemon.counts["refused"] == 0
    assert list(outside.iterdir()) == [] and indexed(directory) == 0

    link.unlink()
    archive = InProcessArchive(persistent_broker.port, directory)
    try:  # sent again by the broker: it was never acknowledged
        assert wait_until(lambda: indexed(directory) == 1, 30), caplog.text
        month_link = directory / STATION / "2026-12"  # the month's folder this time
        month_link.symlink_to(outside)
        errors = len([r for r in caplog.records if r.levelno == logging.ERROR])
        later_envelope = envelope_of(later)
        publish(persistent_broker.port, later_envelope)
        assert wait_until(lambda: len([r for r in caplog.records if r.levelno == logging.ERROR]) > errors, 30)
        assert f"{month_link} is a symbolic link to {outside}, outside the archive" in caplog.text
        month_link.unlink()  # while it runs: its next try stores the report, no restart
        assert wait_until(lambda: indexed(directory) == 2, 30), caplog.text
    finally:
        archive.stop()
    assert {r.report_id for r in find(directory)} == {held.report_id, later.report_id}
    row, _ = lookup(directory, later.report_id)
    assert row is not None and row.path == month_link / f"{later.report_id}.json"
    assert row.path.read_bytes() == later_envelope
    assert list(outside.iterdir()) == []
    assert f"storing again: report {later.report_id} stored after" in caplog.text


def test_a_hold_is_said_again_when_its_reason_changes_and_not_at_each_try(
        tmp_path: Path, persistent_broker: MosquittoBroker, caplog: pytest.LogCaptureFixture) -> None:
    """The link is replaced by a plain file of the station's name: still held, now for another reason,
    which is said (it was not: the first ERROR stood for the whole hold); each reason once."""
    directory, outside = tmp_path / "archive", tmp_path / "elsewhere"
    directory.mkdir()
    outside.mkdir()
    station_folder = directory / STATION
    station_folder.symlink_to(outside)
    report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    caplog.set_level(logging.INFO)
    archive = InProcessArchive(persistent_broker.port, directory)
    try:
        publish(persistent_broker.port, envelope_of(report))
        assert wait_until(lambda: archive.daemon.counts["retried"] >= 3, 30), caplog.text
        station_folder.unlink()
        station_folder.write_text("not a folder\n")
        tries = archive.daemon.counts["retried"]
        assert wait_until(lambda: archive.daemon.counts["retried"] >= tries + 3, 30), caplog.text
        station_folder.unlink()
        assert wait_until(lambda: indexed(directory) == 1, 30), caplog.text
    finally:
        archive.stop()
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(said) == 2, said
    assert "LinkOutOfArchive" in said[0] and "FileExistsError" in said[1] and str(station_folder) in said[1]


def test_a_report_coming_again_while_its_archived_copy_is_gone_is_not_written_through_a_link(
        tmp_path: Path) -> None:
    """Its file gone because the station's folder is now a link leading out: the copy was written
    there, outside the archive; now it is held (LinkOutOfArchive, an OSError)."""
    report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    store = ArchiveStore(tmp_path / "archive")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    try:
        store.put_report(read_report(STATION, envelope_of(report)))
        shutil.rmtree(tmp_path / "archive" / STATION)
        (tmp_path / "archive" / STATION).symlink_to(outside)
        with pytest.raises(LinkOutOfArchive, match="is a symbolic link to"):
            store.put_report(read_report(STATION, envelope_of(report)))
        with pytest.raises(LinkOutOfArchive):  # a bundle going beside its report too
            store.put_bundle(read_bundle(STATION, json.dumps(report_bundle(report)).encode()))
    finally:
        store.close()
    assert list(outside.rglob("*")) == []


def test_a_link_of_a_reports_file_name_leading_out_is_not_written_through(tmp_path: Path) -> None:
    """A symbolic link put by hand where the report's file goes (`<station>/<month>/<id>.json`), leading
    out of the archive: the report is held (LinkOutOfArchive, an OSError: the daemon tries again and
    does not acknowledge), not refused as a path outside the archive (acknowledged, so lost), and the
    file the link leads to is left as it was."""
    report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    store = ArchiveStore(tmp_path / "archive")
    target = tmp_path / "elsewhere.json"
    target.write_bytes(b"not the archive's\n")
    try:
        folder = tmp_path / "archive" / STATION / "2026-11"
        folder.mkdir(parents=True)
        (folder / f"{report.report_id}.json").symlink_to(target)
        with pytest.raises(LinkOutOfArchive, match=f"is a symbolic link to {target}, outside the archive"):
            store.put_report(read_report(STATION, envelope_of(report)))
        assert store.report_count() == 0
    finally:
        store.close()
    assert target.read_bytes() == b"not the archive's\n"


def test_a_file_of_a_reports_name_that_cannot_be_read_is_kept_and_the_report_stored_beside_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Something of the report's file name that is in no index row and cannot be read as a file (here a
    folder: IsADirectoryError, as a mode-000 file gives PermissionError): the report goes beside it as
    `<id>+<digest>.json`, indexed and said at ERROR; what was there is not replaced."""
    report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    envelope = envelope_of(report)
    squatter = tmp_path / "archive" / STATION / "2026-11" / f"{report.report_id}.json"
    squatter.mkdir(parents=True)
    (squatter / "kept.txt").write_text("kept\n")
    store = ArchiveStore(tmp_path / "archive")
    try:
        with caplog.at_level(logging.ERROR, logger="smearscope.service.archive.store"):
            stored = store.put_report(read_report(STATION, envelope))
    finally:
        store.close()
    assert stored.new and stored.path.name == f"{report.report_id}+{hashlib.sha256(envelope).hexdigest()[:16]}.json"
    assert stored.path.read_bytes() == envelope and (squatter / "kept.txt").read_text() == "kept\n"
    row, _ = lookup(tmp_path / "archive", report.report_id)
    assert row is not None and row.path == stored.path
    assert [r.getMessage() for r in caplog.records if "cannot be read (IsADirectoryError" in r.getMessage()]


def test_a_leftover_temporary_file_under_a_folder_linked_out_is_not_removed(tmp_path: Path) -> None:
    """At start the archive removes the temporary files an interrupted write left in its month folders,
    but not one under a station folder that is a link leading out: that file is not the archive's."""
    outside = tmp_path / "elsewhere"
    (outside / "2026-11").mkdir(parents=True)
    foreign = outside / "2026-11" / ".someone-elses.json.x1y2.tmp"
    foreign.write_text("someone else's\n")
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / STATION).symlink_to(outside)
    own = tmp_path / "archive" / "bench-2" / "2026-11" / ".left.json.a1b2.tmp"
    own.parent.mkdir(parents=True)
    own.write_text("interrupted\n")
    ArchiveStore(tmp_path / "archive").close()
    assert foreign.read_text() == "someone else's\n"
    assert not own.exists()  # the archive's own leftover goes


def test_a_copy_with_other_content_is_stored_beside_the_first_and_the_first_kept(tmp_path: Path) -> None:
    """The same report id with other content (another message id) was acknowledged and dropped, its
    bundle too with no word; now each goes beside the first as <id>+<digest>, once per content."""
    report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    first, second = envelope_of(report), envelope_of(report)
    bundle = json.dumps(report_bundle(report)).encode()
    other_bundle = json.dumps({**report_bundle(report), "id": "another"}).encode()
    store = ArchiveStore(tmp_path / "a")
    try:
        kept = store.put_report(read_report(STATION, first))
        again = store.put_report(read_report(STATION, second))
        assert store.put_report(read_report(STATION, second)).path == again.path  # one file per content
        kept_bundle = store.put_bundle(read_bundle(STATION, bundle))
        other = store.put_bundle(read_bundle(STATION, other_bundle))
    finally:
        store.close()
    assert not again.new and again.path.name == f"{report.report_id}+{hashlib.sha256(second).hexdigest()[:16]}.json"
    assert kept.path.read_bytes() == first and again.path.read_bytes() == second
    assert other.path.name.endswith(".fhir.json") and other.path.read_bytes() == other_bundle
    assert kept_bundle.path.read_bytes() == bundle
    row, bundle_path = lookup(tmp_path / "a", report.report_id)
    assert row is not None and row.path == kept.path and bundle_path == kept_bundle.path  # the index: the first
    assert len(list((tmp_path / "a").rglob(f"{report.report_id}*"))) == 4


def test_a_report_whose_file_name_is_another_records_file_does_not_replace_it(tmp_path: Path) -> None:
    """Report `<id>.fhir` is written as `<id>.fhir.json`, the name of report <id>'s FHIR bundle: it
    replaced the bundle (acknowledged, and the bundle lost). Now it goes beside it and both are found."""
    report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    twin = a_report("run-1", SPECIMEN, 1_796_000_001.0).model_copy(update={"report_id": f"{report.report_id}.fhir"})
    bundle = json.dumps(report_bundle(report)).encode()
    store = ArchiveStore(tmp_path / "a")
    try:
        store.put_report(read_report(STATION, envelope_of(report)))
        assert store.put_bundle(read_bundle(STATION, bundle)).new
        stored_twin = store.put_report(read_report(STATION, envelope_of(twin)))
    finally:
        store.close()
    assert stored_twin.new and stored_twin.path.name.startswith(f"{twin.report_id}+")
    _, bundle_path = lookup(tmp_path / "a", report.report_id)
    assert bundle_path is not None and bundle_path.read_bytes() == bundle
    twin_row, _ = lookup(tmp_path / "a", twin.report_id)
    assert twin_row is not None and json.loads(twin_row.path.read_bytes())["report_id"] == twin.report_id


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder `nobody` can enter (pytest's own are root's alone)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the archive as a user that file permissions bind")
    path = Path(tempfile.mkdtemp(prefix="smearscope-archive-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def test_a_report_coming_again_while_its_archived_file_cannot_be_read_is_stored_beside_it(
        open_dir: Path, persistent_broker: MosquittoBroker) -> None:
    """The archive (as nobody) cannot read the file it archived first (mode 000): it tried again every
    5 s for ever, and the reports behind it waited. Now the copy received is stored beside it, said at
    ERROR once, acknowledged, and the next report is stored; `archive show` names the copy."""
    directory = open_dir / "archive"
    directory.mkdir()
    os.chown(directory, 65534, 65534)
    password = open_dir / "password"
    password.write_text(MQTT_USERS["observer"] + "\n")
    password.chmod(0o644)
    log = open_dir / "archive.log"
    argv = [*NOBODY, sys.executable, "-m", "smearscope", "--log-level", "INFO", "archive", "--broker",
            f"mqtt://127.0.0.1:{persistent_broker.port}", "--username", "observer", "--password-file",
            str(password), "--dir", str(directory)]
    first, after = a_report("run-1", SPECIMEN, 1_796_000_000.0), a_report("run-2", SPECIMEN, 1_796_000_100.0)
    envelope = envelope_of(first)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        if not wait_until(lambda: "connected to broker" in log.read_text() or proc.poll() is not None, 30) \
                or proc.poll() is not None:
            pytest.skip(f"nobody cannot run the archive from this checkout here: {log.read_text()[-300:]}")
        publish(persistent_broker.port, envelope)
        assert wait_until(lambda: indexed(directory) == 1, 30), log.read_text()
        kept = directory / STATION / "2026-11" / f"{first.report_id}.json"
        kept.chmod(0o000)
        publish(persistent_broker.port, envelope, envelope_of(after))  # a repeated delivery, then the next
        assert wait_until(lambda: indexed(directory) == 2, 30), log.read_text()
    finally:
        proc.terminate()
        proc.wait(20)
    text = log.read_text()
    copy = kept.with_name(f"{first.report_id}+{hashlib.sha256(envelope).hexdigest()[:16]}.json")
    assert copy.read_bytes() == envelope and kept.read_bytes() == envelope  # (root reads the mode-000 file)
    said = [line for line in text.splitlines() if f"its archived copy {kept} cannot be read" in line]
    assert len(said) == 1 and "ERROR" in said[0] and "PermissionError" in said[0], text
    assert f"stored beside it as {copy.name} and acknowledged" in said[0]
    assert "NOT acknowledged" not in text
    show = subprocess.run([*NOBODY, sys.executable, "-m", "smearscope", "archive", "show", first.report_id, "--dir",
                           str(directory)], capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert show.returncode == 1 and "Traceback" not in show.stderr, show.stderr
    assert f"cannot read the report {first.report_id} at {kept} (Permission denied); copies received later: " \
        f"{copy}" in show.stderr
