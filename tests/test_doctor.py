"""`smearscope doctor` says what a station lacks, and `install-models` puts the packaged models
where a config points, hashes checked (issue 18, item 12)."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from broker import (
    MQTT_USERS,
    MosquittoBroker,
    Mqtt311OnlyProxy,
    TlsMaterial,
    free_port,
    make_client_cert,
    make_issued_client_certs,
    make_tls_material,
)
from test_daemon import to_toml

from smearscope.cli import main
from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR


def _config(tmp_path: Path, port: int, models: Path, **mqtt: str) -> Path:
    path = tmp_path / "station.toml"
    path.write_text(to_toml({
        "station_id": "doc-1", "source": {"kind": "simulated"},
        "analysis": {"models_dir": str(models)},
        "mqtt": {"host": "127.0.0.1", "port": port, **mqtt,
                 "outbox": {"path": str(tmp_path / "state" / "outbox.sqlite3")}}}) + "\n")
    return path


@pytest.mark.broker
def test_doctor_passes_a_complete_station(tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """... and logs in as the station would: a password the broker refuses is a failure, not a
    TCP connection that looks fine."""
    login = {"username": "station", "password_credential": "mqtt-password"}
    assert main(["doctor", "--config", str(_config(tmp_path, broker.port, DEFAULT_MODELS_DIR, **login))]) == 0
    out = capsys.readouterr().out
    assert "OK    model segmentation" in out and f"127.0.0.1:{broker.port} accepts TCP" in out, out
    # every detail starts in one column: "model segmentation" and "calibration watch" overflowed a 16-wide one
    checks = [ln for ln in out.splitlines() if ln[:6].rstrip() in ("OK", "WARN", "FAIL", "INFO")]
    assert any(ln[6:].startswith("model segmentation") for ln in checks)
    assert all(ln[24] == " " and ln[25] != " " for ln in checks), [c for c in checks if c[24:26].startswith(" ") is False]
    assert f"OK    broker login       127.0.0.1:{broker.port} accepts user 'station'" in out, out
    credentials_dir.chmod(0o700)
    (credentials_dir / "wrong").write_text("not-the-password\n")
    wrong = {**login, "password_credential": "wrong"}
    assert main(["doctor", "--config", str(_config(tmp_path, broker.port, DEFAULT_MODELS_DIR, **wrong))]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  broker login       127.0.0.1:{broker.port} refuses user 'station': Not authorized" in out, out
    assert "the password in credential 'wrong' is not accepted: check them against the broker's password_file" in out
    assert main(["doctor", "--config", str(_config(tmp_path, broker.port, DEFAULT_MODELS_DIR))]) == 1  # anonymous
    assert "refuses anonymous" in capsys.readouterr().out
    # a broker that speaks MQTT 3.1.1 only: the station falls back to it (protocol "auto"), so does doctor
    proxy = Mqtt311OnlyProxy(broker.port)
    try:
        assert main(["doctor", "--config", str(_config(tmp_path, proxy.port, DEFAULT_MODELS_DIR, **login))]) == 0
        assert f"OK    broker login       127.0.0.1:{proxy.port} accepts user 'station'" in capsys.readouterr().out
        assert proxy.refused_v5 >= 1
    finally:
        proxy.close()


def test_doctor_names_what_is_missing_and_install_models_fixes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    config = _config(tmp_path, 1, models)
    assert main(["doctor", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  model segmentation" in out and "smearscope install-models" in out, out
    assert "WARN  broker" in out  # no broker: the outbox keeps reports, not a failure
    assert main(["install-models", str(models)]) == 0
    assert main(["doctor", "--config", str(config)]) == 0
    capsys.readouterr()
    shutil.copy(DEFAULT_MODELS_DIR / "rbc_head.onnx", models / "wbc_head.onnx")  # wrong file
    assert main(["doctor", "--config", str(config)]) == 1
    assert "sha256 of wbc_head.onnx does not match" in capsys.readouterr().out


def test_doctor_fails_what_run_would_refuse(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing watched folder, an outbox under a file, a credential that cannot be read: `run`
    refuses each, so doctor must not say 0 failed."""
    config = tmp_path / "station.toml"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    config.write_text(to_toml({
        "station_id": "doc-2", "source": {"kind": "folder", "path": str(tmp_path / "inbox")},
        "analysis": {"models_dir": str(DEFAULT_MODELS_DIR)},
        "mqtt": {"host": "127.0.0.1", "port": 1, "password_credential": "mqtt-password", "username": "st",
                 "outbox": {"path": str(blocker / "outbox.sqlite3")}}}) + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    assert main(["doctor", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  config files       source.path: watched folder" in out, out
    assert "mqtt.outbox.path" in out and out.count("is a file, not a directory") == 1, out  # said once
    assert "FAIL  broker password" in out, out
    assert main(["validate-config", str(config)]) == 78  # run and validate-config refuse it too
    (tmp_path / "inbox").mkdir()
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "mqtt-password").write_text("secret\n")
    config.write_text(config.read_text().replace(str(blocker / "outbox.sqlite3"),
                                                 str(tmp_path / "state" / "outbox.sqlite3")))
    capsys.readouterr()
    assert main(["doctor", "--config", str(config)]) == 0, capsys.readouterr().out


def test_doctor_reports_a_bad_environment_override_of_the_embedded_station(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMEARSCOPE__MQTT__PORT", "abc")
    assert main(["doctor"]) == 1
    assert "SMEARSCOPE__MQTT__PORT" in capsys.readouterr().out


def test_a_watched_folder_the_station_cannot_write_is_refused_before_it_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The station moves each file into done/ or rejected/ and logs it beside them: a folder where
    it cannot (done/ a file, a state file in a folder that does not exist, or a read-only mount)
    is a config problem said by validate-config, doctor and start-up (exit 78), not a crash loop."""
    from smearscope.device.folder_source import FolderSource
    from smearscope.device.source_config import FolderSourceConfig
    from smearscope.device.sources import SourceConfigurationError

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "done").write_text("not a folder")
    config = tmp_path / "station.toml"
    doc = {"station_id": "doc-3", "source": {"kind": "folder", "path": str(inbox)},
           "analysis": {"models_dir": str(DEFAULT_MODELS_DIR)},
           "mqtt": {"host": "127.0.0.1", "port": 1, "outbox": {"path": str(tmp_path / "state" / "o.sqlite3")}}}
    config.write_text(to_toml(doc) + "\n")
    assert main(["validate-config", str(config)]) == 78
    assert "source.path:" in capsys.readouterr().err
    assert main(["doctor", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  config files       source.path: {inbox / 'done'} is not a folder this user can write" in out
    assert "watched folder" not in out
    with pytest.raises(SourceConfigurationError, match="done"):
        FolderSource(FolderSourceConfig(path=inbox))
    (inbox / "done").unlink()
    with pytest.raises(SourceConfigurationError, match="state_file"):
        FolderSource(FolderSourceConfig(path=inbox, state_file=tmp_path / "no-such-folder" / "processed"))
    FolderSource(FolderSourceConfig(path=inbox)).close()  # writable: it opens
    assert main(["validate-config", str(config)]) == 0
    main(["doctor", "--config", str(config)])  # (no broker here: its own check fails)
    assert f"OK    watched folder     {inbox} (a directory the station can write" in capsys.readouterr().out
    # read-only: a bind mount remounted so (root only; elsewhere this part skips)
    if not shutil.which("mount") or subprocess.run(["mount", "--bind", str(inbox), str(inbox)], check=False,
                                                   capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here (needs root): the read-only case is not checked")
    try:
        assert subprocess.run(["mount", "-o", "remount,bind,ro", str(inbox)], check=False, capture_output=True).returncode == 0
        with pytest.raises(SourceConfigurationError, match="not writable by this user"):
            FolderSource(FolderSourceConfig(path=inbox))
        assert main(["validate-config", str(config)]) == 78
        assert "is not writable by this user" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", "-l", str(inbox)], check=False, capture_output=True)


def test_validate_config_says_the_models_are_missing_as_start_up_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    assert main(["validate-config", str(_config(tmp_path, 1, models))]) == 78
    err = capsys.readouterr().err
    assert "analysis.models_dir:" in err and f"smearscope install-models {models}" in err, err
    assert main(["install-models", str(models)]) == 0
    capsys.readouterr()
    assert main(["validate-config", str(_config(tmp_path, 1, models))]) == 0


def test_validate_config_refuses_a_broken_model_as_start_up_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A models folder copied by hand and cut short (an ONNX truncated, a manifest cut, a model
    file missing): validate-config said OK, the station then exited 78 at start (not restarted)."""
    from smearscope.service.station.daemon import run_daemon

    models = tmp_path / "models"
    assert main(["install-models", str(models)]) == 0
    pristine = {p.name: p.read_bytes() for p in models.iterdir()}
    breaks = [("rbc_head.onnx", pristine["rbc_head.onnx"][:1000], "sha256 of rbc_head.onnx does not match"),
              ("seg.json", pristine["seg.json"][:100], "seg.json: invalid manifest"),
              ("wbc_head.onnx", None, "wbc_head.onnx is missing")]
    config = _config(tmp_path, 1, models)
    for name, content, said in breaks:
        if content is None:
            (models / name).unlink()
        else:
            (models / name).write_bytes(content)
        capsys.readouterr()
        assert run_daemon(config, 1) == 78, name  # what start-up does
        assert said in capsys.readouterr().err, name
        assert main(["validate-config", str(config)]) == 78, name
        err = capsys.readouterr().err
        assert "analysis.models_dir:" in err and said in err and f"smearscope install-models {models}" in err, err
        (models / name).write_bytes(pristine[name])
    assert main(["validate-config", str(config)]) == 0


def test_a_model_file_that_cannot_be_read_is_a_config_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A model file that cannot be read (here a folder in its place; for the station's user, one
    only root may read) ended validate-config, which now hashes it, and start-up in an
    IsADirectoryError/PermissionError traceback (exit 1); each now names the file, exit 78."""
    from smearscope.service.station.daemon import run_daemon

    models = tmp_path / "models"
    assert main(["install-models", str(models)]) == 0
    (models / "rbc_head.onnx").unlink()
    (models / "rbc_head.onnx").mkdir()
    config = _config(tmp_path, 1, models)
    capsys.readouterr()
    assert main(["validate-config", str(config)]) == 78
    err = capsys.readouterr().err
    assert "analysis.models_dir:" in err and "cannot read model file" in err and "rbc_head.onnx" in err, err
    assert run_daemon(config, 1) == 78
    assert "cannot read model file" in capsys.readouterr().err

def test_doctor_only_warns_of_a_credential_it_cannot_see_from_a_shell(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from a shell ($CREDENTIALS_DIRECTORY unset), the broker password credential cannot be
    checked: a warning, not a failure; the last line counts the lines above it."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    config = _config(tmp_path, 1, DEFAULT_MODELS_DIR, username="st", password_credential="mqtt-password")
    assert main(["doctor", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("WARN  broker password") and "CREDENTIALS_DIRECTORY" in ln for ln in lines), lines
    statuses = [ln[:4] for ln in lines[:-1]]
    warned = statuses.count("WARN")
    assert lines[-1] == (f"{len(statuses)} checks: {statuses.count('FAIL')} failed, "
                         f"{warned} warning{'' if warned == 1 else 's'}")
    assert statuses.count("FAIL") == 0 and statuses.count("WARN") >= 2  # the credential, the broker


def test_installed_models_are_readable_by_every_user(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """install-models runs as root and the station as its own user: each file is 0644."""
    import stat

    dest = tmp_path / "models"
    assert main(["install-models", str(dest)]) == 0
    installed = sorted(dest.iterdir())
    assert {p.name for p in installed} >= {"seg.json", "wbc_head.json", "wbc_head.onnx"}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in installed), [oct(p.stat().st_mode) for p in installed]


@pytest.mark.broker
def test_doctor_fails_a_broker_acl_without_the_stations_block(
        tmp_path: Path, credentials_dir: Path, capsys: pytest.CaptureFixture[str],
        broker_with: Callable[..., MosquittoBroker]) -> None:
    """A second station added to config/mosquitto.acl.example's broker under its own station id,
    its account's ACL block not renamed to it: mosquitto takes the login and refuses every message
    it publishes, and doctor said `OK broker login` and passed. Now `FAIL broker ACL`, naming the
    block to add; the station the block names passes."""
    acl = (Path(__file__).resolve().parents[1] / "config" / "mosquitto.acl.example").read_text()
    broker = broker_with(users={"station-lab-7": MQTT_USERS["station"]}, acl=acl)
    login = {"username": "station-lab-7", "password_credential": "mqtt-password"}
    for station_id, status in (("lab-7", 0), ("lab-8", 1)):
        config = _config(tmp_path, broker.port, DEFAULT_MODELS_DIR, **login)
        config.write_text(config.read_text().replace('station_id = "doc-1"', f'station_id = "{station_id}"'))
        assert main(["doctor", "--config", str(config), "--no-wait"]) == status
        out = capsys.readouterr().out
        assert f"OK    broker login       127.0.0.1:{broker.port} accepts user 'station-lab-7'" in out, out
        (acl_line,) = _lines(out, "broker ACL")
        if status == 0:
            assert acl_line == "OK    broker ACL         user 'station-lab-7' may publish under smearscope/lab-7/"
        else:
            assert acl_line.startswith(f"FAIL  broker ACL         127.0.0.1:{broker.port} takes the login of user "
                                       "'station-lab-7' but its ACL refuses what it publishes under "
                                       "smearscope/lab-8/ (Not authorized, 0x87"), acl_line
            assert "station-lab-7 block, lab-7 replaced by lab-8) and reload mosquitto" in acl_line, acl_line


@pytest.mark.broker
def test_doctor_names_the_command_answers_an_acl_listing_a_stations_topics_one_by_one_lacks(
        tmp_path: Path, credentials_dir: Path, capsys: pytest.CaptureFixture[str],
        broker_with: Callable[..., MosquittoBroker]) -> None:
    """A station block that lists the station's topics one by one instead of `<station>/#`: doctor
    probes under cmd_response/, so without it the FAIL says that grant is what is missing; with it,
    the same block passes."""
    leaves = "".join(f"topic write smearscope/lab-7/{leaf}\n" for leaf in ("report", "field", "cells", "status",
                                                                           "telemetry", "run", "fhir"))
    login = {"username": "station-lab-7", "password_credential": "mqtt-password"}
    for grant, status in (("", 1), ("topic write smearscope/lab-7/cmd_response/#\n", 0)):
        broker = broker_with(users={"station-lab-7": MQTT_USERS["station"]},
                             acl=f"user station-lab-7\n{leaves}{grant}topic read smearscope/lab-7/cmd/#\n")
        config = _config(tmp_path, broker.port, DEFAULT_MODELS_DIR, **login)
        config.write_text(config.read_text().replace('station_id = "doc-1"', 'station_id = "lab-7"'))
        assert main(["doctor", "--config", str(config), "--no-wait"]) == status
        (acl_line,) = _lines(capsys.readouterr().out, "broker ACL")
        if status:
            assert acl_line.startswith("FAIL  broker ACL"), acl_line
            assert "must grant write on smearscope/lab-7/cmd_response/# too" in acl_line, acl_line
        else:
            assert acl_line == "OK    broker ACL         user 'station-lab-7' may publish under smearscope/lab-7/"


def test_doctor_says_the_example_configs_broker_host_is_a_placeholder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """install-jetson.sh installs config/station.example.toml: its [mqtt] host left as it is, doctor
    said only `does not answer ([Errno -2] Name or service not known)`, with nothing to set."""
    import tomllib

    example = tomllib.loads((Path(__file__).resolve().parents[1] / "config" / "station.example.toml").read_text())
    host = example["mqtt"]["host"]
    config = _doc(tmp_path, mqtt={"host": host, "port": free_port(),
                                  "outbox": {"path": str(tmp_path / "state" / "o.sqlite3")}})
    main(["doctor", "--config", str(config), "--no-wait"])
    (line,) = _lines(capsys.readouterr().out, "broker  ")
    assert line.startswith(f"WARN  broker             {host}:"), line
    assert f"the name {host!r} does not resolve: check [mqtt] host and the station's DNS" in line, line
    assert f"({host} is config/station.example.toml's placeholder: the clinic broker's name or address goes there)" \
        in line, line


def _doc(tmp_path: Path, **sections: dict) -> Path:
    """A station config here: simulated source and no broker unless `sections` say otherwise."""
    doc = {"station_id": "doc-9", "source": {"kind": "simulated"},
           "analysis": {"models_dir": str(DEFAULT_MODELS_DIR)},
           "mqtt": {"host": "127.0.0.1", "port": 1, "outbox": {"path": str(tmp_path / "state" / "o.sqlite3")}}}
    doc.update(sections)
    path = tmp_path / "station.toml"
    path.write_text(to_toml(doc) + "\n")
    return path


def _lines(out: str, what: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln[6:].startswith(what)]


def _outbox_lines(out: str) -> list[str]:
    """The lines of the check named `outbox` (not `outbox disk`)."""
    return [ln for ln in out.splitlines() if ln[6:24].rstrip() == "outbox"]


def test_doctor_checks_a_camera_device_node_without_capturing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A V4L2 index or /dev path: FAIL when the node is missing or cannot be opened for reading;
    a pipeline or URL: INFO, not checked. Opening is all (a running station may hold the camera)."""
    missing = 97
    while Path(f"/dev/video{missing}").exists():
        missing += 1
    cases = {missing: "FAIL", str(missing): "FAIL", str(tmp_path / "video0"): "FAIL",
             "videotestsrc ! videoconvert ! appsink": "INFO", "rtsp://10.0.0.9/scope": "INFO"}
    for device, status in cases.items():
        main(["doctor", "--config", str(_doc(tmp_path, source={"kind": "camera", "device": device}))])
        out = capsys.readouterr().out
        camera = _lines(out, "camera")
        assert len(camera) == 1 and camera[0].startswith(status), (device, out)
        if status == "FAIL":
            node = f"/dev/video{missing}" if isinstance(device, int) or device.isdigit() else device
            assert f"{node} does not exist" in camera[0], camera
    main(["doctor", "--config", str(_doc(tmp_path))])  # simulated: no camera line
    assert not _lines(capsys.readouterr().out, "camera")


def test_a_camera_the_station_waits_for_is_doctors_exit_3_any_other_fail_exit_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A camera not there, or there and not answering (a character device whose open fails: one of a
    major number no driver holds, ENXIO, made where mknod is allowed), is the only kind of FAIL the
    running station gets past (it waits for the camera): exit 3, which the installer enables the unit
    on; beside any other FAIL (the models) it is exit 1."""
    missing = 97
    while Path(f"/dev/video{missing}").exists():
        missing += 1
    devices = [f"/dev/video{missing}"]
    node = tmp_path / "video-gone"
    try:
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(240, 0))  # 240-254: local use, no driver here
        devices.append(str(node))
    except PermissionError:  # not root: the missing node alone
        pass
    for device in devices:
        assert main(["doctor", "--config", str(_doc(tmp_path, source={"kind": "camera", "device": device}))]) == 3
        out = capsys.readouterr().out
        assert _lines(out, "camera")[0].startswith(f"FAIL  camera             {device} "), out
        assert "the station waits for it and opens it when it comes" in out, out
        assert "1 failed (only ones the running station recovers from: camera)" in out, out
    models = tmp_path / "no-models"
    models.mkdir()
    camera = {"kind": "camera", "device": f"/dev/video{missing}"}
    assert main(["doctor", "--config", str(_doc(tmp_path, source=camera,
                                                analysis={"models_dir": str(models)}))]) == 1
    out = capsys.readouterr().out
    assert "FAIL  camera" in out and "FAIL  model segmentation" in out and "recovers from" not in out, out


def test_a_camera_path_that_is_no_v4l2_capture_node_fails_doctor_with_exit_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A device path that is there but no camera (a character device of another driver, /dev/null; a
    socket, a file, a folder) never opens as one: the station would wait on it for ever. /dev/null and
    the file and folder were `OK ... opens for reading`, the socket (ENXIO) a camera the station waits
    for, exit 3, on which the installer enables the unit; now `camera node`, exit 1."""
    import socket

    (tmp_path / "a-file").write_bytes(b"\x00" * 16)
    (tmp_path / "a-folder").mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "a-socket"))
        for device, kind in (("/dev/null", "not a V4L2 device"), (str(tmp_path / "a-socket"), "a socket"),
                             (str(tmp_path / "a-file"), "a regular file"), (str(tmp_path / "a-folder"), "a folder")):
            assert main(["doctor", "--config", str(_doc(tmp_path, source={"kind": "camera", "device": device}))]) == 1
            out = capsys.readouterr().out
            line = _lines(out, "camera")
            assert len(line) == 1 and line[0].startswith(f"FAIL  camera node        {device} is {kind}"), out
            assert "v4l2-ctl --list-devices" in line[0] and "waits for it" not in out and "recovers from" not in out


def test_doctor_reads_v4l2_capabilities_as_the_kernel_lays_them_out(tmp_path: Path) -> None:
    """VIDIOC_QUERYCAP's number and struct v4l2_capability's layout as linux/videodev2.h declares
    them (compiled here where a C compiler and the header are), and what doctor makes of a node's
    capabilities: a capture node (single- or multi-planar) is a camera, a metadata node is not."""
    from smearscope.device import camera_node as dc

    header = Path("/usr/include/linux/videodev2.h")
    if shutil.which("cc") and header.exists():
        source = tmp_path / "caps.c"
        source.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/videodev2.h>\n"
                          "int main(void){printf(\"%lu %zu %zu %zu %zu %u %u %u %u\", (unsigned long)VIDIOC_QUERYCAP,"
                          " sizeof(struct v4l2_capability), offsetof(struct v4l2_capability, card),"
                          " offsetof(struct v4l2_capability, capabilities), offsetof(struct v4l2_capability, device_caps),"
                          " V4L2_CAP_VIDEO_CAPTURE, V4L2_CAP_VIDEO_CAPTURE_MPLANE, V4L2_CAP_META_CAPTURE,"
                          " V4L2_CAP_DEVICE_CAPS); return 0;}\n")
        subprocess.run(["cc", "-o", str(tmp_path / "caps"), str(source)], check=True)
        said = subprocess.run([str(tmp_path / "caps")], capture_output=True, text=True, check=True).stdout.split()
        assert [int(v) for v in said] == [dc.VIDIOC_QUERYCAP, dc.CAPABILITY_BYTES, 16, 84, 88, 0x1, 0x1000,
                                          0x800000, 0x80000000]

    def caps(card: bytes, capabilities: int, device_caps: int) -> bytes:
        return struct.pack("=16s32s32sIII12x", b"uvcvideo", card, b"usb-3610000.xhci-2.1", 0x60000,
                           capabilities, device_caps)

    both = 0x80000000 | 0x1 | 0x800000 | 0x04000000
    assert dc.capture_problem(caps(b"HD USB Camera", both, 0x1 | 0x04000000)) is None
    assert dc.capture_problem(caps(b"tegra-video", 0x80000000 | 0x1000, 0x1000)) is None
    assert dc.capture_problem(caps(b"HD USB Camera", both, 0x800000 | 0x04000000)) == (
        "a V4L2 node of HD USB Camera without video capture (its metadata node?)")


