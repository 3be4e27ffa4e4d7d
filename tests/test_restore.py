"""A station's state directory backed up and restored, as a clinic's IT restores it onto a new
board: a watched-folder station with a real mosquitto, its state copied back by root."""

from __future__ import annotations

import json
import os
import pickle
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import pytest
from broker import MQTT_USERS, MosquittoBroker, Subscriber, wait_until
from test_daemon import STATION, oracle_pool, write_station
from test_daemon_faults import _DAEMON_CHILD, REPO, DaemonProcess

from smearscope.device.synthetic import render_field
from smearscope.service.config import load_config
from smearscope.service.station.typed_cells import typed_cells_path

pytestmark = [pytest.mark.broker, pytest.mark.faults]


def _png(seed: int) -> bytes:
    ok, data = cv2.imencode(".png", render_field(seed, width=256, height=192).frame.pixels)
    assert ok
    return data.tobytes()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder other users can enter (pytest's own tmp folders are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="smearscope-restore-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _as_station_user() -> tuple[list[str], str]:
    """The command prefix that runs a child as another user than the one owning the restored
    files, and that user's name: `nobody` under root; this user itself otherwise (the restored
    files are then made read-only for it instead)."""
    if os.geteuid() != 0:
        return [], pwd.getpwuid(os.geteuid()).pw_name
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run the station as another user than root")
    nobody = pwd.getpwnam("nobody")
    return ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"], "nobody"


def _credentials_state_and_pool(open_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path, Path]:
    """In open_dir: a credentials folder with the station's broker password, set as
    $CREDENTIALS_DIRECTORY (one the station's user can read); the state folder with its inbox; the
    oracle pool pickled. Returns the credentials folder, the state folder, the inbox and the pool."""
    credentials = open_dir / "credentials"
    credentials.mkdir()
    (credentials / "mqtt-password").write_text(MQTT_USERS["station"] + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    state = open_dir / "state"
    inbox = state / "inbox"
    inbox.mkdir(parents=True)
    pool = open_dir / "pool.pkl"
    pool.write_bytes(pickle.dumps(list(oracle_pool())))
    return credentials, state, inbox, pool


def _folder_source(inbox: Path) -> dict[str, object]:
    """A watched-folder [source] on inbox that picks files up at once."""
    return {"kind": "folder", "path": str(inbox), "poll_interval_s": 0.05, "settle_s": 0.0,
            "decode_grace_s": 0.0, "microns_per_pixel": 0.2}


def test_a_state_restored_by_root_is_refused_naming_the_files_and_the_chown_then_starts_as_it_was(
    open_dir: Path, monkeypatch: pytest.MonkeyPatch, broker_with: Callable[..., MosquittoBroker],
) -> None:
    """The state of a station with a run open is copied back by root (`cp -r`: root's files, mode
    0644). The station's user may read them, not write them: the start exits 78 naming the files,
    their owner and mode and the chown to run, and changes nothing; after that chown it starts and
    takes the run back."""
    prefix, user = _as_station_user()
    credentials, state, inbox, pool = _credentials_state_and_pool(open_dir, monkeypatch)
    broker = broker_with()
    source = _folder_source(inbox)
    config = write_station(open_dir, broker.port, source=source,
                           specimen={"target_wbc_count": 1000, "idle_timeout_s": 600.0})
    first = DaemonProcess(config, pool)
    for i in range(3):
        (inbox / f"f{i}.png").write_bytes(_png(3000 + i))
    assert wait_until(lambda: len(first.stored()) >= 3 and not any(inbox.glob("*.png")), 30), first.lines[-20:]
    first.signal(signal.SIGKILL)  # the board dies with the run open
    first.wait(10)
    backup = open_dir / "backup"
    shutil.copytree(state, backup)
    shutil.rmtree(state)
    subprocess.run(["cp", "-r", str(backup), str(state)], check=True)  # restored by root
    if prefix:
        for p in (credentials, credentials / "mqtt-password", state):
            os.chown(p, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)  # as systemd leaves them
    else:
        for p in state.rglob("*"):
            p.chmod(p.stat().st_mode & ~0o222)
    before = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}

    code = _DAEMON_CHILD.format(repo=str(REPO), tests=str(REPO / "tests"))
    command = [*prefix, sys.executable, "-c", code, str(config), str(pool)]
    refused = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 78, refused.stderr[-3000:]
    said = refused.stderr
    assert "Traceback" not in said, said[-3000:]
    assert "mqtt.outbox.path: " in said and f"{state / 'outbox.sqlite3'} (owner " in said, said
    assert f"cannot be read and written by user {user}" in said, said
    if prefix:
        assert "owner root:root, mode 0644" in said, said
    assert f"chown {user}:" in said and f" {state / 'outbox.sqlite3'} " in said, said
    assert "review.directory: " in said and "source.path: " in said, said
    assert {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} == before  # nothing changed

    if prefix:  # the chowns the station named, as printed
        for line in said.splitlines():
            subprocess.run(line.split("Give them back to it: sudo ")[1].split(), check=True)
    else:
        for p in state.rglob("*"):
            p.chmod(p.stat().st_mode | 0o200)
    again = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        assert again.stderr is not None
        for line in again.stderr:
            lines.append(line)
            if "resumed: left open by the previous process" in line:
                break
        assert any("resumed: left open by the previous process" in ln and "3 fields" in ln for ln in lines), lines
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(60) == 0


def test_a_review_folder_restored_by_root_is_said_with_its_chown_and_the_station_runs_without_it(
    open_dir: Path, monkeypatch: pytest.MonkeyPatch, broker_with: Callable[..., MosquittoBroker],
) -> None:
    """Only the review folder came back as root's (mode 0750: the station's user cannot even
    enter it). The station starts, says at ERROR which folder and the chown, and runs on without
    its gallery (as with any review folder it cannot write), not a traceback at every restart."""
    prefix, user = _as_station_user()
    credentials, state, inbox, pool = _credentials_state_and_pool(open_dir, monkeypatch)
    broker = broker_with()
    try:
        source = _folder_source(inbox)
        config = write_station(open_dir, broker.port, source=source)
        first = DaemonProcess(config, pool)
        (inbox / "f0.png").write_bytes(_png(3100))
        assert wait_until(lambda: len(first.stored()) >= 1 and not any(inbox.glob("*.png")), 30), first.lines[-20:]
        first.signal(signal.SIGTERM)
        assert first.wait(60) == 0
        review = state / "review"
        assert (review / "gallery.sqlite").exists()
        if prefix:
            uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
            for p in (credentials, credentials / "mqtt-password", *[state, *state.rglob("*")]):
                if review not in (p, *p.parents):
                    os.chown(p, uid, gid)
            review.chmod(0o750)  # root's, as restored
        else:
            review.chmod(0o000)
        code = _DAEMON_CHILD.format(repo=str(REPO), tests=str(REPO / "tests"))
        again = subprocess.Popen([*prefix, sys.executable, "-c", code, str(config), str(pool)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        try:
            assert again.stderr is not None
            for line in again.stderr:
                lines.append(line)
                if " ready (" in line:
                    break
        finally:
            again.send_signal(signal.SIGTERM)
            again.communicate(timeout=60)
        log = "".join(lines)
        assert again.returncode == 0, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        assert "ERROR smearscope.service.station.state_access: review.directory: 1 of the station's files" in log, log
        assert f"chown -R {user}:" in log and f" {review} (the station runs without them)" in log, log
    finally:
        if not prefix:
            (state / "review").chmod(0o750)


def _retained_run_error(lines: list[str]) -> list[str]:
    return [ln for ln in lines if "ERROR smearscope.service.mqtt.run_watch" in ln]


def _said_a_run_its_state_lacks(config: Path, pool: Path) -> tuple[DaemonProcess, list[str]]:
    """A station process started, then stopped (SIGTERM, exit 0) once it said at ERROR that the broker
    holds a run its state lacks; the process and those ERROR lines."""
    process = DaemonProcess(config, pool)
    try:
        assert wait_until(lambda: bool(_retained_run_error(process.lines)), 30), process.lines[-20:]
    finally:
        process.signal(signal.SIGTERM)
        assert process.wait(60) == 0
    return process, _retained_run_error(process.lines)


def test_an_older_backup_restored_is_said_with_the_runs_it_lacks(
        tmp_path: Path, credentials_dir: Path, broker_with: Callable[..., MosquittoBroker]) -> None:
    """A station's state saved with a run open (5 fields); the station goes on (that run completes
    with 10 fields, the next too, a third is open with 5) and dies. The saved state, restored and
    started past the idle timeout, closes its open run again with the 5 fields it holds (end
    reason restart, a new report id); the station says at ERROR that the broker holds a run its
    state lacks, open there (no specimen report will come for it), numbered after every run the state
    numbered (run 3 against its run 1), so the run it closed was reported whole there: that 5-field report is held, not
    received (status counts it parked). Its ordinary restarts say nothing of the kind."""
    inbox = tmp_path / "state" / "inbox"
    inbox.mkdir(parents=True)
    pool = tmp_path / "pool.pkl"
    pool.write_bytes(pickle.dumps(list(oracle_pool())))
    broker = broker_with(persistence=True)
    idle_s = 3.0
    started: list[DaemonProcess] = []  # killed at the end whatever failed: none left running
    try:
        source = _folder_source(inbox)
        config = write_station(tmp_path, broker.port, source=source,
                               specimen={"target_wbc_count": 40, "idle_timeout_s": idle_s})
        first = DaemonProcess(config, pool)
        started.append(first)
        for i in range(5):
            (inbox / f"f{i:02d}.png").write_bytes(_png(3200 + i))
        assert wait_until(lambda: len(first.stored()) >= 5 and not any(inbox.glob("*.png")), 30), first.lines[-20:]
        first.signal(signal.SIGKILL)
        first.wait(10)
        shutil.copytree(tmp_path / "state", tmp_path / "backup")  # the state as it was saved
        went_on = DaemonProcess(config, pool)
        started.append(went_on)
        for i in range(5, 25):
            (inbox / f"f{i:02d}.png").write_bytes(_png(3200 + i))
        assert wait_until(lambda: not any(inbox.glob("*.png")) and len(went_on.stored()) >= 22, 60), went_on.lines[-20:]
        # its third run's state at 5 fields reaches the broker (a run state goes out after the field it counts)
        watch = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"smearscope/{STATION}/run"])
        try:
            watch.wait_ready()
            assert watch.wait_for(lambda ms: any(
                (s := json.loads(m.payload))["state"] == "open" and s["progress"]["fields"] == 5 for m in ms), 30)
        finally:
            watch.close()
        went_on.signal(signal.SIGKILL)  # the board dies with a third run open
        went_on.wait(10)
        runs = [ln.split("specimen run ")[1].split()[0] for ln in went_on.lines if " started (auto" in ln]
        assert len(runs) == 2, went_on.lines  # the saved run went on, then two more began
        closed_whole = [ln.split("run=")[1].split()[0] for ln in went_on.lines if "stored report message" in ln]
        assert len(closed_whole) == 2, went_on.lines
        assert not _retained_run_error(went_on.lines)  # an ordinary restart: its own state, nothing said
        time.sleep(idle_s + 1)

        shutil.rmtree(tmp_path / "state")
        shutil.copytree(tmp_path / "backup", tmp_path / "state")  # onto the replacement board
        saved_run = closed_whole[0]  # the run open in the saved state, closed whole by the station that went on
        base = f"smearscope/{STATION}"
        observer = Subscriber(broker.port, "observer", MQTT_USERS["observer"],
                              [f"{base}/report", f"{base}/cmd_response/status"])
        try:
            observer.wait_ready()
            restored = DaemonProcess(config, pool)
            started.append(restored)
            try:
                assert wait_until(lambda: bool(_retained_run_error(restored.lines)), 30), restored.lines[-20:]

                def parked() -> int:  # the status command's count of messages parked in the outbox
                    before = len(observer.on_topic(f"{base}/cmd_response/status"))
                    observer.client.publish(f"{base}/cmd/status", b"{}", qos=1)
                    if not observer.wait_for(lambda ms: sum(m.topic == f"{base}/cmd_response/status"
                                                            for m in ms) > before, 5):
                        return 0  # asked before the station subscribed to its commands: asked again
                    answer = json.loads(observer.on_topic(f"{base}/cmd_response/status")[-1].payload)
                    return int((answer.get("broker") or {}).get("parked", 0))

                shorter = lambda: [m for m in observer.on_topic(f"{base}/report")
                                   if json.loads(m.payload)["body"].get("run_id") == saved_run]
                assert wait_until(lambda: bool(shorter()) or parked() >= 2, 30), restored.lines[-20:]
                assert not shorter(), "the 5-field report of the run the backup left open went out again"
            finally:
                restored.signal(signal.SIGTERM)
                assert restored.wait(60) == 0
        finally:
            observer.close()
        said = _retained_run_error(restored.lines)
        assert len(said) == 1, said
        again = [ln for ln in restored.lines if "stored report message" in ln and f"run={saved_run}" in ln]
        assert again and "closed: restart" in again[0], restored.lines  # closed again, shorter: held
        assert f"the broker holds run {runs[1]} of station " in said[0] and "(open, 5 fields, updated " in said[0]
        assert "this station's state does not hold it" in said[0]
        assert f"run {runs[1]} is open there: this station will send no specimen report for it" in said[0]
        assert (f"run {runs[1]} is run number 3 of this station, after every run this station's state numbered "
                f"(the latest, {saved_run}, is number 1; told by run numbers)") in said[0], said
        assert f"the runs it left open ({saved_run}) were closed there and reported" in said[0], said
        assert "are held: parked in the outbox, not sent and not deleted" in said[0], said

        # a new board under the same station id, started without a backup: its state holds no run
        shutil.rmtree(tmp_path / "state")
        inbox.mkdir(parents=True)
        _, said = _said_a_run_its_state_lacks(config, pool)
        # the restored one's run state was held: the broker still keeps the third run's, open
        assert f"the broker holds run {runs[1]} of station " in said[0], said
        assert "(open, 5 fields, updated " in said[0] and "does not hold it (it holds 0 runs)" in said[0], said
    finally:
        for daemon in started:
            daemon.signal(signal.SIGKILL)


def test_a_typed_cells_file_the_station_does_not_use_is_not_said(open_dir: Path) -> None:
    """With the review gallery off (or typing off) the station never opens its typed-cells file:
    one left from before, restored as root's, was said at ERROR at every start ('the station runs
    without them'). Said still where typing is on."""
    prefix, _ = _as_station_user()
    (open_dir / "state").mkdir()
    for typing in (False, True):
        config = write_station(open_dir, 1883, review={"enabled": True, "typing": typing})
        typed = typed_cells_path(load_config(config))
        typed.parent.mkdir(parents=True, exist_ok=True)
        typed.write_bytes(b"")
        typed.chmod(0o644 if prefix else 0o444)  # root's, or read-only for this user
        code = ("import sys; from smearscope.service.config import load_config; "
                "from smearscope.service.station.state_access import state_access_problems; "
                "print([f for f, _ in state_access_problems(load_config(sys.argv[1]))])")
        out = subprocess.run([*prefix, sys.executable, "-c", code, str(config)], capture_output=True, text=True,
                             cwd=REPO, check=True).stdout
        assert ("review.typed_cells_path" in out) is typing, out
