"""`smearscope archive` against a real mosquitto: reports a station publishes (its own publisher and
outbox) are stored once each, found by specimen, kept across a SIGKILLed archive and a restarted
broker, refused without harm when hostile, and left unacknowledged while the disk is full."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker import MQTT_USERS, MosquittoBroker, TlsMaterial, make_tls_material, wait_until
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from smallfs import fill, small_tmpfs

from smearscope.cli import main
from smearscope.service.analysis.report import ClassShare, Counts, Report, SizeStats, Verification
from smearscope.service.archive.message import read_report
from smearscope.service.archive.query import find, parse_since
from smearscope.service.archive.store import ArchiveStore
from smearscope.service.config.mqtt import MqttConfig
from smearscope.service.fhir.bundle import report_bundle
from smearscope.service.mqtt.outbox import NewMessage, Outbox
from smearscope.service.mqtt.publisher import MqttPublisher
from smearscope.service.station.clinic import FHIR_CONTENT_TYPE, FHIR_VERSION

STATION = "lab-7"
SPECIMEN = "H-2026-0412"
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.broker


def as_user(uid: int, work: Callable[[], str]) -> str:
    """What `work` says run in a process of user and group `uid` forked from this one, with no capability of
    root's left (its Python lies where that user may not read it, so no new interpreter), or the error it raised."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            said = work()
        except BaseException as exc:  # noqa: BLE001 - said to the parent
            said = f"{type(exc).__name__}: {exc}"
        os.write(write, said.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as said_back:
        out = said_back.read().decode()
    os.waitpid(child, 0)
    return out


def a_report(run_id: str, specimen_id: str | None, created_at: float, supersedes: str | None = None) -> Report:
    """A specimen report as a station makes one (verified: replacing `supersedes`)."""
    share = ClassShare(label="neutrophil", count=60, percent=60.0, ci95_low=50.0, ci95_high=69.0)
    verification = None if supersedes is None else Verification(
        verified_by="AB", verified_at=created_at, supersedes=supersedes, typed_cells=3, reclassified=[])
    return Report(report_id=str(uuid.uuid4()), kind="specimen", created_at=created_at, station_id=STATION,
                  run_id=run_id, specimen_id=specimen_id, fields_analyzed=12,
                  counts=Counts(rbc=1000, wbc=100, platelet=80), wbc_differential=[share], rbc_morphology=[],
                  rbc_size=SizeStats(n=900, mean_diameter_um=7.4, sd_um=0.6, cv_percent=8.1, median_diameter_um=7.3),
                  ratios={}, flags=[], cells=[], timing_ms={}, verification=verification)


class Station:
    """The station's own publisher and outbox, publishing reports and their FHIR bundles as the
    station does (one outbox transaction each)."""

    def __init__(self, tmp_path: Path, port: int) -> None:
        creds = tmp_path / "station-creds"
        creds.mkdir(exist_ok=True)
        (creds / "mqtt-password").write_text(MQTT_USERS["station"])
        config = MqttConfig(host="127.0.0.1", port=port, keepalive=5, username="station",
                            password_credential="mqtt-password", reconnect_min_delay_s=1, reconnect_max_delay_s=2,
                            outbox={"path": str(tmp_path / "outbox.sqlite3")})
        self.publisher = MqttPublisher(config, STATION, Outbox.from_config(config.outbox),
                                       environ={"CREDENTIALS_DIRECTORY": str(creds)})
        self.publisher.start()

    def publish(self, report: Report) -> None:
        fhir = NewMessage("report", f"smearscope/{STATION}/fhir",
                          json.dumps(report_bundle(report), separators=(",", ":")).encode(), report.report_id,
                          FHIR_VERSION, content_type=FHIR_CONTENT_TYPE)
        self.publisher.publish_many([("report", report.report_id, report.model_dump_json().encode(), "1.2")],
                                    extra=[fhir])

    def publish_until(self, run_id: str, at: float, reached: threading.Event) -> bool:
        """A report of `run_id` (made at `at`, a second later each time) published again until `reached`
        is set, 15 times at most: the first may come before the archive subscribes. Whether it was."""
        for attempt in range(15):
            self.publish(a_report(run_id, SPECIMEN, at + attempt))
            if reached.wait(2):
                break
        return reached.is_set()

    def delivered(self) -> bool:
        return self.publisher.outbox.counts().messages == 0

    def stop(self) -> None:
        self.publisher.stop(drain_timeout=0)
        self.publisher.outbox.close()


class Archive:
    """`smearscope archive` in its own process, logging to a file."""

    def __init__(self, tmp_path: Path, port: int, directory: Path) -> None:
        self.log = tmp_path / "archive.log"
        password = tmp_path / "archive-password"
        password.write_text(MQTT_USERS["observer"] + "\n")
        self.argv = [sys.executable, "-m", "smearscope", "--log-level", "INFO", "archive", "--broker",
                     f"mqtt://127.0.0.1:{port}", "--username", "observer", "--password-file", str(password),
                     "--dir", str(directory)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        # until the broker answered its subscriptions: a report published before is not sent to it
        answered = lambda: self.text().count("subscribed to ") + self.text().count("refused the archive's subscription")
        assert wait_until(lambda: answered() > self.starts, 30), self.text()
        self.starts += 1

    starts = 0

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@pytest.fixture
def parts(tmp_path: Path, persistent_broker: MosquittoBroker) -> Iterator[tuple[Station, Archive, Path]]:
    directory = tmp_path / "archive"
    archive = Archive(tmp_path, persistent_broker.port, directory)
    station = Station(tmp_path, persistent_broker.port)
    yield station, archive, directory
    archive.stop()
    station.stop()


def stored(directory: Path) -> list[Path]:
    """The report files in the archive (not their bundles)."""
    return sorted(p for p in directory.rglob("*.json") if not p.name.endswith(".fhir.json"))


def bundles(directory: Path) -> int:
    return len(list(directory.rglob("*.fhir.json")))


def indexed(directory: Path) -> int:
    return len(find(directory)) if (directory / "index.sqlite").exists() else 0


def test_reports_published_while_the_archive_runs_are_stored_and_found_by_specimen(
        parts: tuple[Station, Archive, Path], capsys: pytest.CaptureFixture[str]) -> None:
    station, archive, directory = parts
    archive.start()
    first = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    other = a_report("run-2", "H-2026-0413", 1_796_000_100.0)
    verified = a_report("run-1", SPECIMEN, 1_796_000_200.0, supersedes=first.report_id)
    for report in (first, other, verified):
        station.publish(report)
    assert wait_until(lambda: len(list(directory.rglob("*.fhir.json"))) == 3 and indexed(directory) == 3, 30), \
        archive.text()
    month = directory / STATION / "2026-11"  # 1_796_000_000 is 2026-11-30 UTC
    assert sorted(p.name for p in month.iterdir()) == sorted(
        [f"{r.report_id}.json" for r in (first, other, verified)] + [f"{r.report_id}.fhir.json" for r in
                                                                     (first, other, verified)])

    assert main(["archive", "find", "--specimen", SPECIMEN, "--dir", str(directory), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["report_id"], r["verified"], r["superseded_by"]) for r in lines] == [
        (verified.report_id, True, None), (first.report_id, False, verified.report_id)]
    assert lines[0]["specimen_id"] == SPECIMEN and lines[0]["run_id"] == "run-1" and lines[0]["station"] == STATION

    assert main(["archive", "show", verified.report_id, "--dir", str(directory)]) == 0
    envelope = json.loads(capsys.readouterr().out)
    assert envelope["kind"] == "report" and envelope["station_id"] == STATION
    assert Report.model_validate(envelope["body"]) == verified
    assert main(["archive", "show", verified.report_id, "--dir", str(directory), "--fhir"]) == 0
    assert json.loads(capsys.readouterr().out) == report_bundle(verified)
    assert main(["archive", "find", "--specimen", "H-0000", "--dir", str(directory)]) == 1


def test_an_archive_killed_and_restarted_with_a_broker_restart_loses_none_and_stores_none_twice(
        parts: tuple[Station, Archive, Path], persistent_broker: MosquittoBroker) -> None:
    station, archive, directory = parts
    archive.start()
    reports = [a_report(f"run-{i}", f"S-{i}", 1_796_000_000.0 + i) for i in range(40)]
    for report in reports[:20]:
        station.publish(report)
    assert wait_until(lambda: indexed(directory) >= 3, 30), archive.text()
    archive.kill()  # mid-stream: some of the 20 stored, maybe one written and not acknowledged
    for report in reports[20:]:
        station.publish(report)
    assert wait_until(station.delivered, 30)  # the broker took all 40; the archive is away
    persistent_broker.stop()
    persistent_broker.start()  # what it queued for the archive's session comes back from its file
    archive.start()
    assert wait_until(lambda: indexed(directory) == 40, 60), archive.text()
    assert "session resumed" in archive.text().rsplit("connected to broker", 1)[1]
    assert wait_until(lambda: len(list(directory.rglob("*.fhir.json"))) == 40, 30)
    assert [p.stem for p in stored(directory)] == sorted(r.report_id for r in reports)
    assert not list(directory.rglob("*.tmp"))


def test_a_report_delivered_twice_is_stored_once(parts: tuple[Station, Archive, Path],
                                                  persistent_broker: MosquittoBroker) -> None:
    _, archive, directory = parts
    archive.start()
    report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    envelope = json.dumps({"envelope_version": 1, "kind": "report", "station_id": STATION,
                           "report_id": report.report_id, "message_id": uuid.uuid4().hex, "schema_version": "1.2",
                           "created_at": "2026-11-30T00:00:00+00:00", "body": json.loads(report.model_dump_json())})
    with raw_client(persistent_broker.port) as client:  # as the outbox sends it again after a lost PUBACK
        for _ in range(2):
            client.publish(f"smearscope/{STATION}/report", envelope, qos=1).wait_for_publish(10)
    assert wait_until(lambda: "was archived already" in archive.text(), 30), archive.text()
    assert [p.name for p in stored(directory)] == [f"{report.report_id}.json"]
    assert stored(directory)[0].read_text() == envelope
    assert indexed(directory) == 1


class raw_client:
    """A paho client logged in as the station, publishing whatever it is given."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.username_pw_set("station", MQTT_USERS["station"])
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def __enter__(self) -> mqtt.Client:
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_hostile_messages_are_refused_and_nothing_is_written_outside_the_archive(
        parts: tuple[Station, Archive, Path], persistent_broker: MosquittoBroker, tmp_path: Path) -> None:
    _, archive, directory = parts
    archive.start()
    before = {p for p in tmp_path.rglob("*") if "broker" not in p.parts}

    def envelope(station: str, report_id: str, **body: object) -> bytes:
        doc = {"report_id": report_id, "kind": "specimen", "created_at": 1_796_000_000.0, **body}
        return json.dumps({"envelope_version": 1, "kind": "report", "station_id": station, "report_id": report_id,
                           "message_id": "m", "schema_version": "1.2", "created_at": "x", "body": doc}).encode()

    hostile = [
        ("smearscope/../report", envelope("..", "r-1")),  # a station id that is a path
        (f"smearscope/{STATION}/report", envelope(STATION, "../../../escaped")),
        (f"smearscope/{STATION}/report", envelope(STATION, str(tmp_path / "escaped-absolute"))),
        (f"smearscope/{STATION}/report", envelope(STATION, "r-2", verification={"supersedes": "../escaped"})),
        (f"smearscope/{STATION}/report", envelope("lab-8", "r-3")),  # another station's name
        (f"smearscope/{STATION}/report", b"\xff\xfe not json"),
        (f"smearscope/{STATION}/report", b"[1, 2]"),
        (f"smearscope/{STATION}/report", envelope(STATION, "r-4", created_at="yesterday")),
        (f"smearscope/{STATION}/report", b'{"body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        (f"smearscope/{STATION}/report", b'"' + b"x" * (5 * 2**20) + b'"'),  # over the 4 MiB limit
        (f"smearscope/{STATION}/fhir", json.dumps({"resourceType": "Bundle", "timestamp": "2026-11-30T00:00:00Z",
                                                   "identifier": {"system": "http://smearscope.invalid/fhir/"
                                                                  "NamingSystem/report-id",
                                                                  "value": "../escaped"}}).encode()),
        ("smearscope/lab 7\u202e/fhir", b"{}"),
        # each of these stopped the archive (and stopped it again at every restart, since it is
        # never acknowledged): a lone surrogate the UTF-8 index cannot hold, a timestamp at the
        # calendar's edge, and a trailing newline that `$` let through into a file name
        (f"smearscope/{STATION}/report", envelope(STATION, "r-5", specimen_id="\ud800")),
        (f"smearscope/{STATION}/fhir", json.dumps({"resourceType": "Bundle", "timestamp": "0001-01-01T00:00:00+01:00",
                                                   "identifier": {"system": "http://smearscope.invalid/fhir/"
                                                                  "NamingSystem/report-id",
                                                                  "value": "r-6"}}).encode()),
        (f"smearscope/{STATION}/report", envelope(STATION, "r-7\n")),
    ]
    good = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    with raw_client(persistent_broker.port) as client:
        for topic, payload in hostile:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
        client.publish(f"smearscope/{STATION}/report", envelope(STATION, good.report_id), qos=1).wait_for_publish(10)
    assert wait_until(lambda: indexed(directory) == 1, 30), archive.text()
    assert archive.proc is not None and archive.proc.poll() is None
    assert archive.text().count("refused a message on") == len(hostile), archive.text()
    assert [p.name for p in stored(directory)] == [f"{good.report_id}.json"]
    after = {p for p in tmp_path.rglob("*") if "broker" not in p.parts}
    assert {p for p in after - before if not p.is_relative_to(directory)} == set()
    assert not [p for p in tmp_path.rglob("*escaped*")]


def test_a_full_disk_leaves_the_report_unacknowledged_and_it_is_stored_once_space_returns(
        tmp_path: Path, persistent_broker: MosquittoBroker) -> None:
    with small_tmpfs(tmp_path / "archive", 2048) as directory:
        archive = Archive(tmp_path, persistent_broker.port, directory)
        station = Station(tmp_path, persistent_broker.port)
        try:
            archive.start()
            reports = [a_report(f"run-{i}", f"S-{i}", 1_796_000_000.0 + i) for i in range(3)]
            station.publish(reports[0])
            assert wait_until(lambda: indexed(directory) == 1 and bundles(directory) == 1, 30), archive.text()
            filler = fill(directory)
            station.publish(reports[1])
            assert wait_until(lambda: f"report {reports[1].report_id} from" in archive.text(), 30)
            assert "NOT acknowledged" in archive.text().split(f"report {reports[1].report_id} from", 1)[1]
            archive.kill()  # had it acknowledged before storing, the report would be gone now
            filler.unlink()
            archive.start()
            assert wait_until(lambda: indexed(directory) == 2, 30), archive.text()

            refusals = archive.text().count("NOT acknowledged")
            filler = fill(directory)
            station.publish(reports[2])
            assert wait_until(lambda: archive.text().count("NOT acknowledged") > refusals, 30), archive.text()
            filler.unlink()  # while it runs: its next try stores it
            assert wait_until(lambda: indexed(directory) == 3, 30), archive.text()
            assert "storing again" in archive.text()
            assert [p.stem for p in stored(directory)] == sorted(r.report_id for r in reports)
        finally:
            archive.stop()
            station.stop()


def test_a_flood_of_qos0_messages_while_the_disk_is_full_is_held_to_the_receive_maximum(
        tmp_path: Path, persistent_broker: MosquittoBroker) -> None:
    """The Receive Maximum bounds the QoS 1 messages waiting in memory; QoS 0 ones (a script on a
    station's account) came on without bound while the storer waited for room."""
    import threading

    from smearscope.service.archive.daemon import ArchiveDaemon
    from smearscope.service.config.archive import ArchiveConfig

    with small_tmpfs(tmp_path / "archive", 2048) as directory:
        config = ArchiveConfig(mqtt=MqttConfig(host="127.0.0.1", port=persistent_broker.port, username="observer",
                                               client_id="archive-flood"), directory=directory, retry_s=0.2)
        daemon = ArchiveDaemon(config, MQTT_USERS["observer"])
        runner = threading.Thread(target=daemon.run)
        runner.start()
        try:
            assert wait_until(lambda: daemon._connected, 30)
            with raw_client(persistent_broker.port) as client:  # one stored first: the subscriptions are made
                client.publish(f"smearscope/{STATION}/report", envelope_of(a_report("run-0", SPECIMEN, 1_796_000_000.0)),
                               qos=1).wait_for_publish(10)
            assert wait_until(lambda: indexed(directory) == 1, 30)
            filler = fill(directory)
            stuck = a_report("run-1", SPECIMEN, 1_796_000_000.0)
            flood = 200
            with raw_client(persistent_broker.port) as client:
                client.publish(f"smearscope/{STATION}/report", envelope_of(stuck), qos=1)
                for i in range(flood):
                    client.publish(f"smearscope/{STATION}/report",
                                   envelope_of(a_report("run-2", SPECIMEN, 1_796_000_001.0 + i)), qos=0)
                assert wait_until(lambda: daemon._incoming.qsize() + daemon.counts.get("dropped", 0) >= flood, 30), \
                    (daemon._incoming.qsize(), daemon.counts)
            assert daemon._incoming.qsize() <= config.receive_maximum
            filler.unlink()
            assert wait_until(lambda: indexed(directory) >= 2 and daemon._incoming.qsize() == 0, 30)
            assert stuck.report_id in {r.report_id for r in find(directory)}  # the QoS 1 report is kept
        finally:
            daemon.stop()
            runner.join(30)


def test_an_archive_started_by_hand_under_umask_022_writes_nothing_other_users_can_read(
        tmp_path: Path, persistent_broker: MosquittoBroker) -> None:
    """Started by hand, not by the unit (UMask=0027): the folders were 0755 and the reports 0644."""
    directory = tmp_path / "archive"
    archive = Archive(tmp_path, persistent_broker.port, directory)
    with open(archive.log, "ab") as out:
        archive.proc = subprocess.Popen(archive.argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, umask=0o022)
    try:
        assert wait_until(lambda: "connected to broker" in archive.text(), 30), archive.text()
        report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
        with raw_client(persistent_broker.port) as client:
            client.publish(f"smearscope/{STATION}/report", envelope_of(report), qos=1).wait_for_publish(10)
        assert wait_until(lambda: indexed(directory) == 1, 30), archive.text()
    finally:
        archive.stop()
    written = [directory, *directory.rglob("*")]
    assert len(written) >= 5  # the folder, the station's, the month's, the report, the index
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in written if p.stat().st_mode & 0o007} == {}


def test_a_session_the_broker_lost_is_said_also_when_the_archive_began_empty(tmp_path: Path) -> None:
    """An archive started on an empty folder stores reports; the broker (no persistence) restarts
    and no longer has its session: said as for an archive that began with reports."""
    mosquitto = MosquittoBroker(tmp_path / "broker", MQTT_USERS, persistence=False)
    mosquitto.start()
    archive = Archive(tmp_path, mosquitto.port, tmp_path / "archive")
    try:
        archive.start()
        with raw_client(mosquitto.port) as client:
            client.publish(f"smearscope/{STATION}/report", envelope_of(a_report("run-1", SPECIMEN, 1_796_000_000.0)),
                           qos=1).wait_for_publish(10)
        assert wait_until(lambda: indexed(tmp_path / "archive") == 1, 30), archive.text()
        mosquitto.stop()
        mosquitto.start()
        assert wait_until(lambda: archive.text().count("connected to broker") == 2, 30), archive.text()
        assert wait_until(lambda: "the broker had no session for smearscope-archive" in archive.text(), 5), \
            archive.text()
    finally:
        archive.stop()
        mosquitto.stop()


def test_the_archive_imports_no_training_framework() -> None:
    probe = ("import sys; from smearscope.cli import build_parser; build_parser(); "
             "import smearscope.cli.archive, smearscope.service.archive.daemon, smearscope.service.archive.query; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ultralytics', 'timm')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_command_line_mistakes_are_said_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    d = str(tmp_path / "a")
    assert main(["archive", "--dir", d]) == 2
    assert main(["archive", "--broker", "mqtts://h:8883", "--dir", d]) == 2
    assert main(["archive", "--broker", "mqtt://u:p@h:1883", "--dir", d]) == 2
    assert main(["archive", "--broker", "mqtt://h", "--password-file", d, "--dir", d]) == 2
    err = capsys.readouterr().err
    assert "--broker is needed" in err and "needs --ca-file" in err and "--username" in err
    assert not os.path.exists(d)
    # a CA file that is not there, or no certificate: a mistake (2, not restarted), not the folder's (1)
    not_a_ca = tmp_path / "not-a-ca.pem"
    not_a_ca.write_text("not a certificate\n")
    missing = str(tmp_path / "missing-ca.pem")
    assert main(["archive", "--broker", "mqtts://h:8883", "--ca-file", missing, "--dir", d]) == 2
    said = capsys.readouterr().err
    assert f"--ca-file {missing} cannot be read by user " in said and "cannot open the archive" not in said, said
    assert main(["archive", "--broker", "mqtts://h:8883", "--ca-file", str(not_a_ca), "--dir", d]) == 2
    said = capsys.readouterr().err
    assert f"cannot set up the broker connection with --ca-file {not_a_ca}: " in said, said
    assert "cannot open the archive" not in said
    # a user with no password (no --password-file, no credential): refused by the broker for ever
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert main(["archive", "--broker", "mqtt://h", "--username", "archive", "--dir", d]) == 2
    assert "--username archive needs its password: --password-file" in capsys.readouterr().err
    assert not os.path.exists(d)
    # a client certificate without its key, or a key alone: said with the options, before the folder
    for given in (["--certfile", str(not_a_ca)], ["--keyfile", str(not_a_ca)]):
        assert main(["archive", "--broker", "mqtts://h:8883", "--ca-file", str(not_a_ca), *given, "--dir", d]) == 2
        said = capsys.readouterr().err
        assert said == ("smearscope archive: --certfile and --keyfile go together (the archive's client certificate "
                        "and its key)\n"), said
    assert not os.path.exists(d)
    assert main(["archive", "show", "../x", "--dir", d]) == 2
    assert main(["archive", "find", "--dir", d]) == 1
    assert "no archive at" in capsys.readouterr().err


def test_a_tls_file_it_cannot_read_is_named_and_not_blamed_on_the_folder(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A --ca-file (or --certfile, --keyfile) the archive cannot read is said with the option and the
    path, exit 2 (the unit does not restart a mistake), before the archive folder is made; it was
    said as `cannot open the archive at DIR: [Errno 2] ...`, exit 1, retried every 10 s."""
    d = tmp_path / "a"
    ca = tmp_path / "missing-ca.crt"
    assert main(["archive", "--broker", "mqtts://127.0.0.1:8883", "--ca-file", str(ca), "--dir", str(d)]) == 2
    err = capsys.readouterr().err
    assert f"--ca-file {ca} cannot be read by user " in err and "No such file or directory" in err, err
    assert "cannot open the archive" not in err and not d.exists()
    ca.write_text("not read: the key is missing\n")
    key = tmp_path / "missing.key"
    assert main(["archive", "--broker", "mqtts://127.0.0.1:8883", "--ca-file", str(ca), "--certfile", str(ca),
                 "--keyfile", str(key), "--dir", str(d)]) == 2
    assert f"--keyfile {key} cannot be read" in capsys.readouterr().err and not d.exists()


def test_a_refused_login_is_said_with_what_to_check_and_retried(tmp_path: Path,
                                                                persistent_broker: MosquittoBroker) -> None:
    archive = Archive(tmp_path, persistent_broker.port, tmp_path / "archive")
    (tmp_path / "archive-password").write_text("not-the-password\n")
    archive.argv[archive.argv.index("--log-level") + 1] = "DEBUG"  # the retries after the first are at DEBUG
    with open(archive.log, "ab") as out:
        archive.proc = subprocess.Popen(archive.argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        assert wait_until(lambda: archive.text().count("refused the archive's connection") >= 2, 30), archive.text()
        assert "does not accept user 'observer' with this password" in archive.text()
        assert archive.proc.poll() is None  # still trying
    finally:
        archive.stop()


def test_two_archives_under_one_client_id_stop_taking_the_session_from_each_other(
        tmp_path: Path, persistent_broker: MosquittoBroker) -> None:
    """docs/ARCHIVE.md: one archive per client id on a broker. Two under one id take the session
    from each other (mosquitto closes the older one's connection, which sees only "Unspecified
    error"); both reconnecting at once, they did so about once a second for as long as both ran,
    each holding part of the session's queue. Now the first to see three connections in a row closed
    within 5 s of opening says at ERROR that the client id is taken over, once, and leaves the
    session to the other, which the broker then closes no more."""
    archives = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        archives.append(Archive(tmp_path / name, persistent_broker.port, tmp_path / name / "archive"))
    said = "MQTT client id 'smearscope-archive' taken over on broker"
    try:
        for archive in archives:
            archive.start()
        assert wait_until(lambda: any(said in a.text() for a in archives), 60), archives[0].text()[-3000:]
        stepped_back = [a for a in archives if said in a.text()]
        assert len(stepped_back) == 1 and stepped_back[0].text().count(said) == 1
        holder = archives[1] if stepped_back[0] is archives[0] else archives[0]
        connections = holder.text().count("connected to broker")
        # far shorter than the 60 s pause: before, each archive connected about 4 times in it
        assert not wait_until(lambda: holder.text().count("connected to broker") != connections, 8), holder.text()
        assert "Give each archive on a broker its own client id (--client-id)" in stepped_back[0].text()
    finally:
        for archive in archives:
            archive.stop()


def envelope_of(report: Report, station: str = STATION) -> bytes:
    return json.dumps({"envelope_version": 1, "kind": "report", "station_id": station, "report_id": report.report_id,
                       "message_id": uuid.uuid4().hex, "schema_version": "1.2", "created_at": "x",
                       "body": json.loads(report.model_dump_json())}).encode()


def test_find_lists_the_latest_run_first_and_in_a_run_the_report_that_supersedes_first(tmp_path: Path) -> None:
    """Stored out of order (a verified report before the one it replaces, runs mixed): find orders them."""
    old_first = a_report("run-old", SPECIMEN, 1_790_000_000.0)
    # signed on a clock that was behind the one that made the first: it still comes first in its run
    old_verified = a_report("run-old", SPECIMEN, 1_789_999_000.0, supersedes=old_first.report_id)
    new_first = a_report("run-new", SPECIMEN, 1_796_000_000.0)
    new_verified = a_report("run-new", SPECIMEN, 1_796_000_100.0, supersedes=new_first.report_id)
    again = a_report("run-new", SPECIMEN, 1_796_000_200.0, supersedes=new_verified.report_id)  # signed again
    elsewhere = a_report("run-x", "H-other", 1_797_000_000.0)
    store = ArchiveStore(tmp_path / "a")
    try:
        for report in (new_verified, old_first, elsewhere, again, old_verified, new_first):
            assert store.put_report(read_report(STATION, envelope_of(report))).new
        duplicate = store.put_report(read_report(STATION, envelope_of(again)))  # other message id: kept first
        assert not duplicate.new
    finally:
        store.close()
    found = find(tmp_path / "a", specimen=SPECIMEN)
    assert [(r.report_id, r.superseded_by) for r in found] == [
        (again.report_id, None), (new_verified.report_id, again.report_id), (new_first.report_id, new_verified.report_id),
        (old_verified.report_id, None), (old_first.report_id, old_verified.report_id)]
    assert [r.report_id for r in find(tmp_path / "a", since=parse_since("2026-11-30"))] == [
        elsewhere.report_id, again.report_id, new_verified.report_id, new_first.report_id]
    assert json.loads(found[0].path.read_bytes())["body"]["verification"]["supersedes"] == new_verified.report_id


def test_find_and_show_take_a_relative_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`archive find --dir a` and `archive show ID --dir a` from the folder above it (a copy of the
    archive looked at in place): they list and print, where they raised ValueError ("relative path
    can't be expressed as a file URI") with a traceback."""
    report = a_report("run-rel", SPECIMEN, 1_796_000_000.0)
    store = ArchiveStore(tmp_path / "a")
    try:
        assert store.put_report(read_report(STATION, envelope_of(report))).new
    finally:
        store.close()
    monkeypatch.chdir(tmp_path)
    assert main(["archive", "find", "--specimen", SPECIMEN, "--dir", "a"]) == 0
    assert report.report_id in capsys.readouterr().out
    assert main(["archive", "show", report.report_id, "--dir", "a"]) == 0
    assert json.loads(capsys.readouterr().out)["report_id"] == report.report_id


def test_the_archive_over_tls_checks_the_broker_against_its_ca_file(tmp_path: Path, tls_material: TlsMaterial) -> None:
    """mqtts:// with --ca-file, as systemd/smearscope-archive.service's example runs it; a broker
    certificate from another CA is refused, saying which file to check."""
    mosquitto = MosquittoBroker(tmp_path / "broker", MQTT_USERS, persistence=True, tls=tls_material)
    mosquitto.start()
    other_ca = make_tls_material(tmp_path / "other-ca", common_name="another-ca").ca_cert
    archive = Archive(tmp_path, mosquitto.port, tmp_path / "archive")
    at = archive.argv.index("--broker") + 1
    archive.argv[at:at + 1] = [f"mqtts://127.0.0.1:{mosquitto.tls_port}", "--ca-file", str(other_ca)]
    try:
        with open(archive.log, "ab") as out:
            archive.proc = subprocess.Popen(archive.argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        assert wait_until(lambda: f"is not signed by the CA in --ca-file {other_ca}" in archive.text(), 30), \
            archive.text()
        assert "connected to broker" not in archive.text()
        archive.stop()
        archive.argv[at + 2] = str(tls_material.ca_cert)
        archive.start()
        report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
        with raw_client(mosquitto.port) as client:
            client.publish(f"smearscope/{STATION}/report", envelope_of(report), qos=1).wait_for_publish(10)
        assert wait_until(lambda: indexed(tmp_path / "archive") == 1, 30), archive.text()
        assert f"connected to broker 127.0.0.1:{mosquitto.tls_port}" in archive.text()
    finally:
        archive.stop()
        mosquitto.stop()


def test_a_report_of_a_schema_version_the_archive_does_not_know_is_kept_and_said(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from smearscope.service.archive.message import KNOWN_SCHEMA_VERSIONS

    schema = json.loads((REPO / "schemas" / "report.schema.json").read_text())
    assert tuple(schema["properties"]["schema_version"]["enum"]) == KNOWN_SCHEMA_VERSIONS
    doc = json.loads(envelope_of(a_report("run-1", SPECIMEN, 1_796_000_000.0)))
    doc["schema_version"] = "2.0"  # from a newer station
    with caplog.at_level("WARNING"):
        message = read_report(STATION, json.dumps(doc).encode())
    assert message.schema_version == "2.0"
    assert "schema version '2.0', not one this archive knows" in caplog.text