def test_doctor_fails_a_review_directory_or_typed_cells_file_it_cannot_write(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    review = {"directory": str(blocker / "review"), "typed_cells_path": str(blocker / "t" / "typed.sqlite3")}
    assert main(["doctor", "--config", str(_doc(tmp_path, review=review))]) == 1
    out = capsys.readouterr().out
    assert _lines(out, "review dir")[0].startswith(f"FAIL  review dir         {blocker / 'review'} cannot be created"), out
    assert "overlays and the review gallery would be lost" in out
    assert _lines(out, "typed cells file")[0].startswith("FAIL") and "typed white cells would not be kept" in out
    assert main(["doctor", "--config", str(_doc(tmp_path))]) == 0  # the defaults, beside the outbox
    out = capsys.readouterr().out
    assert f"OK    review dir         {tmp_path / 'state' / 'review'} (writable)" in out, out
    assert f"OK    typed cells file   {tmp_path / 'state' / 'typed_cells.sqlite3'}" in out, out
    assert not (tmp_path / "state").exists()  # checked, nothing created
    main(["doctor", "--config", str(_doc(tmp_path, review={"enabled": False}))])
    assert not _lines(capsys.readouterr().out, "review dir")


def test_doctor_as_an_unprivileged_user_fails_a_root_owned_review_directory() -> None:
    """The audit's case: the station's user (here nobody) cannot write a root-owned folder."""
    import os
    import sys
    import tempfile

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run doctor as another user")
    base = Path(tempfile.mkdtemp(prefix="doctor-nobody-", dir="/tmp"))  # pytest's tmp is root-only
    try:
        base.chmod(0o755)
        rootonly, userstate = base / "rootonly", base / "userstate"
        rootonly.mkdir(mode=0o755)
        userstate.mkdir()
        os.chown(userstate, 65534, 65534)
        config = _doc(base, mqtt={"host": "127.0.0.1", "port": 1, "outbox": {"path": str(userstate / "o.sqlite3")}},
                      review={"directory": str(rootonly / "review"), "typed_cells_path": str(rootonly / "t.sqlite3")})
        config.chmod(0o644)
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", sys.executable,
                               "-c", "import sys; from smearscope.cli import main; sys.exit(main(sys.argv[1:]))",
                               "doctor", "--config", str(config)],
                              capture_output=True, text=True, timeout=300, check=False,
                              env={**os.environ, "HOME": str(userstate)})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if "review" not in proc.stdout:
        pytest.skip(f"nobody cannot run doctor from this checkout here: {(proc.stdout + proc.stderr)[-300:]}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"FAIL  review dir         {rootonly / 'review'} cannot be created or written" in proc.stdout
    assert f"FAIL  typed cells file   {rootonly} cannot be created or written" in proc.stdout
    assert "OK    outbox" in proc.stdout, proc.stdout


def test_doctor_says_how_to_check_a_login_it_cannot_read_the_password_for(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker that answers, a password only systemd can hand over: a WARN naming systemd-run."""
    import socket

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        config = _doc(tmp_path, mqtt={"host": "127.0.0.1", "port": port, "username": "st",
                                      "password_credential": "mqtt-password",
                                      "outbox": {"path": str(tmp_path / "state" / "o.sqlite3")}})
        assert main(["doctor", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    login = _lines(out, "broker login")
    assert len(login) == 1 and login[0].startswith("WARN  broker login       not checked"), out
    assert ("sudo systemd-run --pipe --wait -p User=smearscope -p LoadCredential=mqtt-password:"
            f"/etc/smearscope/mqtt-password /opt/smearscope/venv/bin/smearscope doctor --config {config}") in login[0]
    # another credential's name: not on the file the shipped unit loads 'mqtt-password' from
    with socket.create_server(("127.0.0.1", 0)) as server:
        config = _doc(tmp_path, mqtt={"host": "127.0.0.1", "port": server.getsockname()[1], "username": "st",
                                      "password_credential": "broker-pass",
                                      "outbox": {"path": str(tmp_path / "state" / "o.sqlite3")}})
        assert main(["doctor", "--config", str(config)]) == 0
    (login,) = _lines(capsys.readouterr().out, "broker login")
    assert "LoadCredential=broker-pass:PATH /opt/smearscope/venv/bin/smearscope doctor" in login, login


def test_a_low_disk_names_the_threshold_and_the_fix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from smearscope.cli import doctor

    monkeypatch.setattr(doctor, "LOW_DISK_BYTES", 1 << 62)
    main(["doctor", "--config", str(_doc(tmp_path))])
    disk = _lines(capsys.readouterr().out, "outbox disk")
    assert len(disk) == 1 and disk[0].startswith("WARN"), disk
    assert f"under the {(1 << 62) / 1e6:.0f} MB doctor asks for" in disk[0]
    assert "pauses its analysis" in disk[0] and "[review] min_free_disk_mb = 256" in disk[0]
    assert "move mqtt.outbox.path to a larger disk" in disk[0]


@pytest.mark.broker
def test_doctor_fails_a_client_certificate_the_broker_refuses(
        tmp_path: Path, tls_material: TlsMaterial, credentials_dir: Path,
        capsys: pytest.CaptureFixture[str], broker_with: Callable[..., MosquittoBroker]) -> None:
    """A broker asking for client certificates (mutual TLS), a station certificate it does not
    trust: doctor said "OK broker accepts TLS connections" (its own probe sent no certificate and
    TLS 1.3 refuses one only after the handshake) and only warned "no answer to CONNECT" (exit 0),
    while the station could never connect."""
    broker = broker_with(tls=tls_material, tls_extra=("require_certificate true",))
    certs = tmp_path / "certs"
    certs.mkdir()
    trusted, stranger = make_client_cert(certs, "station", tls_material), make_client_cert(certs, "stranger", None)
    login = {"username": "station", "password_credential": "mqtt-password"}
    tls = {"ca_file": str(tls_material.ca_cert)}
    cases = [(trusted, 0, "OK    broker             "), (stranger, 1, "FAIL  broker TLS         "), (None, 1, "FAIL  broker TLS         ")]
    for pair, code, line in cases:
        client = {} if pair is None else {"certfile": str(pair[0]), "keyfile": str(pair[1])}
        config = _doc(tmp_path, mqtt={"host": "127.0.0.1", "port": broker.tls_port, **login, "tls": {**tls, **client},
                                      "outbox": {"path": str(tmp_path / "state" / "o.sqlite3")}})
        assert main(["doctor", "--config", str(config)]) == code, pair
        out = capsys.readouterr().out
        found = [ln for ln in out.splitlines() if ln[6:].startswith(("broker  ", "broker TLS"))]
        assert found and found[0].startswith(line), out
        if code == 0:
            assert "OK    broker login" in out, out
        else:
            assert "refuses the client certificate" in found[0] if pair else "asks for a client certificate" in found[0], out


@pytest.mark.broker
def test_doctor_says_when_tls_and_the_port_do_not_match(
        tmp_path: Path, tls_material: TlsMaterial, credentials_dir: Path,
        capsys: pytest.CaptureFixture[str], broker_with: Callable[..., MosquittoBroker]) -> None:
    """[mqtt.tls] set with the plain listener's port said "FAIL broker TLS ... ConnectionResetError:
    Connection reset by peer"; no [mqtt.tls] with the TLS listener's port said "OK broker accepts TCP"
    and "WARN broker login ... no answer to CONNECT within 3 s" (exit 0). Neither named the mismatch."""
    broker = broker_with(tls=tls_material)
    login = {"username": "station", "password_credential": "mqtt-password",
             "outbox": {"path": str(tmp_path / "state" / "o.sqlite3")}}
    tls = _doc(tmp_path, mqtt={"host": "127.0.0.1", "port": broker.port, **login,
                               "tls": {"ca_file": str(tls_material.ca_cert)}})
    assert main(["doctor", "--config", str(tls)]) == 1
    out = capsys.readouterr().out
    line = _lines(out, "broker TLS")
    assert line and line[0].startswith("FAIL") and "not a TLS listener" in line[0], out
    plain = _doc(tmp_path, mqtt={"host": "127.0.0.1", "port": broker.tls_port, **login})
    assert main(["doctor", "--config", str(plain)]) == 1
    out = capsys.readouterr().out
    line = _lines(out, "broker login")
    assert line and line[0].startswith("FAIL") and "a TLS listener" in line[0] and "[mqtt.tls]" in line[0], out
    # the right port, a CA file that did not sign the broker's certificate (the broker's moved to a new CA)
    other = make_tls_material(tmp_path / "other-ca", common_name="other-ca")
    stale = _doc(tmp_path, mqtt={"host": "127.0.0.1", "port": broker.tls_port, **login,
                                 "tls": {"ca_file": str(other.ca_cert)}})
    assert main(["doctor", "--config", str(stale)]) == 1
    out = capsys.readouterr().out
    line = _lines(out, "broker TLS")
    assert line and f"not signed by the CA in [mqtt.tls] ca_file {other.ca_cert}" in line[0], out


@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs faketime")
def test_doctor_warns_of_a_clock_that_reads_before_this_release(tmp_path: Path) -> None:
    """A Jetson without a clock battery boots in 1970 (or at the time it last saved) until network
    time sets it: doctor says so first, as a warning naming the clock's reading (the real CLI run
    under faketime); on a clock after the release it reads OK."""
    config = tmp_path / "missing.toml"
    cli = [shutil.which("smearscope") or str(Path(sys.executable).with_name("smearscope")), "doctor", "--config",
           str(config)]
    stale = subprocess.run(["faketime", "-f", "@1970-01-02 00:00:00", *cli], check=False, capture_output=True, text=True,
                           timeout=120)
    first = stale.stdout.splitlines()[0]
    assert first.startswith("WARN  clock") and "1970-01-02 00:00 UTC, before this release" in first, stale.stdout
    now = subprocess.run(cli, check=False, capture_output=True, text=True, timeout=120)
    assert now.stdout.splitlines()[0].startswith("OK    clock"), now.stdout


@pytest.mark.broker
def test_doctor_names_a_websockets_port_given_as_the_mqtt_port_and_logs_in_over_websockets(
        tmp_path: Path, credentials_dir: Path, capsys: pytest.CaptureFixture[str],
        broker_with: Callable[..., MosquittoBroker]) -> None:
    """The dashboard's WebSockets port as [mqtt] port: doctor warned "no answer to CONNECT within 3 s"."""
    broker = broker_with(websockets=True)
    login = {"username": "station", "password_credential": "mqtt-password"}
    main(["doctor", "--config", str(_config(tmp_path, broker.ws_port, DEFAULT_MODELS_DIR, **login))])
    line = _lines(capsys.readouterr().out, "broker login")
    assert line and "gave no MQTT answer" in line[0] and 'transport = "websockets"' in line[0], line
    over_ws = _config(tmp_path, broker.ws_port, DEFAULT_MODELS_DIR, transport="websockets", **login)
    main(["doctor", "--config", str(over_ws)])
    line = _lines(capsys.readouterr().out, "broker login")
    assert line and line[0].startswith("OK") and "accepts user 'station'" in line[0], line


@pytest.mark.broker
def test_doctor_says_a_revoked_client_certificate_is_revoked(
        tmp_path: Path, tls_material: TlsMaterial, credentials_dir: Path,
        capsys: pytest.CaptureFixture[str], broker_with: Callable[..., MosquittoBroker]) -> None:
    """Said "use one signed by the CA the broker trusts (its cafile), not expired" of a certificate
    its CA signed, in date, that the broker's crlfile lists."""
    certs, crl = make_issued_client_certs(tmp_path / "issued", tls_material)
    broker = broker_with(tls=tls_material, tls_extra=("require_certificate true", f"crlfile {crl}"))
    crt, key = certs["revoked"]
    config = _doc(tmp_path, mqtt={"host": "127.0.0.1", "port": broker.tls_port, "username": "station",
                                  "password_credential": "mqtt-password",
                                  "tls": {"ca_file": str(tls_material.ca_cert), "certfile": str(crt), "keyfile": str(key)},
                                  "outbox": {"path": str(tmp_path / "state" / "o.sqlite3")}})
    assert main(["doctor", "--config", str(config)]) == 1
    line = _lines(capsys.readouterr().out, "broker TLS")
    assert line and f"refuses the client certificate {crt}" in line[0], line
    assert "it is revoked (the broker's crlfile lists it): install a new one" in line[0], line


def test_doctor_on_onnxruntime_does_not_warn_of_tensorrt_it_does_not_use(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A station on engine_backend onnxruntime (the example's) without TensorRT or a CUDA binding:
    INFO lines saying they are not used, not warnings that every such station would carry for ever
    and no one could act on; on engine_backend tensorrt their absence still fails."""
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT present")
    except ImportError:
        pass
    config = _config(tmp_path, 1, DEFAULT_MODELS_DIR)
    main(["doctor", "--config", str(config), "--no-wait"])
    lines = capsys.readouterr().out.splitlines()
    warned = sum(ln.startswith("WARN") for ln in lines)  # here the broker it cannot reach, alone: "1 warning"
    assert lines[-1].endswith(f" failed, {warned} warning{'' if warned == 1 else 's'}"), lines
    assert ("INFO  tensorrt           not installed (JetPack 6.1+ provides TensorRT 10): not used with "
            "engine_backend onnxruntime") in lines
    assert not any(ln.startswith(("WARN  tensorrt", "WARN  CUDA binding")) for ln in lines), lines
    config.write_text(config.read_text().replace("[analysis]", '[analysis]\nengine_backend = "tensorrt"', 1))
    assert "[analysis]" in config.read_text()
    main(["doctor", "--config", str(config), "--no-wait"])
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("FAIL  tensorrt") for ln in lines), lines


def test_install_models_to_a_file_says_it_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`install-models PATH` where PATH is a file: exit 1 saying so, not mkdir's "File exists",
    which reads as if the models were already there."""
    dest = tmp_path / "models"
    dest.write_text("not a folder")
    assert main(["install-models", str(dest)]) == 1
    assert capsys.readouterr().out.strip() == (f"smearscope install-models: cannot write the models to {dest}: "
                                               "it is a file, not a folder")


def test_doctor_names_the_runs_the_outbox_holds_since_when_their_reports_and_what_releases_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """An outbox file where earlier starts held run r-0 two days ago (the broker showed it closed at 9
    fields, the state held 4) with two of its specimen reports and a FHIR Bundle waiting, and r-1 an
    hour ago (the broker showed a later run, r-9): one `held run` line each, WARN for the one held
    over a day, INFO for the other, each with its reports counted and the words the station's own
    WARNING says at its start (read from the same file by the station's run watch)."""
    import json
    import logging
    import time

    from smearscope.service.config import load_config
    from smearscope.service.mqtt.outbox import NewMessage, Outbox
    from smearscope.service.mqtt.run_watch import HELD_AFTER_TABLE, HELD_TABLE, RunStateWatch

    config = _doc(tmp_path, mqtt={"host": "127.0.0.1", "port": 1, "protocol": "3.1.1",
                                  "outbox": {"path": str(tmp_path / "state" / "o.sqlite3")}})
    base = "smearscope/doc-9"
    now = time.time()

    def report(report_id: str, run_id: str) -> NewMessage:
        body = {"report_id": report_id, "kind": "specimen", "run_id": run_id}
        return NewMessage("report", f"{base}/report", json.dumps({"report_id": report_id, "body": body}).encode(),
                          report_id, "1.2")

    with Outbox.from_config(load_config(config).mqtt.outbox) as box:
        box.put_many([report("rep-a", "r-0"), report("rep-b", "r-0"), report("rep-c", "r-5"),
                      NewMessage("report", f"{base}/fhir", b"{}", "rep-a", "4.0.1")])
        box.write(lambda conn: (conn.execute(HELD_TABLE), conn.execute(HELD_AFTER_TABLE),
                                conn.execute("INSERT INTO held_runs VALUES ('r-0', 'closed', 9, 4, ?)", (now - 2 * 86400,)),
                                conn.execute("INSERT INTO held_runs VALUES ('r-1', 'open', 4, 3, ?)", (now - 3600,)),
                                conn.execute("INSERT INTO held_runs_after VALUES ('r-1', 'r-9')")))
        with caplog.at_level(logging.WARNING, logger="smearscope"):
            RunStateWatch("doc-9", f"{base}/run", store=box)
    station_said = {r.getMessage().split("'s run states")[0].removeprefix("run "): r.getMessage()
                    for r in caplog.records if "are held in the outbox since" in r.getMessage()}
    assert set(station_said) == {"r-0", "r-1"}, caplog.text
    main(["doctor", "--no-wait", "--config", str(config)])
    held = _lines(capsys.readouterr().out, "held run")
    assert len(held) == 2, held
    assert held[0].startswith("WARN  held run           2 specimen reports of it in the outbox (with their FHIR "
                              "Bundles), held 2.0 days; run r-0's run states"), held[0]
    assert station_said["r-0"] in held[0] and "the broker showed that run closed with 9 fields" in held[0]
    assert held[1].startswith("INFO  held run           0 specimen reports of it in the outbox (with their FHIR "
                              "Bundles), held 0.0 days; run r-1's run states"), held[1]
    assert station_said["r-1"] in held[1] and "a later run, r-9 (open, 4 fields)" in held[1]
    for line in held:
        assert f"mosquitto_pub -r -n -t {base}/run, then start the station again" in line
        assert f"Under MQTT 3.1.1 (mqtt.protocol) a start that hears no retained run state sends them once its own " \
               f"run state comes back on {base}/run" in line


def test_doctor_says_a_hundred_held_runs_in_six_lines_the_oldest_five_in_full(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An outbox file holding 100 runs (held 100 to 1 hours ago, one specimen report each): doctor says
    the 5 held longest one line each and the other 95 in one line (how many, since when, their
    reports), not 100 lines; the running station's sample naming 100 runs names 5 and counts the rest."""
    import json
    import time

    from smearscope.cli.doctor_parked import held_runs_line
    from smearscope.service.config import load_config
    from smearscope.service.mqtt.outbox import NewMessage, Outbox
    from smearscope.service.mqtt.run_watch import HELD_AFTER_TABLE, HELD_TABLE

    config = _doc(tmp_path, mqtt={"host": "127.0.0.1", "port": 1,
                                  "outbox": {"path": str(tmp_path / "state" / "o.sqlite3")}})
    base = "smearscope/doc-9"
    now = time.time()
    runs = [f"r-{i:03d}" for i in range(100)]

    def report(run_id: str) -> NewMessage:
        body = {"report_id": f"rep-{run_id}", "kind": "specimen", "run_id": run_id}
        return NewMessage("report", f"{base}/report", json.dumps({"report_id": f"rep-{run_id}", "body": body}).encode(),
                          f"rep-{run_id}", "1.2")

    with Outbox.from_config(load_config(config).mqtt.outbox) as box:
        box.put_many([report(r) for r in runs])
        box.write(lambda conn: (conn.execute(HELD_TABLE), conn.execute(HELD_AFTER_TABLE), conn.executemany(
            "INSERT INTO held_runs VALUES (?, 'closed', 9, 4, ?)",
            [(r, now - (100 - i) * 3600) for i, r in enumerate(runs)])))
    main(["doctor", "--no-wait", "--config", str(config)])
    held = _lines(capsys.readouterr().out, "held run")
    assert len(held) == 6, len(held)
    assert all(f"run {r}'s run states" in line for r, line in zip(runs[:5], held[:5], strict=True)), held[:5]
    assert held[5].startswith("WARN  held run"), held[5]  # r-005 held 95 hours: over a day
    assert held[5].endswith(" and 95 more runs held, for 4.0 to 0.0 days (r-005 to r-099), 95 specimen reports "
                            "of them in the outbox: released as the runs above"), held[5]
    [(level, name, text)] = held_runs_line({"held_runs": runs, "host": "jetson-1"}, f"{base}/run")
    assert (level, name) == ("INFO", "held run")
    assert "holds runs r-000, r-001, r-002, r-003, r-004 and 95 more: " in text, text
    assert "r-005" not in text, text


def test_doctor_names_a_missing_config_once_and_where_to_start_from(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "station.toml"
    assert main(["doctor", "--config", str(missing), "--no-wait"]) == 1
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("FAIL")]
    assert line.split(None, 2)[2] == (f"{missing}: cannot read: No such file or directory; write the station's "
                                      "config there, starting from config/station.example.toml (every section, "
                                      "commented; systemd/install-jetson.sh installs it as "
                                      "/etc/smearscope/station.toml; docs/STATION.md section 3)")
    assert line.count(str(missing)) == 1
    toml = tmp_path / "broken.toml"
    toml.write_text('station_id = "w"\n[mqtt]\nhost = "broker\n')
    assert main(["doctor", "--config", str(toml), "--no-wait"]) == 1
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("FAIL")]
    assert line.split(None, 2)[2].startswith(f"{toml}: TOML syntax error: ")


def test_doctor_warns_of_a_relative_path_naming_the_units_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "station.toml"
    config.write_text(f'station_id = "w1"\n[source]\nkind = "folder"\npath = "inbox"\n'
                      f'[analysis]\nmodels_dir = "{DEFAULT_MODELS_DIR}"\n[mqtt.outbox]\npath = "{tmp_path}/o.sqlite3"\n'
                      f'[review]\ndirectory = "{tmp_path}/review"\n')
    main(["doctor", "--config", str(config), "--no-wait"])
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "relative path" in x]
    assert line.split(None, 3)[:3] == ["WARN", "relative", "path"]
    assert line.split(None, 3)[3] == (f"source.path: inbox is relative: read from the working directory, here "
                                      f"{tmp_path}/inbox, but /var/lib/smearscope/inbox for the systemd unit; "
                                      "write it absolute (docs/STATION.md section 3)")


def test_doctor_says_models_not_installed_as_such_not_as_an_invalid_manifest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The example config's models_dir before install-models: each model was 'invalid manifest:
    [Errno 2] No such file or directory'; it is now said missing, with whether the folder exists,
    and the command; a manifest that is there but broken still says what is wrong with it."""
    models = tmp_path / "models"

    def model_lines() -> list[str]:
        assert main(["doctor", "--config", str(_config(tmp_path, 1, models)), "--no-wait"]) == 1
        return [x.split(None, 3)[3] for x in capsys.readouterr().out.splitlines() if x.split()[1:2] == ["model"]]

    for where in ("the folder does not exist", "not installed there"):
        assert model_lines() == [f"{models}/{name}: no such file, {where} (install them: smearscope install-models "
                                 f"{models})" for name in ("seg.json", "rbc_head.json", "wbc_head.json")]
        models.mkdir(exist_ok=True)
    assert main(["install-models", str(models)]) == 0
    (models / "seg.json").write_text("{")
    capsys.readouterr()
    (line,) = [x for x in model_lines() if "seg.json" in x]
    assert "invalid manifest" in line and line.endswith(f"(install them again: smearscope install-models {models})")


def test_doctor_changes_nothing_in_an_outbox_of_the_previous_schema_and_says_what_it_holds(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An outbox file as the release before `cells` messages left it (schema 1, WAL, stopped cleanly) with 3 messages
    waiting, 2 of them reports, read by doctor after an update (its calibration watch, the station calibrated, reading the file too: it finds no check there): the
    file is byte for byte as it was and its folder holds the same files, so the older station, put back, still
    opens it; the outbox line counts its messages. Doctor migrated it to schema 2 (which that station refuses) and
    made the reserve file beside it; the watch's read-only open left SQLite's -wal and -shm there."""
    import hashlib
    import sqlite3

    from test_outbox import _SCHEMA_1

    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "inbox").mkdir()
    outbox = state / "o.sqlite3"
    conn = sqlite3.connect(outbox)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(_SCHEMA_1 + "PRAGMA user_version=1;")
    with conn:
        conn.executemany(
            "INSERT INTO outbox (kind, topic, payload, size, qos, retain, report_id, message_id, content_type, "
            "schema_version, created_at) VALUES (?, 't', ?, 3, 1, 0, ?, ?, 'application/json', '1.0', 1.0)",
            [("report" if i % 2 else "field", b"m%d" % i, f"r{i}", f"m{i}") for i in range(4)])
        conn.execute("DELETE FROM outbox WHERE seq = 1")  # delivered
    conn.close()
    listing = sorted(p.name for p in state.iterdir())
    assert listing == ["o.sqlite3"]
    digest = hashlib.sha256(outbox.read_bytes()).hexdigest()
    config = _doc(tmp_path, source={"kind": "folder", "path": str(tmp_path / "inbox"), "microns_per_pixel": 0.15,
                                    "microns_per_pixel_calibrated_on": "2026-11-01"})
    main(["doctor", "--no-wait", "--config", str(config)])
    out = capsys.readouterr().out
    assert sorted(p.name for p in state.iterdir()) == listing
    assert hashlib.sha256(outbox.read_bytes()).hexdigest() == digest
    assert [ln for ln in out.splitlines() if ln[6:24].rstrip() == "outbox"] == [(f"OK    outbox             {outbox}: 3 messages waiting (2 final: specimen "
                                      "reports, FHIR bundles)")], out
    assert _lines(out, "held run") == [], out


@pytest.mark.broker
def test_a_station_starting_while_doctor_reads_a_large_outbox_starts(
        tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path) -> None:
    """An outbox file holding 20,000 specimen reports of 9 kB (180 MB, under the 256 MB bound) and a run an earlier
    start held: doctor reads it, and the station is started as doctor begins (its line before the outbox read said).
    The station opens its outbox and starts: doctor keeps the file for one short read and parses the reports after
    closing it. Doctor kept it while parsing them all (4 s for 5,000 here) and the station, waiting 2 s for it,
    stopped ('is in use by another process')."""
    import json
    import random
    import time

    from smearscope.service.config import load_config
    from smearscope.service.mqtt.outbox import NewMessage, Outbox
    from smearscope.service.mqtt.run_watch import HELD_AFTER_TABLE, HELD_TABLE

    outbox = tmp_path / "state" / "o.sqlite3"
    config = _doc(tmp_path, mqtt={"host": "127.0.0.1", "port": broker.port, "username": "station",
                                  "password_credential": "mqtt-password", "outbox": {"path": str(outbox)}})
    rng = random.Random(7)
    cells = [{"cell": i, "class": "neutrophil", "p": [round(rng.random(), 4) for _ in range(6)],
              "box": [round(rng.random() * 1000, 1) for _ in range(4)]} for i in range(70)]

    def report(i: int) -> NewMessage:
        body = {"report_id": f"rep-{i}", "kind": "specimen", "run_id": f"r-{i % 50}", "cells": cells}
        return NewMessage("report", "smearscope/doc-9/report", json.dumps({"report_id": f"rep-{i}", "body": body})
                          .encode(), f"rep-{i}", "1.2")

    with Outbox.from_config(load_config(config).mqtt.outbox) as box:
        for first in range(0, 20_000, 1000):
            box.put_many([report(i) for i in range(first, first + 1000)])
        box.write(lambda conn: (conn.execute(HELD_TABLE), conn.execute(HELD_AFTER_TABLE), conn.execute(
            "INSERT INTO held_runs VALUES ('r-0', 'closed', 9, 4, ?)", (time.time() - 3600,))))
    log = tmp_path / "station.log"
    doctor = subprocess.Popen([sys.executable, "-u", "-m", "smearscope", "doctor", "--no-wait", "--config", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    station = None
    try:
        said = []
        assert doctor.stdout is not None
        for line in doctor.stdout:  # the engines line: doctor reads the outbox next
            said.append(line)
            if line[6:24].strip() == "engines":
                break
        with log.open("w") as out:
            station = subprocess.Popen([sys.executable, "-m", "smearscope", "--log-level", "INFO", "run", "--config",
                                        str(config)], stdout=out, stderr=subprocess.STDOUT)
        said += doctor.stdout.readlines()
        doctor.wait(timeout=120)
        deadline = time.monotonic() + 120
        while f"outbox {outbox} opened" not in log.read_text() and station.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert f"outbox {outbox} opened: 20000 messages" in log.read_text(), log.read_text()
        assert station.poll() is None, log.read_text()
        outbox_line = [ln for ln in said if ln[6:24].rstrip() == "outbox"]
        counted = f"OK    outbox             {outbox}: 20000 messages waiting (20000 final: specimen reports, FHIR bundles)\n"
        held = f"OK    outbox             {outbox}: held by a running station\n"
        assert outbox_line in ([counted], [held]), "".join(said)
    finally:
        for process in (doctor, station):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=60)


#: The station's writes to an outbox file: 2 reports and a clean stop (folded into the file), then a start that
#: stores 3 more and dies (kill -9: they stay in the file's -wal).
_STATION_STOPS_THEN_DIES = """
import json, os, sys
from smearscope.service.mqtt.outbox import NewMessage, Outbox
def reports(first, n):
    return [NewMessage("report", "smearscope/doc-9/report", json.dumps(
        {"report_id": f"rep-{i}", "body": {"kind": "specimen", "run_id": "r-1"}}).encode(), f"rep-{i}", "1.2")
        for i in range(first, first + n)]
with Outbox(sys.argv[1]) as box:
    box.put_many(reports(0, 2))
if sys.argv[2] == "dies":
    Outbox(sys.argv[1]).put_many(reports(2, 3))
    os._exit(0)
"""


#: A station's outbox file holding run r-1 (held a day ago) and 2 of its reports, stopped cleanly (folded into the
#: file); then a start that holds run r-2 too, stores 3 more reports of r-1 and dies (kill -9: all in the -wal).
_STATION_HOLDS_THEN_DIES = """
import json, os, sys, time
from smearscope.service.mqtt.outbox import NewMessage, Outbox
from smearscope.service.mqtt.run_watch import HELD_TABLE
def reports(first, n):
    return [NewMessage("report", "smearscope/doc-9/report", json.dumps(
        {"report_id": f"rep-{i}", "body": {"kind": "specimen", "run_id": "r-1"}}).encode(), f"rep-{i}", "1.2")
        for i in range(first, first + n)]
def hold(run_id, ago):
    return lambda conn: (conn.execute(HELD_TABLE), conn.execute(
        "INSERT INTO held_runs VALUES (?, 'closed', 9, 4, ?)", (run_id, time.time() - ago)))
with Outbox(sys.argv[1]) as box:
    box.put_many(reports(0, 2))
    box.write(hold("r-1", 86_400 / 2))
box = Outbox(sys.argv[1])
box.put_many(reports(2, 3))
box.write(hold("r-2", 60))
os._exit(0)
"""


def test_doctor_as_another_user_says_its_held_run_lines_may_miss_what_the_unread_wal_holds(tmp_path: Path) -> None:
    """The outbox file (root's, 0644, its folder 0755) holds run r-1 with 2 reports; a station killed since held
    run r-2 and stored 3 more reports of r-1, all in the -wal that doctor as another user (nobody) cannot read.
    Its held-run line names r-1 with the file's 2 reports and says, as the outbox line does, that the -wal was
    not read and these runs and counts may miss the station's last writes; as root both runs, r-1 with 5 reports,
    and no such words. Before, the held-run line said 2 reports with no word of what it could not see."""
    import contextlib
    import io
    import tempfile

    from test_archive import as_user

    if os.geteuid() != 0:
        pytest.skip("needs root to run doctor as another user")
    main(["doctor", "--no-wait", "--config", str(_doc(tmp_path))])  # every module doctor imports, imported here
    state = Path(tempfile.mkdtemp(prefix="doctor-held-read-only-", dir="/tmp"))  # pytest's tmp is root-only
    try:
        state.chmod(0o755)
        outbox = state / "o.sqlite3"
        subprocess.run([sys.executable, "-c", _STATION_HOLDS_THEN_DIES, str(outbox)], check=True, timeout=60)
        config = _doc(state, mqtt={"host": "127.0.0.1", "port": 1, "outbox": {"path": str(outbox)}})
        config.chmod(0o644)
        wal_kb = (state / "o.sqlite3-wal").stat().st_size / 1024

        def doctor() -> str:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                main(["doctor", "--no-wait", "--config", str(config)])
            return out.getvalue()

        held = _lines(as_user(65534, doctor), "held run")
        assert len(held) == 1 and held[0].startswith(
            "INFO  held run           2 specimen reports of it in the outbox (with their FHIR Bundles), held 0.5 days; "
            "run r-1's run states"), held
        assert held[0].endswith(
            f"; read only, the file alone: this user (uid 65534) cannot write {state}, so its -wal ({wal_kb:.0f} kB: "
            "the station's last writes) was not read and these runs and counts may miss them"), held[0]
        as_root = _lines(doctor(), "held run")  # the station's user: the -wal read too
        assert len(as_root) == 2, as_root
        assert as_root[0].startswith("INFO  held run           5 specimen reports of it in the outbox"), as_root
        assert as_root[1].startswith("INFO  held run           0 specimen reports of it in the outbox"), as_root
        assert "run r-2's run states" in as_root[1] and not any("may miss" in line for line in as_root), as_root
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_doctor_as_another_user_reads_the_outbox_read_only_and_says_what_it_could_not_see(tmp_path: Path) -> None:
    """The station's user (here root) owns the state folder (0755) and its outbox file (0644); doctor runs as
    another user (nobody), who may read them but not write there, so SQLite cannot make the -shm it reads a WAL
    file's last writes through. A station stopped cleanly: its 2 messages counted, OK, read only. A station killed
    after storing 3 more (in the -wal): the file's 2 counted, a WARN that the -wal was not read and whose user can
    count them; as root (the station's user) doctor counts 5. Nothing in either folder changes. Doctor could
    not read it at all: its outbox line was the folder's FAIL alone."""
    import contextlib
    import hashlib
    import io
    import tempfile

    from test_archive import as_user

    if os.geteuid() != 0:
        pytest.skip("needs root to run doctor as another user")
    main(["doctor", "--no-wait", "--config", str(_doc(tmp_path))])  # every module doctor imports, imported here:
    # nobody may not read this Python's own files (under /root), so doctor runs in a child forked from this process
    base = Path(tempfile.mkdtemp(prefix="doctor-read-only-", dir="/tmp"))  # pytest's tmp is root-only
    try:
        base.chmod(0o755)
        said: dict[str, str] = {}
        for how in ("stops", "dies"):
            state = base / how
            state.mkdir(mode=0o755)
            outbox = state / "o.sqlite3"
            subprocess.run([sys.executable, "-c", _STATION_STOPS_THEN_DIES, str(outbox), how], check=True, timeout=60)
            config = _doc(state, mqtt={"host": "127.0.0.1", "port": 1, "outbox": {"path": str(outbox)}})
            config.chmod(0o644)
            before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in state.iterdir()}

            def doctor(config: Path = config) -> str:
                with contextlib.redirect_stdout(io.StringIO()) as out:
                    main(["doctor", "--no-wait", "--config", str(config)])
                return out.getvalue()

            said[how] = as_user(65534, doctor)
            assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in state.iterdir()} == before, how
            assert _lines(said[how], "calibration watch") == [], said[how]  # read too: it keeps no check there yet
        assert "o.sqlite3-wal" in before  # the station that died left its last writes there
        stopped, died = base / "stops" / "o.sqlite3", base / "dies" / "o.sqlite3"
        for how, outbox in (("stops", stopped), ("dies", died)):  # the folder's FAIL stays: true of this user
            assert (f"FAIL  outbox             {outbox.parent} cannot be created or written by this user "
                    "([Errno 13] Permission denied") in said[how], said[how]
        assert _outbox_lines(said["stops"])[1:] == [(
            f"OK    outbox             {stopped}: 2 messages waiting (2 final: specimen reports, FHIR bundles); read "
            f"only, the file alone: this user (uid 65534) cannot write {stopped.parent}, nothing changed")], said["stops"]
        wal_kb = (died.parent / "o.sqlite3-wal").stat().st_size / 1024
        assert _outbox_lines(said["dies"])[1:] == [(
            f"WARN  outbox             {died}: 2 messages waiting (2 final: specimen reports, FHIR bundles) in the "
            f"file itself; read only, the file alone: this user (uid 65534) cannot write {died.parent}, so its "
            f"o.sqlite3-wal ({wal_kb:.0f} kB: the station's last writes, not yet folded into the file) was not read "
            "and the counts and held runs may miss them; nothing changed. Run doctor as the file's owner (root) to "
            "count them")]
        with contextlib.redirect_stdout(io.StringIO()) as out:  # as the station's user: all 5
            main(["doctor", "--no-wait", "--config", str(died.parent / "station.toml")])
        assert _outbox_lines(out.getvalue()) == [
            f"OK    outbox             {died}: 5 messages waiting (5 final: specimen reports, FHIR bundles)"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
